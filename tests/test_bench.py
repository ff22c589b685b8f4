"""bench.py on CPU with tiny shapes: the rows it writes, their ratios, nanoGPT beside ours timed round-robin, the
levers, real data, out-of-memory rows, bad settings. --attention=fa4's operators: tests/test_fa4.py."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
from bench import DECODE_ROW_FIELDS, ROW_FIELDS, BenchConfig
from configurator import ConfigError, parse_config
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent
PEER = REPO.parent / "shared" / "peers" / "nanogpt"  # nanoGPT's model.py, read in place
FAST = dict(
    device="cpu", warmup_steps=1, rounds=2, block_steps=1, vocab_size=256, decode_tokens=8, decode_prompt_tokens=8,
    decode_repeats=1,
)  # fmt: skip


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
        assert row["size"] == "tiny" and row["model"] == ("sla" if row["sla"] else "plain")
        assert row["compile"] is False and row["compile_mode"] == "default" and row["compile_optimizer"] is False
        assert row["attention"] == "sdpa" and row["dtype"] == "float32" and row["round_robin"] is True
        assert row["sdpa_backend"] == "auto" and row["bias"] is False and row["data"] == "synthetic"
        assert row["timed_steps"] == 2 and row["ratio_vs_nanogpt"] is None  # 2 rounds of 1 step; no --peer
        assert 0 < row["ms_per_step_min"] <= row["ms_per_step"] <= row["ms_per_step_max"]
        assert row["ms_per_step_min"] <= row["ms_per_step_mean"] <= row["ms_per_step_max"]
        assert len(row["ms_per_step_rounds"]) == 2  # a round of 1 step: its median is that step's time
        assert sorted(row["ms_per_step_rounds"]) == [row["ms_per_step_min"], row["ms_per_step_max"]]
        tokens = row["batch_size"] * row["block_size"]
        assert row["tokens_per_s"] == pytest.approx(tokens / row["ms_per_step"] * 1000)
        assert row["mfu"] is None and row["peak_mem_gib"] is None and row["step_mem_gib"] is None  # no GPU
        assert row["first_loss"] == pytest.approx(math.log(256), abs=0.1)  # the first step's loss: about ln(vocab)
        assert 0 < row["loss"] < row["first_loss"]  # learning the one fixed batch
        assert row["decode_tokens"] == 8 and row["decode_tokens_per_s"] > 0 and row["decode_compile_s"] > 0
        assert row["decode_fresh_prompt"] is True and row["decode_prompt_tokens"] <= row["block_size"] - 8
        assert row["decode_repeats"] == 1 and row["decode_prompt_tokens_each"] == [row["decode_prompt_tokens"]]
        assert row["decode_tokens_per_s_each"] == [row["decode_tokens_per_s"]] and row["decode_profile"] is None
        model_config = GPTConfig(**bench.MODELS["tiny"], sla=row["sla"], sla_skip=row["sla_skip"] or 9)
        assert row["kv_cache_bytes_per_token"] == model_config.kv_cache_bytes_per_token(torch.float32)
        assert row["n_skip_heads"] == (3 if row["sla"] else 0)  # round(0.75 * 4 heads)
        assert row["sla_recompute_kv"] is row["sla_skip_unread_kv"] is (True if row["sla"] else None)
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
    assert "[2/2] tiny:16:1" in printed and "tiny:16:1 sla skip 1: " in printed
    assert "ratio_step_time" in printed.splitlines()[-7]


def test_rows_are_appended_one_model_at_a_time_too(tmp_path):
    out = tmp_path / "bench.jsonl"
    config = BenchConfig(
        shapes=("tiny:16:1",), sla_skips=(1,), sdpa_backend="math", round_robin=False, out=str(out),
        **{**FAST, "decode_tokens": 0},
    )  # fmt: skip
    bench.main(config)
    bench.main(config)
    rows = read_rows(out)
    assert [row["model"] for row in rows] == ["plain", "sla"] * 2
    assert all(row["sdpa_backend"] == "math" and row["round_robin"] is False for row in rows)
    assert all(row["timed_steps"] == 2 and row["ms_per_step"] > 0 for row in rows)
    assert all(row["decode_tokens_per_s"] is None and row["ratio_decode_tokens_per_s"] is None for row in rows)


def test_sla_kv_levers_reach_each_attention_layer_and_the_rows(monkeypatch):
    """--sla_recompute_kv=False and --sla_skip_unread_kv=False are the configuration of the models measured, which
    their attention modules follow, and the SLA row says so."""
    build_ours, levers = bench.build_ours, []

    def recording_build_ours(*args):
        model, step = build_ours(*args)
        assert (model.config.recompute_mixed_kv, model.config.skip_unread_kv) == (False, False)
        levers.extend({(block.attn.recompute_mixed_kv, block.attn.skip_unread_kv) for block in model.transformer.h})
        return model, step

    monkeypatch.setattr(bench, "build_ours", recording_build_ours)
    config = BenchConfig(
        shapes=("tiny:16:1",), sla_skips=(1,), sla_recompute_kv=False, sla_skip_unread_kv=False,
        **{**FAST, "decode_tokens": 0},
    )  # fmt: skip
    plain, sla = bench.main(config)
    assert levers == [(False, False), (False, False)]  # plain's layers, then SLA's
    defaults = GPT(GPTConfig(**bench.MODELS["tiny"], sla=True, sla_skip=1)).transformer.h[-1].attn
    assert defaults.recompute_mixed_kv is defaults.skip_unread_kv is True  # other models keep the defaults
    assert plain["sla_recompute_kv"] is plain["sla_skip_unread_kv"] is None
    assert sla["sla_recompute_kv"] is sla["sla_skip_unread_kv"] is False


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


def test_decode_repeats_and_profile(tmp_path, capsys):
    """Each timed generation after a prompt of a new length, the median of their speeds, then one more generation
    profiled (CPU activity only here) and summarised by phase."""
    decode_out = tmp_path / "decode.jsonl"
    config = BenchConfig(
        shapes=("tiny:64:1",), sla_skips=(9,), decode_out=str(decode_out),
        **{**FAST, "decode_tokens": 16, "decode_prompt_tokens": 20, "decode_repeats": 3, "decode_profile": True},
    )  # fmt: skip
    rows = bench.main(config)
    decode_rows = read_rows(decode_out)
    assert [row["prompt_tokens_each"] for row in decode_rows] == [[20, 21, 22], [24, 25, 26]]  # 23, 27: profiled
    assert bench.PREFILLED_LENGTHS >= {1, *range(20, 28)}
    printed = capsys.readouterr().out
    for row, decode_row in zip(rows, decode_rows, strict=True):
        assert (
            decode_row["repeats"] == 3
            and decode_row["fresh_prompt"] is True
            and decode_row["prompt_tokens"] == 20 + 4 * (row["sla"])
        )
        assert decode_row["tokens_per_s"] == statistics.median(decode_row["tokens_per_s_each"])
        assert all(value > 0 for value in decode_row["tokens_per_s_each"])
        profile = decode_row["profile"]
        phases = profile["phases"]
        assert phases["prefill"]["calls"] == 1 and phases["decode_token"]["calls"] == 15  # the first token: prefill's
        assert all(phase["host_ms"] >= 0 and phase["gpu_ms"] is None for phase in phases.values())
        assert phases["decode_token"]["host_ms"] > phases["prefill"]["host_ms"] > 0
        total_ms = sum(phase["host_ms"] for phase in phases.values())
        assert total_ms == pytest.approx(profile["wall_ms_per_token"] * 16)  # the phases add up to the wall time
        assert profile["gpu_busy_ms_per_token"] is None and profile["top_kernels"] == []
        host_ops = [op["name"] for op in profile["top_host_ops"]]
        assert "aten::mm" in host_ops and len(host_ops) == bench.DECODE_PROFILE_TOP
        label = "tiny:64:1 " + ("sla skip 9" if row["sla"] else "plain")
        assert f"  {label} decode profile:\n    16 tokens after a fresh {23 + 4 * row['sla']}-token prompt" in printed
    assert "decode_token       15" in printed and "busiest operators by host time" in printed
    assert "median of 3: " in printed


def test_busy_time_is_the_union_of_intervals():
    assert bench.busy_us([]) == 0
    assert bench.busy_us([(0, 10), (20, 25)]) == 15  # apart
    assert bench.busy_us([(20, 25), (0, 10), (5, 12), (6, 7)]) == 17  # overlapping, nested, unsorted
    assert bench.busy_us([(0, 10), (10, 20)]) == 20  # touching


def test_decode_profile_summary_with_device_events():
    """The CUDA side of the summary, from events shaped as torch.profiler's: kernels (device events) count towards
    device busy time and the top kernels, the device-side copies of the labelled ranges do not."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, start, end, device_type=DeviceType.CPU, device_ms=0.0, **extra):
        time_range = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        cpu_us = end - start if device_type == DeviceType.CPU else 0
        return SimpleNamespace(
            name=name, device_type=device_type, time_range=time_range, cpu_time_total=cpu_us,
            device_time_total=device_ms * 1000, **extra,
        )  # fmt: skip

    cuda = DeviceType.CUDA
    events = [
        event("generate", 0, 1000, device_ms=0.7),
        event("prefill", 0, 200, device_ms=0.1),
        event("decode_token", 300, 400, device_ms=0.25),
        event("decode_token", 500, 600, device_ms=0.25),
        event("decode_token", 100, 900, cuda, is_user_annotation=True),  # a range's device-side copy
        event("gemm", 150, 250, cuda),
        event("gemm", 400, 500, cuda),
        event("softmax", 450, 550, cuda),
        event("exponential", 700, 800, cuda),
    ]

    def average(key, device_type, count, device_us, cpu_us):
        return SimpleNamespace(
            key=key, device_type=device_type, count=count, self_device_time_total=device_us, self_cpu_time_total=cpu_us
        )

    averages = [
        average("gemm", cuda, 2, 200, 0),
        average("softmax", cuda, 1, 100, 0),
        average("decode_token", cuda, 2, 800, 0),
        average("aten::mm", DeviceType.CPU, 9, 0, 90),
    ]  # fmt: skip
    summary = bench.decode_profile_summary(events, averages, seconds=0.0012, new_tokens=4)
    assert summary["wall_ms_per_token"] == pytest.approx(0.3)
    assert summary["gpu_busy_ms_per_token"] == pytest.approx(0.35 / 4)  # 150-250, 400-550, 700-800
    phases = summary["phases"]
    assert phases["prefill"] == {"calls": 1, "host_ms": 0.2, "gpu_ms": 0.1}
    assert phases["decode_token"] == {"calls": 2, "host_ms": 0.2, "gpu_ms": 0.5}
    assert phases["between"]["host_ms"] == pytest.approx(0.6) and phases["between"]["gpu_ms"] == pytest.approx(0.1)
    assert phases["wait"]["host_ms"] == pytest.approx(0.2) and phases["wait"]["gpu_ms"] is None
    assert [kernel["name"] for kernel in summary["top_kernels"]] == ["gemm", "softmax"]
    assert summary["top_host_ops"] == [{"name": "aten::mm", "calls": 9, "ms": 0.09}]


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
    assert len(batches) == FAST["warmup_steps"] + FAST["rounds"] * FAST["block_steps"]
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (2, 16)
        assert torch.equal(inputs[:, 1:], (inputs[:, :-1] + 1) % 257)  # consecutive tokens of train.bin
        assert torch.equal(targets, (inputs + 1) % 257)  # and the next token of each
    assert len({inputs.numpy().tobytes() for inputs, _ in batches}) == len(batches)


