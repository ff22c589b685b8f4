"""
Training-step time, peak memory and decode speed of plain GPT-2, its SLA variants and (--peer) nanoGPT's model.py,
measured side by side in one process.

    python bench.py --shapes=tiny:64:2 --device=cpu                                     # a quick CPU check
    python bench.py --peer=../nanoGPT --shapes=small:4096:4,medium:8192:1 --compile --sla_skips=9 \
        --out=results/speed/bench-sdpa-vs-nanogpt-h100.jsonl

A shape is model:block_size:batch_size with model one of MODELS. For each shape the plain model, nanoGPT's GPT
(--peer=DIR: DIR/model.py loaded by path, built with the same shape, bias and vocabulary, dropout 0) and one SLA model
per --sla_skips entry are built and warmed up (the first step compiles with --compile), then timed round-robin: --rounds
rounds, each running --block_steps steps of every model in turn, so that clock drift and heat hit all of them alike. All
models of a shape are alive together (--round_robin=False builds, times and frees them one at a time, for shapes whose
models do not fit on the device together). Every model runs train.py's training step, the function train.make_train_step
makes (no copy of it here), with one micro-step: autocast, forward with targets (ours: the memory-lean loss,
--loss_impl=full: nanoGPT's whole-logits loss; nanoGPT: its own forward), the next batch drawn, backward, the loss sent
to the host, gradient clipping at 1.0, AdamW (fused on CUDA; nanoGPT's own configure_optimizers),
zero_grad(set_to_none=True), then a wait for the step before and its loss checked. The steps of a block run back to
back; on CUDA each step's time is the interval between CUDA events recorded at its start and end. A row reports the
median (and mean) over all rounds*block_steps timed steps, tokens/s, MFU, peak memory (the model's own resident memory
plus the most its steps allocated above what was allocated before its block) and ratio_vs_nanogpt (nanoGPT's ms / the
row's ms). The levers --compile_mode, --compile_optimizer, --sdpa_backend and --attention apply to our models only;
nanoGPT runs as published (compiled with torch.compile's defaults under --compile).

Decode speed (our models) is model.generate with the static KV cache (its decode step compiled with --compile),
batch 1: --decode_tokens new tokens after a prompt of a length this process has not prefilled before
(--decode_prompt_tokens, or the next unused length), prefill included, timed after a warm-up generation whose time is
reported apart (compile_s). --decode_repeats generations, each after a prompt of a new length, give the median
tokens/s and each one's. --decode_profile profiles one more such generation (torch.profiler, CPU and CUDA activity)
and prints where its time goes: prefill, the decode steps, the work between them, the busiest kernels and operators.
The rows of a shape are printed and appended to --out as JSON lines once it is measured,
so several runs can fill one file; --decode_out gets the decode rows alone (DECODE_ROW_FIELDS). A table ends the run.
A model that runs out of memory gets a row with "error" and the run goes on without it.
"""

import dataclasses
import gc
import importlib.util
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch
import torch._dynamo
from torch import nn
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel

from configurator import (
    CUDA_GRAPH_MODES,
    autocast_context,
    check_compile_mode,
    check_device,
    check_dtype,
    describe_provenance,
    parse_cli,
    provenance,
    resolve_device,
    resolve_dtype,
    resolve_freeze_weights,
)
from fa4 import check_attention, resolve_attention
from model import GPT, GPTConfig
from train import load_meta, make_train_step, open_tokens, windows_to_tensor

