"""bench.py on CPU with tiny shapes: the rows it writes, their ratios, real data, out-of-memory rows, bad settings."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
from bench import DECODE_ROW_FIELDS, ROW_FIELDS, BenchConfig
from configurator import ConfigError, parse_config
from model import GPTConfig

REPO = Path(__file__).resolve().parent.parent
FAST = dict(device="cpu", warmup_steps=1, timed_steps=2, vocab_size=256, decode_tokens=8, decode_prompt_tokens=8)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(autouse=True)
def no_prompt_lengths_prefilled_yet(monkeypatch):
    """Each test starts as a fresh process would: no prompt length seen by an earlier test's decode."""
    monkeypatch.setattr(bench, "PREFILLED_LENGTHS", set())


def test_two_shapes_plain_then_each_sla_skip(tmp_path, capsys):
    out = tmp_path / "results" / "bench.jsonl"
    returned = bench.main(BenchConfig(shapes=("tiny:32:2", "tiny:16:1"), out=str(out), **FAST))
    rows = read_rows(out)
    assert rows == returned and len(rows) == 6
    assert [(row["shape"], row["sla"], row["sla_skip"]) for row in rows] == [
        ("tiny:32:2", False, None), ("tiny:32:2", True, 9), ("tiny:32:2", True, 1),
        ("tiny:16:1", False, None), ("tiny:16:1", True, 9), ("tiny:16:1", True, 1),
    ]  # fmt: skip
    for row in rows:
        assert list(row) == list(ROW_FIELDS)
        assert row["gpu"] == "cpu" and row["torch"] == torch.__version__ and row["error"] is None
        assert row["model"] == "tiny" and row["compile"] is False and row["dtype"] == "float32"
        assert row["sdpa_backend"] == "auto" and row["bias"] is False and row["data"] == "synthetic"
        assert 0 < row["ms_per_step_min"] <= row["ms_per_step"] <= row["ms_per_step_max"]
        assert row["ms_per_step_min"] <= row["ms_per_step_mean"] <= row["ms_per_step_max"]
        tokens = row["batch_size"] * row["block_size"]
        assert row["tokens_per_s"] == pytest.approx(tokens / row["ms_per_step"] * 1000)
        assert row["mfu"] is None and row["peak_mem_gib"] is None  # no GPU
        assert 0 < row["loss"] < math.log(256) + 0.5  # from about ln(vocab), learning the one fixed batch
        assert row["decode_tokens"] == 8 and row["decode_tokens_per_s"] > 0 and row["decode_compile_s"] > 0
        assert row["decode_fresh_prompt"] is True and row["decode_prompt_tokens"] <= row["block_size"] - 8
        model_config = GPTConfig(**bench.MODELS["tiny"], sla=row["sla"], sla_skip=row["sla_skip"] or 9)
        assert row["kv_cache_bytes_per_token"] == model_config.kv_cache_bytes_per_token(torch.float32)
        assert row["n_skip_heads"] == (3 if row["sla"] else 0)  # round(0.75 * 4 heads)
        if row["sla"]:
            assert row["sla_head_ratio"] == 0.75
            assert row["ratio_step_time"] > 0 and row["ratio_decode_tokens_per_s"] > 0
            assert row["ratio_peak_mem"] is None  # no GPU memory to compare
            # 12 layers of 4 heads, 3 skip heads: skip 9 caches no own K/V of heads 0-2 in layers 9-11, skip 1 in 11
            assert row["ratio_kv_cache_bytes"] == {9: 39 / 48, 1: 45 / 48}[row["sla_skip"]]
        else:
            assert row["sla_head_ratio"] is None and row["ratio_step_time"] is None
    # every model decodes after a prompt length the process had not prefilled: 8 up, then down where 16 tokens end
    assert [row["decode_prompt_tokens"] for row in rows] == [8, 9, 10, 7, 6, 5]
    plain, sla = rows[0], rows[1]
    assert sla["ratio_step_time"] == pytest.approx(sla["ms_per_step"] / plain["ms_per_step"])
    assert plain["n_params"] == sla["n_params"]  # SLA adds no parameters
    printed = capsys.readouterr().out
    assert "[6/6] tiny:16:1 SLA skip 1" in printed and "ratio_step_time" in printed.splitlines()[-7]


def test_repeat_alternates_and_rows_are_appended(tmp_path):
    out = tmp_path / "bench.jsonl"
    config = BenchConfig(
        shapes=("tiny:16:1",), sla_skips=(1,), repeat=2, sdpa_backend="math", out=str(out),
        **{**FAST, "decode_tokens": 0},
    )  # fmt: skip
    bench.main(config)
    bench.main(config)
    rows = read_rows(out)
    assert [(row["repeat"], row["sla"]) for row in rows] == [(0, False), (0, True), (1, False), (1, True)] * 2
    assert all(row["sdpa_backend"] == "math" for row in rows)
    assert all(row["decode_tokens_per_s"] is None and row["ratio_decode_tokens_per_s"] is None for row in rows)


