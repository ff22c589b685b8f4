"""
Training-step time, peak memory and decode speed of plain GPT-2 and its SLA variants, measured in one run.

    python bench.py --shapes=tiny:64:2 --device=cpu                                     # a quick CPU check
    python bench.py --shapes=small:4096:4,small:8192:2 --compile --out=results/bench-h100.jsonl

A shape is model:block_size:batch_size with model one of MODELS. For each shape the plain model is measured
first, then one SLA model per --sla_skips entry, and each SLA row carries its ratios to that plain row
(--repeat=2 alternates the whole round twice, to show the noise). Every step is train.py's: autocast, the
memory-lean loss (return_logits=False; --loss_impl=full: the whole logits and one cross-entropy, as nanoGPT),
backward, gradient clipping at 1.0, AdamW (fused on CUDA) and zero_grad(set_to_none=True), with the next batch
drawn between forward and backward. Each step is timed between two device synchronisations; the median (and
mean) of --timed_steps steps after --warmup_steps is reported. Decode speed is model.generate with the static KV
cache (its decode step compiled with --compile), batch 1: --decode_tokens new tokens after a prompt of a length
this process has not prefilled before (--decode_prompt_tokens, or the next unused length), prefill included,
timed after a warm-up generation whose time is reported apart (compile_s). Each row is printed as it comes and
appended to --out as a JSON line, so several runs can fill one file; --decode_out gets the decode rows alone
(DECODE_ROW_FIELDS). A table ends the run. A model that runs out of memory gets a row with "error" and the run
goes on.
"""

import gc
import json
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch._dynamo
from torch.nn.attention import SDPBackend, sdpa_kernel

from configurator import autocast_context, check_device, check_dtype, parse_cli, resolve_device, resolve_dtype
from model import GPT, GPTConfig
from train import load_meta, open_tokens, windows_to_tensor

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
    "gpu", "torch", "shape", "model", "block_size", "batch_size", "sla", "sla_skip", "sla_head_ratio",
    "n_skip_heads", "sla_recompute_kv", "compile", "dtype", "sdpa_backend", "loss_impl", "data", "vocab_size",
    "bias", "warmup_steps", "timed_steps", "repeat", "n_params",
    # training steps
    "ms_per_step", "ms_per_step_mean", "ms_per_step_min", "ms_per_step_max", "first_step_s", "tokens_per_s",
    "mfu", "peak_mem_gib", "loss",
    # KV-cache decoding
    "decode_prompt_tokens", "decode_fresh_prompt", "decode_tokens", "decode_tokens_per_s", "decode_compile_s",
    "kv_cache_bytes_per_token",
    # SLA rows: SLA / plain of the same shape and round
    "ratio_step_time", "ratio_peak_mem", "ratio_decode_tokens_per_s", "ratio_kv_cache_bytes",
    "error",
)  # fmt: skip
# The rows of --decode_out: a training row's decode measurement under the names of issue 15's results table.
DECODE_ROW_FIELDS = {
    "gpu": "gpu", "torch": "torch", "shape": "shape", "model": "model", "block_size": "block_size", "sla": "sla",
    "sla_skip": "sla_skip", "sla_head_ratio": "sla_head_ratio", "n_skip_heads": "n_skip_heads",
    "compile": "compile", "dtype": "dtype", "sdpa_backend": "sdpa_backend", "repeat": "repeat",
    "prompt_tokens": "decode_prompt_tokens", "fresh_prompt": "decode_fresh_prompt", "new_tokens": "decode_tokens",
    "tokens_per_s": "decode_tokens_per_s", "compile_s": "decode_compile_s",
    "kv_cache_bytes_per_token": "kv_cache_bytes_per_token", "ratio_tokens_per_s": "ratio_decode_tokens_per_s",
    "ratio_kv_cache_bytes": "ratio_kv_cache_bytes", "error": "error",
}  # fmt: skip


class Shape(NamedTuple):
    name: str  # as given, e.g. "small:8192:2"
    model: str
    block_size: int
    batch_size: int


def parse_shape(text: str) -> Shape:
    model, *numbers = text.split(":")
    if model not in MODELS or len(numbers) != 2 or not all(n.isdigit() and int(n) > 0 for n in numbers):
        raise ValueError(f"shapes: {text!r} is not model:block_size:batch_size with model one of {sorted(MODELS)}")
    return Shape(text, model, int(numbers[0]), int(numbers[1]))


