# Two commands on a fresh machine (Python 3.10+, package registries only):
#   make demo   set up, prepare a corpus that needs no download, train tiny plain and SLA models, compare, sample
#   make test   set up and run the whole test suite (what CI runs)
#   make mutate apply small bugs to the code one at a time and report those the tests miss (not in CI)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the Python standard library's own sources: a corpus every machine has
STDLIB := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
DEMO_DATA := data/stdlib-byte
DEMO_OUT := out/demo

.PHONY: setup test lint mutate demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in requirements.txt: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q

mutate: setup
	$(BIN)/python mutate.py

demo: setup
	$(BIN)/python prepare_openwebtext.py --files '$(STDLIB)/*.py' --tokenizer byte --val_fraction 0.02 --out_dir $(DEMO_DATA)
	$(BIN)/python train.py config/tiny_cpu.py --data_dir=$(DEMO_DATA) --out_dir=$(DEMO_OUT)/plain
	$(BIN)/python train.py config/tiny_cpu.py --data_dir=$(DEMO_DATA) --out_dir=$(DEMO_OUT)/sla --sla
	$(BIN)/python plot_results.py $(DEMO_OUT)/plain $(DEMO_OUT)/sla --png $(DEMO_OUT)/val_loss.png
	$(BIN)/python sample.py --out_dir=$(DEMO_OUT)/sla --start='def ' --num_samples=2 --max_new_tokens=300 --temperature=0.7

clean:
	rm -rf $(VENV) $(DEMO_DATA) $(DEMO_OUT)
