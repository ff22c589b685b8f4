"""sample.py on tiny checkpoints made here (byte tokenizer), a tiny random Hugging Face GPT-2, and a train.py run."""

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
from configurator import ConfigError, parse_config
from model import GPT, GPTConfig
from sample import SampleConfig, SampleError

REPO = Path(__file__).resolve().parent.parent
BYTE_META = {"tokenizer": "byte", "vocab_size": 257, "eot_token": 256, "dtype": "uint16"}


def save_checkpoint(out_dir: Path, meta=BYTE_META, key_prefix="", **model_args) -> Path:
    """A checkpoint in train.py's format (its save()) of an untrained tiny model; vocab padded as train.py pads."""
    args = dict(block_size=32, vocab_size=320, n_layer=3, n_head=4, n_embd=32, sla=True, sla_skip=1)
    args.update(model_args)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "model": {key_prefix + key: value for key, value in model.state_dict().items()},
        "optimizer": {},
        "model_args": asdict(model.config),
        "config": {"out_dir": str(out_dir)},
        "iter_num": 0,
        "tokens_seen": 0,
        "best_val_loss": float("inf"),
        "meta": meta,
        "rng": {},
    }
    torch.save(checkpoint, out_dir / "ckpt.pt")
    return out_dir


def config(out_dir: Path, **overrides) -> SampleConfig:
    args = dict(out_dir=str(out_dir), device="cpu", num_samples=2, max_new_tokens=24, temperature=1.0, top_k=None)
    return SampleConfig(**{**args, **overrides})


def test_samples_continue_the_prompt_and_the_seed_decides_them(tmp_path, capsys):
    out_dir = save_checkpoint(tmp_path / "run")
    first = sample.main(config(out_dir, start="Hello", seed=1))
    assert len(first) == 2 and all(text.startswith("Hello") and len(text) > len("Hello") for text in first)
    assert first[0] != first[1]  # one generator runs on from sample to sample
    assert sample.main(config(out_dir, start="Hello", seed=1)) == first
    assert sample.main(config(out_dir, start="Hello", seed=2)) != first
    printed = capsys.readouterr()
    assert first[0] in printed.out and "-" * 80 in printed.out and "tokens/s" not in printed.out
    assert "tokens/s" in printed.err and "eager decode step" in printed.err  # statistics go to stderr


def test_compiled_decode_step_gives_the_same_samples_and_reports_compilation_apart(tmp_path, capsys, monkeypatch):
    """--compile freezes the weights into the decode step unless --freeze_weights=False; the same samples either way."""
    frozen = []  # freeze_weights of each compile_decode_step call
    compile_decode_step = GPT.compile_decode_step

    def recording(model, *args, freeze_weights=False, **kwargs):
        frozen.append(freeze_weights)
        return compile_decode_step(model, *args, freeze_weights=freeze_weights, **kwargs)

    monkeypatch.setattr(GPT, "compile_decode_step", recording)
    out_dir = save_checkpoint(tmp_path / "run", block_size=64)
    eager = sample.main(config(out_dir, start="Hello", seed=1, max_new_tokens=40))
    capsys.readouterr()
    assert sample.main(config(out_dir, start="Hello", seed=1, max_new_tokens=40, compile=True)) == eager
    printed = capsys.readouterr()
    assert re.search(r"decode step compiled in \d+\.\d s \(once per process\)", printed.err)
    assert re.search(r"80 tokens in \d+\.\d\d s: [\d.]+ tokens/s.*compiled decode step", printed.err)
    assert printed.out.count("Hello") == 2 and "tokens/s" not in printed.out
    unfrozen = config(out_dir, start="Hello", seed=1, max_new_tokens=40, compile=True, freeze_weights=False)
    assert sample.main(unfrozen) == eager
    assert frozen == [True, False]


def test_padding_ids_are_never_sampled(tmp_path):
    # an untrained model with train.py's padded vocabulary (320 > 257 bytes) would sample ids the byte
    # tokenizer cannot decode in almost every sample of 200 tokens
    out_dir = save_checkpoint(tmp_path / "run", block_size=256)
    samples = sample.main(config(out_dir, num_samples=3, max_new_tokens=200))
    assert len(samples) == 3


def test_prompt_from_file_and_compiled_prefix_stripped(tmp_path):
    out_dir = save_checkpoint(tmp_path / "run", key_prefix="_orig_mod.")
    (tmp_path / "prompt.txt").write_text("def main():\n", encoding="utf-8")
    (text,) = sample.main(config(out_dir, start=f"FILE:{tmp_path / 'prompt.txt'}", num_samples=1))
    assert text.startswith("def main():\n")


def test_greedy_is_deterministic_and_sla_flags_matching_the_checkpoint_are_fine(tmp_path):
    out_dir = save_checkpoint(tmp_path / "run", sla_skip=2)
    greedy = config(out_dir, start="ab", temperature=0.0, sla=True, sla_skip=2, sla_head_ratio=0.75)
    first, second = sample.main(greedy)
    assert first == second