@dataclass
class BenchConfig:
    # issue 7's shapes, and GPT-2 small at 1K x 16 for the comparison with nanoGPT
    shapes: tuple[str, ...] = (
        "small:1024:16", "small:4096:4", "small:8192:2", "small:16384:1", "medium:8192:1", "medium:16384:1",
    )  # fmt: skip
    sla_skips: tuple[int, ...] = (9, 1)  # one SLA model per skip distance; () measures the plain model alone
    sla_head_ratio: float = 0.75
    sla_recompute_kv: bool = True  # False: SLA layers keep their mixed K/V for backward (more memory, less copying)
    compile: bool = False
    warmup_steps: int = 8
    timed_steps: int = 20
    repeat: int = 1  # rounds of plain + SLA models per shape
    data: str = "synthetic"  # 'synthetic' (one fixed random batch) | a folder with train.bin and meta.json
    device: str = "auto"  # 'auto' (cuda if available) | 'cpu' | 'cuda' | 'cuda:N'
    dtype: str = "auto"  # 'auto' (bfloat16 on CUDA, float16 if unsupported; float32 on CPU) | 'bfloat16' | ...
    sdpa_backend: str = "auto"  # 'auto' (PyTorch picks) | 'flash' | 'cudnn' | 'efficient' | 'math'
    # 'chunked': train.py's memory-lean loss; 'full': the whole logits tensor and one cross-entropy, as nanoGPT
    loss_impl: str = "chunked"
    bias: bool = False  # as nanoGPT's benchmark measured GPT-2
    vocab_size: int = 50304
    decode_tokens: int = 256  # new tokens of the decode measurement (fewer if block_size is short); 0 skips it
    decode_prompt_tokens: int = 128  # or the next length this process has not prefilled yet
    seed: int = 0
    profile_steps: int = 0  # > 0: after timing, profile this many more steps and print the busiest kernels
    out: str = ""  # JSON-lines file the rows are appended to; '' prints only
    decode_out: str = ""  # JSON-lines file the decode rows (DECODE_ROW_FIELDS) are appended to; '' writes none

    def __post_init__(self):
        shapes = [parse_shape(text) for text in self.shapes]
        if not shapes:
            raise ValueError("shapes: give at least one model:block_size:batch_size")
        for shape in shapes:
            n_layer, n_head = MODELS[shape.model]["n_layer"], MODELS[shape.model]["n_head"]
            for skip in self.sla_skips:
                if not 1 <= skip < n_layer:
                    raise ValueError(
                        f"sla_skips: {skip} must be in [1, {n_layer}) for {shape.model}'s {n_layer} layers"
                    )
            if self.sla_skips and round(self.sla_head_ratio * n_head) == 0:
                raise ValueError(f"sla_head_ratio: {self.sla_head_ratio} of {shape.model}'s {n_head} heads is 0 heads")
        if min(self.warmup_steps, self.decode_tokens, self.profile_steps) < 0 or min(self.timed_steps, self.repeat) < 1:
            raise ValueError("warmup_steps, decode_tokens and profile_steps must be >= 0, timed_steps and repeat >= 1")
        check_dtype(self.dtype)
        check_device(self.device)
        if self.loss_impl not in ("chunked", "full"):
            raise ValueError(f"loss_impl must be chunked or full, got {self.loss_impl!r}")
        if self.sdpa_backend not in ("auto", *SDPA_BACKENDS):
            raise ValueError(f"sdpa_backend must be auto or one of {sorted(SDPA_BACKENDS)}, got {self.sdpa_backend!r}")
        if self.data != "synthetic":
            for name in ("train.bin", "meta.json"):
                if not (Path(self.data) / name).is_file():
                    raise ValueError(f"data: {Path(self.data) / name} not found (use 'synthetic' or a prepared folder)")
            data_vocab_size = json.loads((Path(self.data) / "meta.json").read_text())["vocab_size"]
            if data_vocab_size > self.vocab_size:
                raise ValueError(f"vocab_size: {self.vocab_size} is less than {self.data}'s {data_vocab_size}")


def batch_source(config: BenchConfig, shape: Shape, device: str):
    """A function returning the next (inputs, targets) batch, drawn as train.py draws them."""
    if config.data == "synthetic":
        # Step time does not depend on the token values: one fixed batch, already on the device.
        generator = torch.Generator().manual_seed(config.seed)
        windows = torch.randint(config.vocab_size, (shape.batch_size, shape.block_size + 1), generator=generator)
        windows = windows.to(device)
        return lambda: (windows[:, :-1], windows[:, 1:])

    # train.py's readers: the same checks and messages, the same windows-to-tensor path
    tokens = open_tokens(config.data, "train", load_meta(config.data, splits=("train",)), shape.block_size + 1)
    rng = np.random.default_rng(config.seed)

    def next_batch():
        starts = rng.integers(0, len(tokens) - shape.block_size, size=shape.batch_size)
        windows = windows_to_tensor(tokens, starts, shape.block_size + 1, device)
        return windows[:, :-1], windows[:, 1:]

    return next_batch


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