# GPT-2's sizes, and a CPU-sized model with GPT-2's 12 layers, so that every skip distance up to 11 applies
MODELS = {
    "tiny": dict(n_layer=12, n_head=4, n_embd=64),
    "small": dict(n_layer=12, n_head=12, n_embd=768),
    "medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "large": dict(n_layer=36, n_head=20, n_embd=1280),
    "xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


# Every JSON line has these keys, in this order (None where a value does not apply or was not measured).
ROW_FIELDS = (
    # what was measured
    "gpu", "torch", "shape", "size", "model", "block_size", "batch_size", "sla", "sla_skip", "sla_head_ratio",
    "n_skip_heads", "sla_recompute_kv", "sla_skip_unread_kv", "compile", "compile_mode", "compile_optimizer",
    "attention", "dtype", "sdpa_backend", "loss_impl", "data", "vocab_size", "bias", "round_robin", "warmup_steps",
    "rounds", "block_steps", "n_params",
    # training steps
    "ms_per_step", "ms_per_step_mean", "ms_per_step_min", "ms_per_step_max", "ms_per_step_rounds", "timed_steps",
    "first_step_s",
    "tokens_per_s", "mfu", "peak_mem_gib", "step_mem_gib", "first_loss", "loss",
    # KV-cache decoding (our models)
    "decode_prompt_tokens", "decode_fresh_prompt", "decode_tokens", "decode_tokens_per_s", "decode_compile_s",
    "kv_cache_bytes_per_token", "decode_repeats", "decode_prompt_tokens_each", "decode_tokens_per_s_each",
    "decode_profile", "decode_freeze_weights",
    # against nanoGPT (--peer) of the same shape: its ms/step over this row's
    "ratio_vs_nanogpt",
    # SLA rows: SLA / plain of the same shape
    "ratio_step_time", "ratio_peak_mem", "ratio_decode_tokens_per_s", "ratio_kv_cache_bytes",
    "error",
    # configurator.provenance: the code (git commit), torch, CUDA, device and kernel packages the row was measured with
    "provenance",
)  # fmt: skip
# The rows of --decode_out: a training row's decode measurement under the names of RESULTS.md's decoding table.
DECODE_ROW_FIELDS = {
    "gpu": "gpu", "torch": "torch", "shape": "shape", "size": "size", "model": "model", "block_size": "block_size",
    "sla": "sla", "sla_skip": "sla_skip", "sla_head_ratio": "sla_head_ratio", "n_skip_heads": "n_skip_heads",
    "compile": "compile", "dtype": "dtype", "sdpa_backend": "sdpa_backend", "attention": "attention",
    "prompt_tokens": "decode_prompt_tokens", "fresh_prompt": "decode_fresh_prompt", "new_tokens": "decode_tokens",
    "tokens_per_s": "decode_tokens_per_s", "compile_s": "decode_compile_s",
    "kv_cache_bytes_per_token": "kv_cache_bytes_per_token", "ratio_tokens_per_s": "ratio_decode_tokens_per_s",
    "ratio_kv_cache_bytes": "ratio_kv_cache_bytes", "repeats": "decode_repeats",
    "prompt_tokens_each": "decode_prompt_tokens_each", "tokens_per_s_each": "decode_tokens_per_s_each",
    "profile": "decode_profile", "freeze_weights": "decode_freeze_weights", "error": "error",
}  # fmt: skip


class Shape(NamedTuple):
    name: str  # as given, e.g. "small:8192:2"
    size: str  # a key of MODELS
    block_size: int
    batch_size: int


def parse_shape(text: str) -> Shape:
    size, *numbers = text.split(":")
    if size not in MODELS or len(numbers) != 2 or not all(n.isdigit() and int(n) > 0 for n in numbers):
        raise ValueError(f"shapes: {text!r} is not model:block_size:batch_size with model one of {sorted(MODELS)}")
    return Shape(text, size, int(numbers[0]), int(numbers[1]))


@dataclass
class BenchConfig:
    # the shapes of our configs at one micro-step, and GPT-2 small at 1K x 16 for the comparison with nanoGPT
    shapes: tuple[str, ...] = (
        "small:1024:16", "small:4096:4", "small:8192:2", "small:16384:1", "medium:8192:1", "medium:16384:1",
    )  # fmt: skip
    sla_skips: tuple[int, ...] = (9, 1)  # one SLA model per skip distance; () measures the plain model alone
    sla_head_ratio: float = 0.75
    sla_recompute_kv: bool = True  # False: SLA layers keep their mixed K/V for backward (more memory, less copying)
    sla_skip_unread_kv: bool = True  # False: SLA layers compute the K/V that nobody reads, as before, to measure it
    peer: str = ""  # a folder holding nanoGPT's model.py: its GPT is measured beside ours; '' measures ours alone
    compile: bool = False  # torch.compile every model
    # levers, for our models only (nanoGPT runs as published):
    compile_mode: str = "default"  # torch.compile's mode (configurator.COMPILE_MODES; needs --compile unless default)
    compile_optimizer: bool = False  # compile clipping + AdamW's step (AdamW then not fused), as train.py's
    sdpa_backend: str = "auto"  # 'auto' (PyTorch picks) | 'flash' | 'cudnn' | 'efficient' | 'math'
    # 'auto' | 'sdpa' | 'fa4': FlashAttention-4 (CUDA, Hopper/Blackwell) for causal attention; auto as train.py's
    attention: str = "auto"
    warmup_steps: int = 5  # untimed steps per model before the rounds; the first one compiles
    rounds: int = 4  # rounds of timed blocks
    block_steps: int = 15  # steps per model per round
    round_robin: bool = True  # False: one model at a time (built, warmed up, timed, freed), for tight memory
    data: str = "synthetic"  # 'synthetic' (one fixed random batch) | a folder with train.bin and meta.json
    device: str = "auto"  # 'auto' (cuda if available) | 'cpu' | 'cuda' | 'cuda:N'
    dtype: str = "auto"  # 'auto' (bfloat16 on CUDA, float16 if unsupported; float32 on CPU) | 'bfloat16' | ...
    # 'chunked': train.py's memory-lean loss; 'full': the whole logits tensor and one cross-entropy, as nanoGPT
    loss_impl: str = "chunked"
    bias: bool = False  # as nanoGPT's benchmark measured GPT-2
    vocab_size: int = 50304
    decode_tokens: int = 256  # new tokens of the decode measurement (fewer if block_size is short); 0 skips it
    decode_prompt_tokens: int = 128  # or the next length this process has not prefilled yet
    decode_repeats: int = 3  # timed generations, each after a prompt of a new length; the row gives their median
    decode_profile: bool = False  # profile one more generation and print where its time goes
    # compile the decode step with the weights as constants (GPT.compile_decode_step(freeze_weights=True)): autocast
    # casts them once, not per token (1.5x the tokens/s on an H100); None: with --compile
    decode_freeze_weights: bool | None = None
    seed: int = 0
    profile_steps: int = 0  # > 0: after timing, profile this many more steps per model and print the busiest kernels
    out: str = ""  # JSON-lines file the rows are appended to; '' prints only
    decode_out: str = ""  # JSON-lines file the decode rows (DECODE_ROW_FIELDS) are appended to; '' writes none

    def __post_init__(self):
        shapes = [parse_shape(text) for text in self.shapes]
        if not shapes:
            raise ValueError("shapes: give at least one model:block_size:batch_size")
        for shape in shapes:
            n_layer, n_head = MODELS[shape.size]["n_layer"], MODELS[shape.size]["n_head"]
            for skip in self.sla_skips:
                if not 1 <= skip < n_layer:
                    raise ValueError(f"sla_skips: {skip} must be in [1, {n_layer}) for {shape.size}'s {n_layer} layers")
            if self.sla_skips and round(self.sla_head_ratio * n_head) == 0:
                raise ValueError(f"sla_head_ratio: {self.sla_head_ratio} of {shape.size}'s {n_head} heads is 0 heads")
        if min(self.decode_tokens, self.profile_steps) < 0:
            raise ValueError("decode_tokens and profile_steps must be >= 0")
        self.decode_freeze_weights = resolve_freeze_weights(
            "decode_freeze_weights", self.decode_freeze_weights, self.compile
        )
        if self.decode_repeats < 1:
            raise ValueError(f"decode_repeats must be >= 1, got {self.decode_repeats}")
        if self.decode_profile and self.decode_tokens == 0:
            raise ValueError("decode_profile: profiles decoding, which decode_tokens=0 skips; give decode_tokens > 0")
        if min(self.warmup_steps, self.rounds, self.block_steps) < 1:
            raise ValueError("warmup_steps, rounds and block_steps must be >= 1 (the first warm-up step compiles)")
        check_dtype(self.dtype)
        if self.loss_impl not in ("chunked", "full"):
            raise ValueError(f"loss_impl must be chunked or full, got {self.loss_impl!r}")
        if self.sdpa_backend not in ("auto", *SDPA_BACKENDS):
            raise ValueError(f"sdpa_backend must be auto or one of {sorted(SDPA_BACKENDS)}, got {self.sdpa_backend!r}")
        check_compile_mode(self.compile_mode, self.compile)
        check_attention(self.attention, resolve_device(self.device), self.dtype)
        check_device(self.device)  # after fa4's check, whose message says more about a missing GPU
        if self.peer and not (Path(self.peer) / "model.py").is_file():
            raise ValueError(f"peer: {Path(self.peer) / 'model.py'} not found (give the folder of nanoGPT's model.py)")
        if self.data != "synthetic":
            for name in ("train.bin", "meta.json"):
                if not (Path(self.data) / name).is_file():
                    raise ValueError(f"data: {Path(self.data) / name} not found (use 'synthetic' or a prepared folder)")
            data_vocab_size = json.loads((Path(self.data) / "meta.json").read_text())["vocab_size"]
            if data_vocab_size > self.vocab_size:
                raise ValueError(f"vocab_size: {self.vocab_size} is less than {self.data}'s {data_vocab_size}")


def batch_source(config: BenchConfig, shape: Shape, device: str):
    """The training batches, (inputs, targets) after (inputs, targets) as an iterator, drawn as train.py draws them."""
    if config.data == "synthetic":
        # Step time does not depend on the token values: one fixed batch, already on the device.
        generator = torch.Generator().manual_seed(config.seed)
        windows = torch.randint(config.vocab_size, (shape.batch_size, shape.block_size + 1), generator=generator)
        windows = windows.to(device)
        return itertools.repeat((windows[:, :-1], windows[:, 1:]))

    # train.py's readers: the same checks and messages, the same windows-to-tensor path
    tokens = open_tokens(config.data, "train", load_meta(config.data, splits=("train",)), shape.block_size + 1)
    rng = np.random.default_rng(config.seed)

    def batches():
        while True:
            starts = rng.integers(0, len(tokens) - shape.block_size, size=shape.batch_size)
            windows = windows_to_tensor(tokens, starts, shape.block_size + 1, device)
            yield windows[:, :-1], windows[:, 1:]

    return batches()


# Prompt lengths this process has prefilled: kernels (cuDNN's plans, say) are chosen per shape and kept, so a
# length seen before would hide that cost from the measurement.
PREFILLED_LENGTHS: set[int] = set()
DECODE_WARMUP_TOKENS = 8  # enough decode steps to compile the step and record and replay its CUDA graph


def fresh_prompt_length(wanted: int, longest: int) -> int | None:
    """wanted, or the nearest length above it (up to longest), then below it, not prefilled yet; None if none."""
    for length in [*range(wanted, longest + 1), *range(wanted - 1, 0, -1)]:
        if length not in PREFILLED_LENGTHS:
            return length
    return None


def measure_decode(model: GPT, config: BenchConfig, device: str, autocast, label: str = "") -> dict:
    """
    Tokens per second of generation, batch 1, after a prompt of a length not prefilled before; the prompt and the
    new tokens fit in block_size. A warm-up generation on a 1-token prompt comes first (its time: decode_compile_s);
    then config.decode_repeats timed generations, each after a prompt of a new length (decode_tokens_per_s: their
    median), and with config.decode_profile one more, profiled.
    """
    block_size = model.config.block_size
    new_tokens = min(config.decode_tokens, block_size - 1)
    longest_prompt = block_size - new_tokens
    wanted_prompt = min(config.decode_prompt_tokens, longest_prompt)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    prompts = torch.Generator().manual_seed(config.seed)
    generator = torch.Generator(device).manual_seed(config.seed)

    def generate_seconds(prompt_length: int, max_new_tokens: int) -> float:
        prompt = torch.randint(config.vocab_size, (1, prompt_length), generator=prompts).to(device)
        PREFILLED_LENGTHS.add(prompt_length)
        synchronize()
        started = time.perf_counter()
        with autocast:
            model.generate(prompt, max_new_tokens, generator=generator)[0, -1].item()  # .item() waits for the device
        return time.perf_counter() - started

    def next_prompt_length() -> tuple[int, bool]:
        length = fresh_prompt_length(wanted_prompt, longest_prompt)
        return (wanted_prompt, False) if length is None else (length, True)  # None: tiny block sizes

    model.eval()
    if config.compile:
        model.compile_decode_step(freeze_weights=config.decode_freeze_weights)
    compile_seconds = generate_seconds(1, DECODE_WARMUP_TOKENS)
    prompt_lengths, tokens_per_s, fresh = [], [], True
    for _ in range(config.decode_repeats):
        prompt_length, fresh_length = next_prompt_length()
        prompt_lengths.append(prompt_length)
        tokens_per_s.append(new_tokens / generate_seconds(prompt_length, new_tokens))
        fresh = fresh and fresh_length
    profile = None
    if config.decode_profile:
        prompt_length, _ = next_prompt_length()
        with labelled_decode_phases(model), torch.profiler.profile(activities=profiler_activities(device)) as profiler:
            seconds = generate_seconds(prompt_length, new_tokens)
        print(f"  {label} decode profile:", flush=True)
        profile = print_decode_profile(profiler, seconds, new_tokens, prompt_length, statistics.median(tokens_per_s))
    return {
        "decode_prompt_tokens": prompt_lengths[0],
        "decode_fresh_prompt": fresh,
        "decode_tokens": new_tokens,
        "decode_tokens_per_s": statistics.median(tokens_per_s),
        "decode_compile_s": compile_seconds,
        "kv_cache_bytes_per_token": model.kv_cache.bytes_per_token(),
        "decode_repeats": config.decode_repeats,
        "decode_prompt_tokens_each": prompt_lengths,
        "decode_tokens_per_s_each": tokens_per_s,
        "decode_profile": profile,
    }


# --decode_profile: generate and its phases, each call labelled for the profiler. decode_token is the model's step and
# the sampling (one CUDA graph when compiled); what runs between the calls (the sampling noise drawn from the caller's
# generator, the new token's copies, the next position) is generate's own work; after generate returns, the host
# waits for the device to finish what it queued.
DECODE_PHASES = ("prefill", "decode_token")
DECODE_LABELS = ("generate", *DECODE_PHASES)
DECODE_PROFILE_TOP = 12  # kernels and operators listed


@contextmanager
def labelled_decode_phases(model: GPT):
    """Within it, every call of model.generate, .prefill and .decode_token is a torch.profiler range of that name."""
    replaced = {name: model.__dict__.get(name) for name in DECODE_LABELS}  # None: the class's method

    def labelled(name, function):
        def run(*args, **kwargs):
            with torch.profiler.record_function(name):
                return function(*args, **kwargs)

        return run

    for name in DECODE_LABELS:
        setattr(model, name, labelled(name, getattr(model, name)))
    try:
        yield
    finally:
        for name, function in replaced.items():
            if function is None:
                delattr(model, name)
            else:
                setattr(model, name, function)


def profiler_activities(device: str) -> list:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: the time the device ran anything."""
    total, covered_until = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > covered_until:
            total += end - max(start, covered_until)
            covered_until = end
    return total


def decode_profile_summary(events, averages, seconds: float, new_tokens: int) -> dict:
    """
    Where a profiled generation's time went, from torch.profiler's events and key_averages(): wall and device-busy
    ms per token; per phase the host's ms and the device's (the kernels it launched): prefill, decode_token,
    "between" (the rest of generate) and "wait" (after generate, until the device is done); the busiest kernels (self
    device time) and operators (self host time). Device figures are None without device activity (CPU).
    """
    kernels = [
        event
        for event in events
        if event.device_type != DeviceType.CPU
        and event.name not in DECODE_LABELS
        and not getattr(event, "is_user_annotation", False)  # the device-side copy of a record_function range
    ]
    gpu = bool(kernels)

    def labelled(name):
        ranges = [event for event in events if event.device_type == DeviceType.CPU and event.name == name]
        host_ms = sum(event.cpu_time_total for event in ranges) / 1000
        gpu_ms = sum(event.device_time_total for event in ranges) / 1000 if gpu else None
        return {"calls": len(ranges), "host_ms": host_ms, "gpu_ms": gpu_ms}

    generate = labelled("generate")
    phases = {name: labelled(name) for name in DECODE_PHASES}
    phases["between"] = {
        "calls": None,
        "host_ms": generate["host_ms"] - sum(phase["host_ms"] for phase in phases.values()),
        "gpu_ms": generate["gpu_ms"] - sum(phase["gpu_ms"] for phase in phases.values()) if gpu else None,
    }
    phases["wait"] = {"calls": None, "host_ms": seconds * 1000 - generate["host_ms"], "gpu_ms": None}
    device_rows = [row for row in averages if row.device_type != DeviceType.CPU and row.key not in DECODE_LABELS]
    host_rows = [row for row in averages if row.device_type == DeviceType.CPU]
    top = DECODE_PROFILE_TOP
    return {
        "wall_ms_per_token": seconds * 1000 / new_tokens,
        "gpu_busy_ms_per_token": busy_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1000 / new_tokens
        if gpu
        else None,
        "phases": phases,
        "top_kernels": [
            {"name": row.key, "calls": row.count, "ms": row.self_device_time_total / 1000}
            for row in sorted(device_rows, key=lambda row: row.self_device_time_total, reverse=True)[:top]
        ],
        "top_host_ops": [
            {"name": row.key, "calls": row.count, "ms": row.self_cpu_time_total / 1000}
            for row in sorted(host_rows, key=lambda row: row.self_cpu_time_total, reverse=True)[:top]
        ],
    }


def print_decode_profile(profiler, seconds: float, new_tokens: int, prompt_length: int, median_tokens_per_s) -> dict:
    """Print decode_profile_summary of the profiled generation; return it. If the summary fails (a profiler whose
    events it misreads), say so, print the profiler's own table and return None: the measured rows still count."""
    try:
        summary = decode_profile_summary(profiler.events(), profiler.key_averages(), seconds, new_tokens)
    except Exception as err:  # reported, with the profiler's table in its place
        print(f"    decode profile: summary failed ({err!r}); the profiler's own table:", flush=True)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
        return None

    def per_token(ms):
        return "-" if ms is None else f"{ms / new_tokens:.3f}"

    gpu_busy = summary["gpu_busy_ms_per_token"]
    print(
        f"    {new_tokens} tokens after a fresh {prompt_length}-token prompt, profiler on: "
        f"wall {summary['wall_ms_per_token']:.3f} ms/token (unprofiled median {1000 / median_tokens_per_s:.3f}), "
        f"device busy {'-' if gpu_busy is None else f'{gpu_busy:.3f}'} ms/token",
        flush=True,
    )
    print(f"      {'phase':<14}{'calls':>7}{'host ms':>10}{'host ms/token':>15}{'gpu ms':>10}{'gpu ms/token':>14}")
    for name, phase in summary["phases"].items():
        gpu_ms = "-" if phase["gpu_ms"] is None else f"{phase['gpu_ms']:.2f}"
        print(
            f"      {name:<14}{phase['calls'] if phase['calls'] is not None else '-':>7}{phase['host_ms']:>10.2f}"
            f"{per_token(phase['host_ms']):>15}{gpu_ms:>10}{per_token(phase['gpu_ms']):>14}"
        )
    for title, rows in (
        ("kernels by device time", summary["top_kernels"]),
        ("operators by host time", summary["top_host_ops"]),
    ):
        if rows:
            print(f"      busiest {title} (self time: calls, ms, ms/token):")
            for row in rows:
                print(
                    f"        {row['calls']:>6} {row['ms']:>9.2f} {row['ms'] / new_tokens:>8.4f}  {row['name'][:110]}"
                )
    return summary


def load_peer(folder: str) -> ModuleType:
    """nanoGPT's model.py from folder, imported by path as it is (its code is never copied here)."""
    path = Path(folder) / "model.py"
    spec = importlib.util.spec_from_file_location("nanogpt_peer_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and torch.compile look a class's module up here
    spec.loader.exec_module(module)
    return module


def build_ours(config: BenchConfig, shape: Shape, sla_skip: int | None, device: str, autocast):
    """Our plain (sla_skip None) or SLA model with the levers of config applied, and train.py's training step."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    torch.manual_seed(config.seed)  # plain and SLA models start from the same weights
    sla = {"sla": True, "sla_skip": sla_skip, "sla_head_ratio": config.sla_head_ratio} if sla_skip else {}
    kernels = {
        "attention": config.attention, "recompute_mixed_kv": config.sla_recompute_kv,
        "skip_unread_kv": config.sla_skip_unread_kv,
    }  # fmt: skip
    model_config = GPTConfig(
        block_size=shape.block_size, vocab_size=config.vocab_size, bias=config.bias, **MODELS[shape.size], **sla,
        **kernels,
    )  # fmt: skip
    model = GPT(model_config).to(device)
    optimizer = model.configure_optimizers(
        weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95), device_type=device_type,
        for_compile=config.compile_optimizer,
    )  # fmt: skip
    if config.compile:
        train_model = torch.compile(model, mode=None if config.compile_mode == "default" else config.compile_mode)
    else:
        train_model = model

    def forward(inputs, targets):
        return train_model(inputs, targets, return_logits=config.loss_impl == "full")[1]

    batches = batch_source(config, shape, device)
    step = make_train_step(
        model, forward, optimizer, batches, autocast=autocast, compile_optimizer=config.compile_optimizer
    )
    return model, step


def build_peer(peer: ModuleType, config: BenchConfig, shape: Shape, device: str, autocast):
    """nanoGPT's GPT of the same shape, as its train.py builds, optimizes and compiles it, in train.py's step."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    torch.manual_seed(config.seed)
    peer_config = peer.GPTConfig(
        block_size=shape.block_size, vocab_size=config.vocab_size, dropout=0.0, bias=config.bias, **MODELS[shape.size]
    )
    model = peer.GPT(peer_config).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
    train_model = torch.compile(model) if config.compile else model

    def forward(inputs, targets):
        return train_model(inputs, targets)[1]  # nanoGPT's forward: (logits, loss)

    # our batches, made contiguous as nanoGPT's get_batch makes them (its loss takes views of the targets)
    batches = batch_source(config, shape, device)
    if config.data == "synthetic":  # one fixed batch: copied once
        batches = itertools.repeat(tuple(tensor.contiguous() for tensor in next(batches)))
    else:
        batches = (tuple(tensor.contiguous() for tensor in batch) for batch in batches)
    return model, make_train_step(model, forward, optimizer, batches, autocast=autocast)


@dataclass
class Contender:
    """One model of a shape: its row, how to build it, and what its steps measured."""

    row: dict
    build: Callable  # () -> (model, train_step)
    context: Callable  # () -> the context its steps run in (our models: --sdpa_backend)
    model: nn.Module | None = None
    train_step: Callable | None = None
    step_ms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    resident_bytes: int = 0  # what stays allocated between its steps: weights, optimizer state, batches
    step_bytes: int = 0  # the most its steps allocated above what was allocated before them
    warmup_peak_bytes: int = 0  # the most allocated during its warm-up, above what was allocated before it

    @property
    def alive(self) -> bool:
        return self.model is not None

    def drop(self, device: str):
        self.model = self.train_step = None
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def is_out_of_memory(err: RuntimeError) -> bool:
    return "out of memory" in str(err)  # torch.OutOfMemoryError, or one that the compiler wrapped


def warm_up(contender: Contender, config: BenchConfig, device: str):
    """Build the model and run its warm-up steps; its first step's time (compilation included) and loss."""
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    allocated_before = 0
    if device.startswith("cuda"):
        allocated_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with contender.context():
        contender.model, contender.train_step = contender.build()
        contender.row["n_params"] = contender.model.get_num_params()
        for step in range(config.warmup_steps):
            started = time.perf_counter()
            loss = contender.train_step().wait().loss
            synchronize()
            if step == 0:
                contender.row["first_step_s"] = time.perf_counter() - started
                contender.row["first_loss"] = loss
    if device.startswith("cuda"):
        contender.resident_bytes = torch.cuda.memory_allocated(device) - allocated_before
        contender.warmup_peak_bytes = torch.cuda.max_memory_allocated(device) - allocated_before


def round_orders(group: list, rounds: int) -> list[list]:
    """
    The order of the models in each round: as given, then reversed, and so on. A GPU slows as it runs (at its power
    cap, warming up: on an H200 a model's step took up to 6% longer in its fourth round than in its first); in a
    fixed order the model timed last in each round would always run later, on the slower GPU, than the first.
    Alternating, each model's mean position over a pair of rounds is the same, so a linear drift hits all of them
    alike (hence an even --rounds).
    """
    return [group if number % 2 == 0 else group[::-1] for number in range(rounds)]


def run_block(contender: Contender, steps: int, device: str):
    """steps training steps back to back: each one's time (ms), its loss and the memory the block allocated."""
    with contender.context():
        if not device.startswith("cuda"):  # the CPU computes as it goes: the host's clock times each step
            for _ in range(steps):
                started = time.perf_counter()
                contender.losses.append(contender.train_step().wait().loss)
                contender.step_ms.append((time.perf_counter() - started) * 1000)
            return
        torch.cuda.synchronize(device)
        allocated_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        outcomes = []
        events[0].record()
        for step in range(steps):
            outcomes.append(contender.train_step())  # returns once the step before is done, as in train.py
            events[step + 1].record()
        torch.cuda.synchronize(device)
    contender.step_ms += [start.elapsed_time(end) for start, end in itertools.pairwise(events)]
    contender.losses += [outcome.wait().loss for outcome in outcomes]
    contender.step_bytes = max(contender.step_bytes, torch.cuda.max_memory_allocated(device) - allocated_before)


def record_error(contender: Contender, err: RuntimeError, device: str):
    if not is_out_of_memory(err):
        raise err
    contender.row["error"] = "out of memory: " + str(err).splitlines()[0][:200]
    print(f"    {contender.row['model']} {contender.row['sla_skip'] or ''}: {contender.row['error']}", flush=True)
    contender.drop(device)


def measure_group(group: list[Contender], config: BenchConfig, shape: Shape, device: str, autocast):
    """Warm up every model of group, time them round-robin, then fill their rows (and decode our models)."""
    for contender in group:
        try:
            warm_up(contender, config, device)
        except RuntimeError as err:
            record_error(contender, err, device)
    for order in round_orders(group, config.rounds):
        for contender in filter(lambda c: c.alive, order):
            try:
                run_block(contender, config.block_steps, device)
            except RuntimeError as err:
                record_error(contender, err, device)
    flops = flops_reference(config, shape)
    for contender in filter(lambda c: c.alive, group):
        row = contender.row
        ms_per_step = statistics.median(contender.step_ms)
        tokens_per_s = shape.batch_size * shape.block_size / (ms_per_step / 1000)
        row.update(
            ms_per_step=ms_per_step,
            ms_per_step_mean=statistics.mean(contender.step_ms),
            ms_per_step_min=min(contender.step_ms),
            ms_per_step_max=max(contender.step_ms),
            ms_per_step_rounds=[  # each round's median, in the order run: the drift that round_orders evens out
                statistics.median(contender.step_ms[start : start + config.block_steps])
                for start in range(0, len(contender.step_ms), config.block_steps)
            ],
            timed_steps=len(contender.step_ms),
            tokens_per_s=tokens_per_s,
            mfu=flops.estimate_mfu(tokens_per_s, seq_len=shape.block_size),
            loss=contender.losses[-1],
        )
        if device.startswith("cuda"):
            step_bytes = contender.step_bytes
            if row["compile_mode"] in CUDA_GRAPH_MODES:
                # A replayed CUDA graph allocates nothing: its activations live in a pool that capturing it, in the
                # warm-up, allocated. So its steps' peak is the warm-up's (which also holds the capture's own work).
                step_bytes = max(step_bytes, contender.warmup_peak_bytes - contender.resident_bytes)
            row["peak_mem_gib"] = (contender.resident_bytes + step_bytes) / 2**30
            row["step_mem_gib"] = step_bytes / 2**30
        if config.profile_steps:
            with contender.context():
                print_profile(contender.train_step, config.profile_steps, device.split(":")[0])
        if row["model"] != "nanogpt" and config.decode_tokens > 0:
            with contender.context():
                label = f"{row['shape']} {row['model']}" + (f" skip {row['sla_skip']}" if row["sla"] else "")
                row.update(measure_decode(contender.model, config, device, autocast, label))
        contender.drop(device)


def flops_reference(config: BenchConfig, shape: Shape) -> GPT:
    """A plain model of the shape, without memory (meta device), for MFU: every row of a shape does its FLOPs (SLA
    adds none, nanoGPT's GPT is the same network), so all rows are measured against the same count."""
    with torch.device("meta"):
        return GPT(
            GPTConfig(block_size=shape.block_size, vocab_size=config.vocab_size, bias=config.bias, **MODELS[shape.size])
        )


def print_profile(train_step, steps: int, device_type: str):
    """The kernels and operators that take the time of `steps` more training steps, busiest first."""
    with torch.profiler.profile(activities=profiler_activities(device_type)) as profiler:
        for _ in range(steps):
            train_step()
        if device_type == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
    print(f"    profile of {steps} steps:")
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=90))