def test_decode_rows(tmp_path):
    out, decode_out = tmp_path / "bench.jsonl", tmp_path / "decode.jsonl"
    config = BenchConfig(
        shapes=("tiny:64:1",), sla_skips=(9, 1), out=str(out), decode_out=str(decode_out),
        **{**FAST, "decode_tokens": 32, "decode_prompt_tokens": 20},
    )  # fmt: skip
    bench.main(config)
    rows, decode_rows = read_rows(out), read_rows(decode_out)
    assert len(decode_rows) == 3
    for row, decode_row in zip(rows, decode_rows, strict=True):
        assert list(decode_row) == list(DECODE_ROW_FIELDS)
        assert decode_row == {name: row[key] for name, key in DECODE_ROW_FIELDS.items()}
        assert decode_row["gpu"] == "cpu" and decode_row["block_size"] == 64 and decode_row["new_tokens"] == 32
        assert decode_row["fresh_prompt"] is True and decode_row["tokens_per_s"] > 0 and decode_row["compile_s"] > 0
        model_config = GPTConfig(**bench.MODELS["tiny"], sla=decode_row["sla"], sla_skip=decode_row["sla_skip"] or 9)
        assert decode_row["kv_cache_bytes_per_token"] == model_config.kv_cache_bytes_per_token(torch.float32)
    assert [row["prompt_tokens"] for row in decode_rows] == [20, 21, 22]
    assert [(row["sla"], row["sla_skip"], row["ratio_kv_cache_bytes"]) for row in decode_rows] == [
        (False, None, None), (True, 9, 39 / 48), (True, 1, 45 / 48),
    ]  # fmt: skip

    # where every prompt length that fits was prefilled before, the row says so
    bench.main(
        BenchConfig(shapes=("tiny:16:1",), sla_skips=(1,), decode_out=str(decode_out), **{**FAST, "decode_tokens": 14})
    )
    assert [(row["prompt_tokens"], row["fresh_prompt"]) for row in read_rows(decode_out)[3:]] == [(2, True), (2, False)]


def test_real_data_folder(tmp_path, monkeypatch):
    """With --data, every training batch is a set of windows of train.bin, drawn anew each step."""
    data = tmp_path / "data"
    data.mkdir()
    (np.arange(5000) % 257).astype(np.uint16).tofile(data / "train.bin")  # each window counts up by one (mod 257)
    (data / "meta.json").write_text(json.dumps({"tokenizer": "byte", "vocab_size": 257, "dtype": "uint16"}))
    batches = []

    class RecordingGPT(bench.GPT):
        def forward(self, idx, targets=None, *args, **kwargs):
            if targets is not None:
                batches.append((idx.clone(), targets.clone()))
            return super().forward(idx, targets, *args, **kwargs)

    monkeypatch.setattr(bench, "GPT", RecordingGPT)
    (row,) = bench.main(BenchConfig(shapes=("tiny:16:2",), sla_skips=(), data=str(data), **{**FAST, "vocab_size": 320}))
    assert row["data"] == str(data) and row["ms_per_step"] > 0 and math.isfinite(row["loss"])
    assert len(batches) == FAST["warmup_steps"] + FAST["timed_steps"]
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (2, 16)
        assert torch.equal(inputs[:, 1:], (inputs[:, :-1] + 1) % 257)  # consecutive tokens of train.bin
        assert torch.equal(targets, (inputs + 1) % 257)  # and the next token of each
    assert len({inputs.numpy().tobytes() for inputs, _ in batches}) == len(batches)


def test_out_of_memory_is_recorded_and_the_run_goes_on(monkeypatch):
    measure = bench.measure

    def measure_sla_out_of_memory(config, shape, sla_skip, device, dtype):
        if sla_skip == 9:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return measure(config, shape, sla_skip, device, dtype)

    monkeypatch.setattr(bench, "measure", measure_sla_out_of_memory)
    plain, oom, sla = bench.main(BenchConfig(shapes=("tiny:16:1",), **FAST))
    assert plain["error"] is None and sla["error"] is None and sla["ratio_step_time"] > 0
    assert oom["error"].startswith("out of memory: CUDA out of memory")
    assert oom["ms_per_step"] is None and oom["ratio_step_time"] is None and oom["sla_skip"] == 9

    monkeypatch.setattr(bench, "measure", lambda *args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # anything but running out of memory is not swallowed
        bench.main(BenchConfig(shapes=("tiny:16:1",), **FAST))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shapes=huge:1024:1"], "'huge:1024:1' is not model:block_size:batch_size"),
        (["--shapes=small:1024"], "'small:1024' is not model:block_size:batch_size"),
        (["--shapes=tiny:64:2", "--sla_skips=12"], "sla_skips: 12 must be in [1, 12)"),
        (["--sla_head_ratio=0.01"], "sla_head_ratio: 0.01 of small's 12 heads is 0 heads"),
        (["--sdpa_backend=fast"], "sdpa_backend must be auto or one of"),
        (["--data=/no/such/data"], "data: /no/such/data/train.bin not found"),
        (["--timed_steps=0"], "timed_steps"),
        (["--device=cuda:x"], "device must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_settings_are_config_errors(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_config(BenchConfig, argv)
    assert message in str(error.value)


def test_command_line(tmp_path):
    out = tmp_path / "bench.jsonl"
    args = ["--shapes=tiny:16:1", "--sla_skips=1", "--warmup_steps=0", "--timed_steps=1", "--vocab_size=256"]
    result = subprocess.run(
        [sys.executable, "bench.py", *args, "--decode_tokens=4", "--device=cpu", f"--out={out}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [row["sla"] for row in read_rows(out)] == [False, True]
    assert "ratio_step_time" in result.stdout


def test_full_logits_loss_trains_the_same_as_the_chunked_loss():
    """--loss_impl=full (nanoGPT's loss) is a speed ablation: the same model and batch must reach the same loss."""
    rows = {
        impl: bench.main(BenchConfig(shapes=("tiny:32:2",), sla_skips=(1,), loss_impl=impl, **FAST))
        for impl in ("chunked", "full")
    }
    for chunked, full in zip(rows["chunked"], rows["full"], strict=True):
        assert (chunked["loss_impl"], full["loss_impl"]) == ("chunked", "full")
        assert full["loss"] == pytest.approx(chunked["loss"], rel=1e-4)