def measure_decode(model: GPT, config: BenchConfig, device: str, autocast) -> dict:
    """
    Tokens per second of generation, batch 1, after a prompt of a length not prefilled before; the prompt and the
    new tokens fit in block_size. A warm-up generation on a 1-token prompt comes first (its time: decode_compile_s).
    """
    block_size = model.config.block_size
    new_tokens = min(config.decode_tokens, block_size - 1)
    longest_prompt = block_size - new_tokens
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

    model.eval()
    if config.compile:
        model.compile_decode_step()
    compile_seconds = generate_seconds(1, DECODE_WARMUP_TOKENS)
    prompt_tokens = fresh_prompt_length(min(config.decode_prompt_tokens, longest_prompt), longest_prompt)
    fresh = prompt_tokens is not None
    if not fresh:  # every length that fits was prefilled before (tiny block sizes)
        prompt_tokens = min(config.decode_prompt_tokens, longest_prompt)
    seconds = generate_seconds(prompt_tokens, new_tokens)
    return {
        "decode_prompt_tokens": prompt_tokens,
        "decode_fresh_prompt": fresh,
        "decode_tokens": new_tokens,
        "decode_tokens_per_s": new_tokens / seconds,
        "decode_compile_s": compile_seconds,
        "kv_cache_bytes_per_token": model.kv_cache.bytes_per_token(),
    }


def measure(config: BenchConfig, shape: Shape, sla_skip: int | None, device: str, dtype: str) -> dict:
    """Build one model, run warm-up and timed training steps, then decode; the measured fields of its row."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    synchronize = torch.cuda.synchronize if device_type == "cuda" else lambda: None
    autocast = autocast_context(device, dtype)

    torch.manual_seed(config.seed)  # plain and SLA models start from the same weights
    sla = {"sla": True, "sla_skip": sla_skip, "sla_head_ratio": config.sla_head_ratio} if sla_skip else {}
    model_config = GPTConfig(
        block_size=shape.block_size, vocab_size=config.vocab_size, bias=config.bias, **MODELS[shape.model], **sla
    )
    model = GPT(model_config).to(device)
    for block in model.transformer.h:  # this model only: the class-wide default stays as it is
        block.attn.recompute_mixed_kv = config.sla_recompute_kv
    optimizer = model.configure_optimizers(
        weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95), device_type=device_type
    )
    train_model = torch.compile(model) if config.compile else model
    next_batch = batch_source(config, shape, device)

    batch = next_batch()

    def train_step():
        nonlocal batch
        with autocast:
            _, loss = train_model(*batch, return_logits=config.loss_impl == "full")
        batch = next_batch()  # as train.py: the next batch is fetched while the device works on this one
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step_seconds = []
    for _ in range(config.warmup_steps + config.timed_steps):
        synchronize()
        started = time.perf_counter()
        loss = train_step()
        synchronize()
        step_seconds.append(time.perf_counter() - started)
    if config.profile_steps:
        print_profile(train_step, config.profile_steps, device_type)
    timed_ms = [seconds * 1000 for seconds in step_seconds[config.warmup_steps :]]
    ms_per_step = statistics.median(timed_ms)
    tokens_per_s = shape.batch_size * shape.block_size / (ms_per_step / 1000)
    row = {
        "n_params": model.get_num_params(),
        "ms_per_step": ms_per_step,
        "ms_per_step_mean": statistics.mean(timed_ms),
        "ms_per_step_min": min(timed_ms),
        "ms_per_step_max": max(timed_ms),
        "first_step_s": step_seconds[0],  # compilation included
        "tokens_per_s": tokens_per_s,
        "mfu": model.estimate_mfu(tokens_per_s, seq_len=shape.block_size),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device_type == "cuda" else None,
        "loss": loss.item(),
    }
    if config.decode_tokens > 0:
        row.update(measure_decode(model, config, device, autocast))
    return row


def print_profile(train_step, steps: int, device_type: str):
    """The kernels and operators that take the time of `steps` more training steps, busiest first."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            train_step()
        if device_type == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
    print(f"    profile of {steps} steps:")
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=90))


def free_device_memory(device: str):
    """Forget compiled graphs and cached blocks, so that each model is measured on an empty device."""
    torch._dynamo.reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def print_table(rows: list[dict]):
    columns = [
        ("shape", "{}"), ("sla_skip", "{}"), ("ms_per_step", "{:.2f}"), ("ms_per_step_mean", "{:.2f}"),
        ("tokens_per_s", "{:,.0f}"), ("mfu", "{:.1%}"), ("peak_mem_gib", "{:.2f}"),
        ("decode_tokens_per_s", "{:.1f}"), ("decode_compile_s", "{:.2f}"), ("ratio_step_time", "{:.3f}"),
        ("ratio_peak_mem", "{:.3f}"), ("ratio_kv_cache_bytes", "{:.4f}"), ("error", "{}"),
    ]  # fmt: skip
    cells = [[name for name, _ in columns]]
    cells += [["-" if row[name] is None else fmt.format(row[name]) for name, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))