def free_device_memory(device: str):
    """Forget compiled graphs and cached blocks, so that each shape (or model) is measured on an empty device."""
    torch._dynamo.reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def print_table(rows: list[dict]):
    columns = [
        ("shape", "{}"), ("model", "{}"), ("sla_skip", "{}"), ("ms_per_step", "{:.2f}"), ("ms_per_step_mean", "{:.2f}"),
        ("tokens_per_s", "{:,.0f}"), ("mfu", "{:.1%}"), ("peak_mem_gib", "{:.2f}"), ("step_mem_gib", "{:.2f}"),
        ("ratio_vs_nanogpt", "{:.3f}"), ("ratio_step_time", "{:.3f}"), ("ratio_peak_mem", "{:.3f}"),
        ("decode_tokens_per_s", "{:.1f}"), ("decode_compile_s", "{:.2f}"), ("ratio_kv_cache_bytes", "{:.4f}"),
        ("error", "{}"),
    ]  # fmt: skip
    cells = [[name for name, _ in columns]]
    cells += [["-" if row[name] is None else fmt.format(row[name]) for name, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))


def print_row(row: dict):
    label = f"{row['shape']} {row['model']}" + (f" skip {row['sla_skip']}" if row["sla"] else "")
    if row["error"]:
        print(f"  {label}: {row['error']}", flush=True)
        return
    peak = "" if row["peak_mem_gib"] is None else f", peak {row['peak_mem_gib']:.2f} GiB"
    vs_nanogpt = "" if row["ratio_vs_nanogpt"] is None else f", nanoGPT/this {row['ratio_vs_nanogpt']:.3f}"
    vs_plain = "" if row["ratio_step_time"] is None else f", SLA/plain step time {row['ratio_step_time']:.3f}"
    print(
        f"  {label}: {row['ms_per_step']:.2f} ms/step (median of {row['timed_steps']}; mean "
        f"{row['ms_per_step_mean']:.2f}), first step {row['first_step_s']:.1f} s{peak}{vs_nanogpt}{vs_plain}",
        flush=True,
    )
    if row["decode_tokens_per_s"] is not None:
        fresh = "fresh" if row["decode_fresh_prompt"] else "seen"
        each = ", ".join(f"{value:.1f}" for value in row["decode_tokens_per_s_each"])
        lengths = "/".join(str(length) for length in row["decode_prompt_tokens_each"])
        print(
            f"    decode {row['decode_tokens_per_s']:.1f} tokens/s (median of {row['decode_repeats']}: {each}; "
            f"{row['decode_tokens']} tokens after {fresh} prompts of {lengths} tokens), warm-up "
            f"{row['decode_compile_s']:.2f} s, KV cache {row['kv_cache_bytes_per_token']:,} bytes/token",
            flush=True,
        )