def test_out_of_memory_is_recorded_and_the_run_goes_on(monkeypatch):
    build_ours = bench.build_ours

    def build_sla_out_of_memory(config, shape, sla_skip, device, autocast):
        if sla_skip == 9:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return build_ours(config, shape, sla_skip, device, autocast)

    monkeypatch.setattr(bench, "build_ours", build_sla_out_of_memory)
    plain, oom, sla = bench.main(BenchConfig(shapes=("tiny:16:1",), **FAST))
    assert plain["error"] is None and sla["error"] is None and sla["ratio_step_time"] > 0
    assert oom["error"].startswith("out of memory: CUDA out of memory")
    assert oom["ms_per_step"] is None and oom["ratio_step_time"] is None and oom["sla_skip"] == 9

    monkeypatch.setattr(bench, "build_ours", lambda *args: (_ for _ in ()).throw(RuntimeError("a bug")))
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
        (["--rounds=0"], "warmup_steps, rounds and block_steps must be >= 1"),
        (["--block_steps=0"], "warmup_steps, rounds and block_steps must be >= 1"),
        (["--peer=/no/such/nanogpt"], "peer: /no/such/nanogpt/model.py not found"),
        (["--compile_mode=fastest", "--compile"], "compile_mode must be one of default, max-autotune-no-cudagraphs"),
        (["--compile_mode=max-autotune"], "compile_mode: 'max-autotune' applies to compiled models: add --compile"),
        (["--attention=flex"], "attention must be one of auto, sdpa, fa4"),
        (["--attention=fa4", "--device=cpu"], "attention: fa4 runs on CUDA GPUs (Hopper or Blackwell) only"),
        (["--attention=fa4", "--device=cuda"], "attention: fa4 needs the flash-attn-4==4.0.0b36 package"),
        (["--device=cuda:x"], "device must be auto, cpu, cuda or cuda:N"),
        (["--decode_repeats=0"], "decode_repeats must be >= 1, got 0"),
        (["--decode_freeze_weights=True"], "decode_freeze_weights: freezes the weights into the compiled decode step"),
        (["--decode_profile", "--decode_tokens=0"], "decode_profile: profiles decoding, which decode_tokens=0 skips"),
    ],
)
def test_bad_settings_are_config_errors(argv, message, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed, also on a machine where it is
    with pytest.raises(ConfigError) as error:
        parse_config(BenchConfig, argv)
    assert message in str(error.value)


def test_command_line(tmp_path):
    out = tmp_path / "bench.jsonl"
    args = [
        "--shapes=tiny:16:1",
        "--sla_skips=1",
        "--warmup_steps=1",
        "--rounds=1",
        "--block_steps=1",
        "--vocab_size=256",
    ]
    result = subprocess.run(
        [sys.executable, "bench.py", *args, "--decode_tokens=4", "--device=cpu", f"--out={out}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [row["sla"] for row in read_rows(out)] == [False, True]
    assert "ratio_step_time" in result.stdout

    # a --peer folder without nanoGPT's model.py: one line that names it, exit status 2, no traceback
    result = subprocess.run(
        [sys.executable, "bench.py", *args, "--device=cpu", f"--peer={tmp_path / 'nanogpt'}"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: peer: {tmp_path / 'nanogpt' / 'model.py'} not found (give the folder of nanoGPT's model.py)"
    )


def test_full_logits_loss_trains_the_same_as_the_chunked_loss():
    """--loss_impl=full (nanoGPT's loss) is a speed ablation: the same model and batch must reach the same loss."""
    rows = {
        impl: bench.main(BenchConfig(shapes=("tiny:32:2",), sla_skips=(1,), loss_impl=impl, **FAST))
        for impl in ("chunked", "full")
    }
    for chunked, full in zip(rows["chunked"], rows["full"], strict=True):
        assert (chunked["loss_impl"], full["loss_impl"]) == ("chunked", "full")
        assert full["loss"] == pytest.approx(chunked["loss"], rel=1e-4)


def byte_data(folder: Path) -> Path:
    """A prepared data folder whose windows count up by one (mod 257): each batch shows where it was drawn."""
    folder.mkdir()
    (np.arange(5000) % 257).astype(np.uint16).tofile(folder / "train.bin")
    (folder / "meta.json").write_text(json.dumps({"tokenizer": "byte", "vocab_size": 257, "dtype": "uint16"}))
    return folder


def test_nanogpt_peer_timed_round_robin_on_the_same_data(tmp_path, monkeypatch):
    """--peer: nanoGPT's GPT of the same shape trains on the same batches as ours, its steps and ours interleaved in
    blocks, every other round in reverse order; ratio_vs_nanogpt is nanoGPT's ms over each row's."""
    drawn = []  # (model number, first token of the batch) in the order the batches were drawn
    sources = []
    batch_source = bench.batch_source

    def recording_batch_source(config, shape, device):
        number, batches = len(sources), batch_source(config, shape, device)
        sources.append(number)
        for inputs, targets in batches:
            drawn.append((number, inputs[0, 0].item()))
            yield inputs, targets

    monkeypatch.setattr(bench, "batch_source", recording_batch_source)
    config = BenchConfig(
        shapes=("tiny:16:2",), sla_skips=(9,), peer=str(PEER), data=str(byte_data(tmp_path / "data")),
        **{**FAST, "vocab_size": 320, "warmup_steps": 2, "rounds": 2, "block_steps": 3, "decode_tokens": 0},
    )  # fmt: skip
    plain, nanogpt, sla = bench.main(config)

    assert [row["model"] for row in (plain, nanogpt, sla)] == ["plain", "nanogpt", "sla"]
    assert (nanogpt["sla"], nanogpt["sla_skip"], nanogpt["loss_impl"], nanogpt["size"]) == (False, None, "full", "tiny")
    assert nanogpt["n_params"] == plain["n_params"]  # the same network
    for row in (plain, nanogpt, sla):
        assert row["error"] is None and row["timed_steps"] == 2 * 3
        assert row["ratio_vs_nanogpt"] == nanogpt["ms_per_step"] / row["ms_per_step"]
        assert row["first_loss"] == pytest.approx(math.log(320), abs=0.1)  # untrained: about ln(vocab)
        assert row["loss"] < row["first_loss"] - 0.02  # and 2 + 6 steps of AdamW later, lower: it trains
    assert nanogpt["ratio_vs_nanogpt"] == 1.0 and nanogpt["decode_tokens_per_s"] is None
    # same seed, same initialisation order, same first batch: nanoGPT's first loss is our plain model's
    assert nanogpt["first_loss"] == pytest.approx(plain["first_loss"], rel=1e-5)

    # each model draws the same batches (one ahead, as train.py), warm-up one model after another, then the rounds,
    # every other one in reverse order (round_orders: clock drift hits all models alike)
    per_model = [[token for number, token in drawn if number == model] for model in range(3)]
    assert per_model[0] == per_model[1] == per_model[2] and len(per_model[0]) == 1 + 2 + 2 * 3
    assert len(set(per_model[0])) > 1  # drawn anew each step
    order = [number for number, _ in drawn]
    warm_up = [0] * 3 + [1] * 3 + [2] * 3
    assert order == warm_up + [0] * 3 + [1] * 3 + [2] * 3 + [2] * 3 + [1] * 3 + [0] * 3


def test_levers_reach_our_models_only(monkeypatch):
    """--compile_mode, --compile_optimizer and --sdpa_backend change our models' steps; nanoGPT's stays as published."""
    compiled = []  # (what, mode)

    def recording_compile(target, mode=None, **kwargs):
        compiled.append((type(target).__module__ if isinstance(target, torch.nn.Module) else target.__name__, mode))
        return target  # run eagerly: this test checks where the levers go, test_compiled_levers that they compile

    sdpa_calls = []  # (file the call came from, the SDPA backends enabled then)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        caller = Path(sys._getframe(1).f_code.co_filename).resolve()
        sdpa_calls.append((caller, torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    config = BenchConfig(
        shapes=("tiny:16:1",), sla_skips=(9,), peer=str(PEER), compile=True, compile_mode="max-autotune",
        compile_optimizer=True, sdpa_backend="math", **{**FAST, "decode_tokens": 0},
    )  # fmt: skip
    plain, nanogpt, sla = bench.main(config)
    assert compiled == [
        ("model", "max-autotune"), ("clip_and_step", None), ("nanogpt_peer_model", None),
        ("model", "max-autotune"), ("clip_and_step", None),
    ]  # fmt: skip
    for row in (plain, sla):
        assert (row["compile_mode"], row["compile_optimizer"], row["sdpa_backend"]) == ("max-autotune", True, "math")
    assert (nanogpt["compile_mode"], nanogpt["compile_optimizer"], nanogpt["sdpa_backend"]) == (
        "default",
        False,
        "auto",
    )
    assert {(caller == REPO / "model.py", flash, math_) for caller, flash, math_ in sdpa_calls} == {
        (True, False, True),  # ours: the math backend alone
        (False, True, True),  # nanoGPT's: PyTorch's choice, as published
    }
    assert all(caller in (REPO / "model.py", PEER.resolve() / "model.py") for caller, _, _ in sdpa_calls)


def test_compiled_levers():
    """On the CPU too, a compiled model with max-autotune's mode and a compiled optimizer step trains and gets a row."""
    (row,) = bench.main(
        BenchConfig(
            shapes=("tiny:16:1",),
            sla_skips=(),
            compile=True,
            compile_mode="max-autotune-no-cudagraphs",
            compile_optimizer=True,
            **{**FAST, "warmup_steps": 2, "decode_tokens": 0},
        )
    )
    assert row["error"] is None and row["compile"] is True and row["compile_optimizer"] is True
    assert row["compile_mode"] == "max-autotune-no-cudagraphs" and row["timed_steps"] == 2
    assert row["first_loss"] == pytest.approx(math.log(256), abs=0.1) and row["loss"] < row["first_loss"]


def test_decode_freezes_the_weights_when_compiled_unless_told_not_to():
    assert BenchConfig(compile=True).decode_freeze_weights is True
    assert BenchConfig(compile=True, decode_freeze_weights=False).decode_freeze_weights is False
    assert BenchConfig().decode_freeze_weights is False  # eager: nothing to freeze into
