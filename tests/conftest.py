"""Shared fixtures. Data from ../shared (next to the repo) is read in place, never copied into the repo."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
# the environment of scripts run as a user runs them: one thread per process (tests run several on 2 cores), and
# output unbuffered, so that a test reading it line by line sees each line when it is printed
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# A script the tests start gets SIGINT as it would from a terminal. A shell without job control starts its background
# jobs with SIGINT ignored, and an ignored signal stays ignored across exec: pytest run as such a job (`make test &`,
# a mutation run) would pass that on, and a script that forgot its SIGINT handler would then train on, unstopped,
# instead of failing the test that sends it Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_or_fail_if_hung(command: list[str], what: str, timeout: float) -> subprocess.CompletedProcess:
    """
    command as a user runs it (from the repo, SUBPROCESS_ENV), its output captured, in a process group of its own:
    one still running after timeout seconds has hung, and the whole group (a pool's workers, torchrun's) is killed
    and the test fails naming what hung, instead of leaving processes behind.
    """
    process = subprocess.Popen(command, cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{what} hung (killed after {timeout:g} s)")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def start(command: list[str], env: dict | None = None) -> subprocess.Popen:
    """A command as a user starts it, from the repo, in a session of its own: a test can signal its whole process
    group, as a scheduler does, and kill all of it if it hangs."""
    pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.Popen(command, cwd=REPO, env=env or SUBPROCESS_ENV, text=True, start_new_session=True, **pipes)


def cli(settings: dict) -> list[str]:
    """settings as a script's --key=value arguments."""
    return [f"--{key}={value}" for key, value in settings.items()]


def start_train(settings: dict, *, prefix: tuple[str, ...] = (), env: dict | None = None) -> subprocess.Popen:
    """train.py with these settings, started as start() starts a command, after prefix (`timeout 300`)."""
    return start([*prefix, sys.executable, "train.py", *cli(settings)], env)


def read_until(process: subprocess.Popen, prefix: str) -> str:
    """stdout up to and including the first line that starts with prefix."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return "".join(lines)
    pytest.fail(f"ended (status {process.wait()}) before printing {prefix!r}: {process.stderr.read()[-3000:]}")


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """The rest of its stdout and stderr, once it has ended; one still running after timeout seconds has hung: its
    process group is killed and the test fails. Not communicate(timeout=...) as in run_or_fail_if_hung: it
    reads the pipes' file descriptors and would drop the lines read_until has already buffered."""
    hung = threading.Event()

    def kill():
        hung.set()
        os.killpg(process.pid, signal.SIGKILL)

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    try:
        stdout, stderr = process.stdout.read(), process.stderr.read()
        process.wait()
    finally:
        watchdog.cancel()
    if hung.is_set():
        pytest.fail(f"{process.args[:4]} hung (killed after {timeout:g} s)")
    return stdout, stderr


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.fail(
            f"{what} not found at {path}. The tests expect the project's shared/ folder beside the repo "
            f"(../shared relative to {REPO}) with owt-sample/ and tiktoken-cache/ in it."
        )
    return path


@pytest.fixture(scope="session")
def owt_jsonl() -> Path:
    return _require(SHARED / "owt-sample" / "openwebtext-500.jsonl", "The 500-document OpenWebText sample")


@pytest.fixture(scope="session", autouse=False)
def tiktoken_cache() -> Path:
    """Point tiktoken at the pre-seeded GPT-2 BPE files: no network is needed (or reachable)."""
    cache = _require(SHARED / "tiktoken-cache", "The tiktoken cache with the GPT-2 BPE files")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    SUBPROCESS_ENV["TIKTOKEN_CACHE_DIR"] = str(cache)  # scripts run as a user runs them, too
    return cache


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: on 2 cores, a second thread's synchronisation costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_byte_data(out_dir: Path, documents: list[str]) -> Path:
    """train.bin/val.bin/meta.json as prepare_openwebtext.py --tokenizer byte writes them (UTF-8 bytes, eot 256)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n_val = max(1, len(documents) // 25)
    splits = {"train": documents[:-n_val], "val": documents[-n_val:]}
    meta = {"tokenizer": "byte", "vocab_size": 257, "eot_token": 256, "dtype": "uint16", "splits": {}}
    for split, docs in splits.items():
        tokens = np.array([t for doc in docs for t in [*doc.encode("utf-8"), 256]], dtype=np.uint16)
        tokens.tofile(out_dir / f"{split}.bin")
        meta["splits"][split] = {"documents": len(docs), "tokens": len(tokens)}
    (out_dir / "meta.json").write_text(json.dumps(meta))
    return out_dir


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory, owt_jsonl) -> Path:
    documents = [json.loads(line)["text"] for line in owt_jsonl.read_text().splitlines()]
    return write_byte_data(tmp_path_factory.mktemp("byte-owt"), documents)


def tiny_settings(data_dir, out_dir, **overrides) -> dict:
    """train.py settings of a tiny model that trains in seconds; a dict, for TrainConfig(**...) or the command line.
    Use a fresh out_dir for every fresh run (train.py refuses to start one over an existing run)."""
    settings = dict(
        data_dir=str(data_dir), out_dir=str(out_dir), device="cpu", dtype="float32",
        n_layer=2, n_head=2, n_embd=32, block_size=64, batch_size=4, gradient_accumulation_steps=2,
        max_iters=8, eval_interval=4, eval_iters=2, log_interval=1,
        learning_rate=3e-3, warmup_iters=2, lr_decay_iters=100, min_lr=3e-4,
    )  # fmt: skip
    return {**settings, **overrides}


def random_hf_gpt2(path: Path, **config):
    """A random Hugging Face GPT2LMHeadModel (seed 0) saved to path, returned in eval mode. Biases and LayerNorm
    gains are random too (HF starts them at 0 and 1), so that code which drops or decays them shows."""
    import transformers

    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if param.dim() == 1:
                param.normal_(mean=1.0 if ".ln_" in name or name.startswith("transformer.ln_f") else 0.0, std=0.1)
    hf_model.save_pretrained(path)
    return hf_model