def append_row(path: str, row: dict):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main(config: BenchConfig) -> list[dict]:
    """Measure every shape's plain, nanoGPT and SLA models; print, append to config.out, and return the rows."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"  # an explicit index: set_device and the stats need one
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # as train.py: TF32 for float32 matmuls outside autocast
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    autocast = autocast_context(device, dtype)
    peer = load_peer(config.peer) if config.peer else None
    config = dataclasses.replace(config, attention=resolve_attention(config.attention, device, dtype))  # auto's pick
    run_provenance = provenance(device)
    print(describe_provenance(run_provenance))
    print(
        f"{gpu}, torch {torch.__version__}, {dtype}, compile={config.compile} (mode {config.compile_mode}), "
        f"compile_optimizer={config.compile_optimizer}, sdpa_backend={config.sdpa_backend}, "
        f"attention={config.attention}, peer={config.peer or '-'}, {config.rounds} rounds of {config.block_steps} "
        f"steps per model{'' if config.round_robin else ', one model at a time'}"
    )

    def ours_context():  # a new one each time: sdpa_kernel's can be entered only once
        return nullcontext() if config.sdpa_backend == "auto" else sdpa_kernel(SDPA_BACKENDS[config.sdpa_backend])

    rows: list[dict] = []
    for number, shape in enumerate(parse_shape(text) for text in config.shapes):
        print(f"[{number + 1}/{len(config.shapes)}] {shape.name}: building, warming up, timing ...", flush=True)
        common = dict.fromkeys(ROW_FIELDS) | {
            "gpu": gpu, "torch": torch.__version__, "shape": shape.name, "size": shape.size,
            "block_size": shape.block_size, "batch_size": shape.batch_size, "compile": config.compile,
            "dtype": dtype, "data": config.data, "vocab_size": config.vocab_size, "bias": config.bias,
            "round_robin": config.round_robin, "warmup_steps": config.warmup_steps, "rounds": config.rounds,
            "block_steps": config.block_steps, "sla": False, "n_skip_heads": 0, "provenance": run_provenance,
        }  # fmt: skip
        ours = {
            "compile_mode": config.compile_mode, "compile_optimizer": config.compile_optimizer,
            "attention": config.attention, "sdpa_backend": config.sdpa_backend, "loss_impl": config.loss_impl,
            "decode_freeze_weights": config.decode_freeze_weights if config.decode_tokens > 0 else None,
        }  # fmt: skip

        def our_contender(sla_skip, shape=shape, ours=ours, common=common):
            row = common | ours | {"model": "sla" if sla_skip else "plain"}
            if sla_skip:
                row |= {
                    "sla": True, "sla_skip": sla_skip, "sla_head_ratio": config.sla_head_ratio,
                    "n_skip_heads": round(config.sla_head_ratio * MODELS[shape.size]["n_head"]),
                    "sla_recompute_kv": config.sla_recompute_kv, "sla_skip_unread_kv": config.sla_skip_unread_kv,
                }  # fmt: skip
            return Contender(row, lambda: build_ours(config, shape, sla_skip, device, autocast), ours_context)

        contenders = [our_contender(None)]
        if peer is not None:
            as_published = {
                "model": "nanogpt", "compile_mode": "default", "compile_optimizer": False, "attention": "sdpa",
                "sdpa_backend": "auto", "loss_impl": "full",
            }  # fmt: skip
            contenders.append(
                Contender(
                    common | as_published, lambda s=shape: build_peer(peer, config, s, device, autocast), nullcontext
                )
            )
        contenders += [our_contender(skip) for skip in config.sla_skips]

        for group in [contenders] if config.round_robin else [[contender] for contender in contenders]:
            free_device_memory(device)
            measure_group(group, config, shape, device, autocast)

        shape_rows = [contender.row for contender in contenders]
        add_ratios(shape_rows)
        for row in shape_rows:
            print_row(row)
            if config.out:
                append_row(config.out, row)
            if config.decode_out and row["model"] != "nanogpt" and config.decode_tokens > 0:
                append_row(config.decode_out, {name: row[key] for name, key in DECODE_ROW_FIELDS.items()})
        rows += shape_rows

    print_table(rows)
    return rows


def add_ratios(shape_rows: list[dict]):
    """ratio_vs_nanogpt on every row (nanoGPT's ms / the row's), SLA rows' ratios to the plain row."""
    plain = next(row for row in shape_rows if row["model"] == "plain")
    nanogpt = next((row for row in shape_rows if row["model"] == "nanogpt"), None)
    for row in shape_rows:
        if row["error"] is None and nanogpt is not None and nanogpt["error"] is None:
            row["ratio_vs_nanogpt"] = nanogpt["ms_per_step"] / row["ms_per_step"]
        if row["sla"] and row["error"] is None and plain["error"] is None:
            for ratio, key in (
                ("ratio_step_time", "ms_per_step"),
                ("ratio_peak_mem", "peak_mem_gib"),
                ("ratio_decode_tokens_per_s", "decode_tokens_per_s"),
                ("ratio_kv_cache_bytes", "kv_cache_bytes_per_token"),
            ):
                if row[key] is not None and plain[key]:
                    row[ratio] = row[key] / plain[key]


if __name__ == "__main__":
    main(parse_cli(BenchConfig))