@pytest.mark.parametrize(
    "checkpoint_args, overrides, message",
    [
        (dict(), dict(start="x" * 33), "prompt is 33 tokens, longer than the model's block_size of 32"),
        (dict(), dict(start="FILE:/no/such/prompt.txt"), "prompt file /no/such/prompt.txt not found"),
        (dict(meta={**BYTE_META, "tokenizer": "sentencepiece"}), dict(), "tokenizer 'sentencepiece'"),
        (dict(sla=False), dict(sla=True), "--sla=True differs from the checkpoint's sla=False"),
        (dict(sla=True), dict(sla=False), "--sla=False differs from the checkpoint's sla=True"),
        (dict(), dict(start="FILE:/bin/sh"), "prompt file /bin/sh (from --start=FILE:/bin/sh) is not UTF-8 text"),
        (dict(sla_skip=1), dict(sla_skip=2), "--sla_skip=2 differs from the checkpoint's sla_skip=1"),
        (dict(), dict(sla_head_ratio=0.5), "--sla_head_ratio=0.5 differs"),
    ],
)
def test_clear_errors(tmp_path, checkpoint_args, overrides, message):
    out_dir = save_checkpoint(tmp_path / "run", **checkpoint_args)
    with pytest.raises(SampleError, match=re.escape(message)):
        sample.main(config(out_dir, **overrides))


def test_missing_checkpoint_is_a_clear_error_on_the_command_line(tmp_path):
    missing = tmp_path / "never-trained"
    result = subprocess.run(
        [sys.executable, "sample.py", f"--out_dir={missing}", "--device=cpu"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: no checkpoint at {missing / 'ckpt.pt'}")
    assert "train one first" in result.stderr and "--out_dir" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def tiny_hf_gpt2(tmp_path) -> Path:
    """A random 3-layer GPT-2 with GPT-2's vocabulary, saved as a Hugging Face directory."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=32, n_positions=64, vocab_size=50257)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_gpt2_weights_with_sla(tiny_hf_gpt2, tiktoken_cache, capsys):
    sla_config = config(tiny_hf_gpt2, init_from=str(tiny_hf_gpt2), sla=True, sla_skip=1, start="The cat")
    model = sample.load_pretrained_model(sla_config)
    assert model.config.sla and model.config.sla_skip == 1 and model.config.n_skip_heads == 3
    samples = sample.main(sla_config)
    assert len(samples) == 2 and all(text.startswith("The cat") for text in samples)
    assert "tokens/s" in capsys.readouterr().err

    with pytest.raises(SampleError, match="--sla_skip without --sla would change nothing"):
        sample.main(config(tiny_hf_gpt2, init_from=str(tiny_hf_gpt2), sla_skip=1))


def test_checkpoint_trained_by_train_py(tmp_path):
    train = pytest.importorskip("train")
    # a byte corpus: a repeated sentence, so that 20 steps learn something of it
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tokens = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 200, dtype=np.uint8).astype(np.uint16)
    tokens.tofile(data_dir / "train.bin")
    tokens[:2000].tofile(data_dir / "val.bin")
    (data_dir / "meta.json").write_text(json.dumps(BYTE_META))
    train_config = train.TrainConfig(
        data_dir=str(data_dir), out_dir=str(tmp_path / "out"), device="cpu", n_layer=3, n_head=4, n_embd=32,
        block_size=32, batch_size=8, gradient_accumulation_steps=1, max_iters=20, eval_interval=20, eval_iters=2,
        learning_rate=1e-2, warmup_iters=2, lr_decay_iters=20, sla=True, sla_skip=1,
    )  # fmt: skip
    train.main(train_config)

    (text,) = sample.main(config(tmp_path / "out", start="the quick", num_samples=1, temperature=0.0))
    assert text.startswith("the quick") and len(text) == len("the quick") + 24


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--top_k=0"], "top_k must be >= 1"),
        (["--top_k=-1"], "top_k must be >= 1"),
        (["--temperature=1e-45"], "temperature must be 0 (greedy) or >= 1e-06"),
        (["--temperature=-1"], "temperature must be 0 (greedy) or >= 1e-06"),
        (["--temperature=nan"], "temperature must be 0 (greedy) or >= 1e-06"),
        (["--device=gpu"], "device must be auto, cpu, cuda or cuda:N"),
        (["--freeze_weights=True"], "freeze_weights: freezes the weights into the compiled decode step: add --compile"),
    ],
)
def test_bad_values_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(SampleConfig, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_config_error_on_the_command_line(tmp_path):
    result = run_sample(f"--out_dir={save_checkpoint(tmp_path / 'run')}", "--device=cuda")
    assert result.returncode == 2
    assert result.stderr == "error: device 'cuda', but torch sees no CUDA GPU: use --device=cpu (or auto)\n"


def run_sample(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "sample.py", *args], cwd=REPO, capture_output=True, text=True, env=env)


def test_damaged_checkpoint_is_one_error_line(tmp_path):
    out_dir = save_checkpoint(tmp_path / "run")
    data = (out_dir / "ckpt.pt").read_bytes()
    (out_dir / "ckpt.pt").write_bytes(data[: len(data) // 2])
    result = run_sample(f"--out_dir={out_dir}", "--device=cpu")
    assert result.returncode == 1
    assert result.stderr == (
        f"error: {out_dir / 'ckpt.pt'} is damaged or cut off (a full disk, a killed copy?): restore it from a copy, "
        f"or train again (not a complete torch.save archive)\n"
    )
    assert result.stdout == ""


def test_freeze_weights_follows_compile_unless_given(tmp_path):
    assert config(tmp_path, compile=True).freeze_weights is True
    assert config(tmp_path, compile=True, freeze_weights=False).freeze_weights is False
    assert config(tmp_path).freeze_weights is False