def append_row(path: str, row: dict):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main(config: BenchConfig) -> list[dict]:
    """Measure every shape's plain and SLA models; print, append to config.out, and return the rows."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"  # an explicit index: set_device and the stats need one
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # as train.py: TF32 for float32 matmuls outside autocast
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(f"{gpu}, torch {torch.__version__}, {dtype}, compile={config.compile}, sdpa_backend={config.sdpa_backend}")

    shapes = [parse_shape(text) for text in config.shapes]
    runs = [(shape, r, skip) for shape in shapes for r in range(config.repeat) for skip in (None, *config.sla_skips)]
    rows: list[dict] = []
    for number, (shape, repeat, sla_skip) in enumerate(runs, start=1):
        label = f"{shape.name} " + ("plain" if sla_skip is None else f"SLA skip {sla_skip}")
        print(f"[{number}/{len(runs)}] {label}: {'compiling, ' if config.compile else ''}measuring ...", flush=True)
        n_skip_heads = round(config.sla_head_ratio * MODELS[shape.model]["n_head"]) if sla_skip else 0
        row = dict.fromkeys(ROW_FIELDS) | {
            "gpu": gpu,
            "torch": torch.__version__,
            "shape": shape.name,
            "model": shape.model,
            "block_size": shape.block_size,
            "batch_size": shape.batch_size,
            "sla": sla_skip is not None,
            "sla_skip": sla_skip,
            "sla_head_ratio": config.sla_head_ratio if sla_skip else None,
            "n_skip_heads": n_skip_heads,
            "sla_recompute_kv": config.sla_recompute_kv if sla_skip else None,
            "compile": config.compile,
            "dtype": dtype,
            "sdpa_backend": config.sdpa_backend,
            "loss_impl": config.loss_impl,
            "data": config.data,
            "vocab_size": config.vocab_size,
            "bias": config.bias,
            "warmup_steps": config.warmup_steps,
            "timed_steps": config.timed_steps,
            "repeat": repeat,
        }
        free_device_memory(device)
        try:
            # a new context each time: sdpa_kernel's can be entered only once
            with nullcontext() if config.sdpa_backend == "auto" else sdpa_kernel(SDPA_BACKENDS[config.sdpa_backend]):
                row.update(measure(config, shape, sla_skip, device, dtype))
        except RuntimeError as err:  # torch.OutOfMemoryError, or one that the compiler wrapped
            if "out of memory" not in str(err):
                raise
            row["error"] = "out of memory: " + str(err).splitlines()[0][:200]

        if sla_skip is None:
            plain = row
        elif row["error"] is None and plain["error"] is None:
            for ratio, key in (
                ("ratio_step_time", "ms_per_step"),
                ("ratio_peak_mem", "peak_mem_gib"),
                ("ratio_decode_tokens_per_s", "decode_tokens_per_s"),
                ("ratio_kv_cache_bytes", "kv_cache_bytes_per_token"),
            ):
                if row[key] is not None and plain[key]:
                    row[ratio] = row[key] / plain[key]
        rows.append(row)
        if row["error"]:
            print(f"    {row['error']}", flush=True)
        else:
            peak = "" if row["peak_mem_gib"] is None else f", peak {row['peak_mem_gib']:.2f} GiB"
            ratio = "" if row["ratio_step_time"] is None else f", SLA/plain step time {row['ratio_step_time']:.3f}"
            print(
                f"    {row['ms_per_step']:.2f} ms/step (median; mean {row['ms_per_step_mean']:.2f}), "
                f"first step {row['first_step_s']:.1f} s{peak}{ratio}",
                flush=True,
            )
            if row["decode_tokens_per_s"] is not None:
                fresh = "fresh" if row["decode_fresh_prompt"] else "seen"
                print(
                    f"    decode {row['decode_tokens_per_s']:.1f} tokens/s ({row['decode_tokens']} tokens after a "
                    f"{fresh} {row['decode_prompt_tokens']}-token prompt), warm-up {row['decode_compile_s']:.2f} s, "
                    f"KV cache {row['kv_cache_bytes_per_token']:,} bytes/token",
                    flush=True,
                )
        if config.out:
            append_row(config.out, row)
        if config.decode_out and config.decode_tokens > 0:
            append_row(config.decode_out, {name: row[key] for name, key in DECODE_ROW_FIELDS.items()})

    print_table(rows)
    return rows


if __name__ == "__main__":
    main(parse_cli(BenchConfig))
