"""
Train GPT-2, optionally with Skip-Layer Attention, on the token files that prepare_openwebtext.py writes.

    python train.py config/tiny_cpu.py                                          # CPU demo
    python train.py config/train_gpt2_small_4k.py --sla                         # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_small_16k.py --sla
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...  # 2 nodes
    python train.py --out_dir=out --init_from=resume                            # continue exactly
    python train.py --out_dir=out --init_from=resume --eval_only --eval_data_dir=data/owt --eval_tag=owt

Keys: `python train.py --help`. On resume the checkpoint's config is the default and the command line overrides
it. The helpers at the top (data, evaluation, logging) are reused by other scripts; then come the run's phases
(settings, model, data, checkpoint state, evaluation), and fit() reads top to bottom as the training loop.
"""

import contextlib
import dataclasses
import fcntl
import itertools
import json
import math
import os
import random
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose. DDP imports it lazily, and its functions take the default
# group as a default argument (group=group.WORLD), evaluated at import: imported after init_process_group they hold
# the live group forever, destroy_process_group cannot free it, and on gloo its worker threads outlive the run into
# interpreter shutdown, where one that drops a tensor takes the GIL, is ended mid-destructor and aborts a finished
# run ("terminate called without an active exception", about 1 CI run in 30; pytorch/pytorch#190489).
import torch.distributed.nn
from torch.nn.parallel import DistributedDataParallel as DDP

# the checkpoint helpers live in checkpoint.py (sample.py reads checkpoints too); train.py re-exports them
from checkpoint import (
    RESUME_KEYS,
    TrainError,
    first_line,
    load_checkpoint,
    model_args,
    model_from_checkpoint,
    pretrained_model,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from configurator import (
    CUDA_GRAPH_MODES,
    ConfigError,
    autocast_context,
    check_compile_mode,
    check_device,
    check_dtype,
    describe_provenance,
    parse_cli_explicit,
    provenance,
    resolve_device,
    resolve_dtype,
)
from fa4 import check_attention, resolve_attention
from model import GPT, KERNEL_KEYS, GPTConfig


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    overwrite: bool = False  # a fresh run into an out_dir that holds a run: replace it (else that is an error)
    data_dir: str = "data/openwebtext"  # train.bin, val.bin and meta.json from prepare_openwebtext.py
    init_from: str = "scratch"  # 'scratch' | 'resume' (out_dir/ckpt.pt) | 'gpt2' | 'gpt2-medium' | a HF GPT-2 dir
    always_save_checkpoint: bool = True  # at every evaluation; False: only when the val loss improves
    # evaluation
    eval_interval: int = 1000
    eval_iters: int = 100  # batches per context length
    final_eval_iters: int = 0  # batches per length at the end of training (and for eval_only); 0 = eval_iters
    eval_block_sizes: tuple[int, ...] = ()  # () = those of 4096, 8192, 16384 that fit block_size, else block_size
    eval_batch_size: int = 0  # 0 = batch_size * block_size // T: the training micro-batch's tokens at every T
    eval_only: bool = False  # evaluate once and exit
    eval_data_dir: str = ""  # evaluate on this folder's val.bin instead of data_dir's (another corpus)
    eval_tag: str = "val"  # evaluation keys are "<eval_tag>/loss@<T>"
    # logging
    log_interval: int = 1
    wandb_log: bool = False
    wandb_project: str = "sla-gpt"
    wandb_run_name: str = "run"
    # data
    batch_size: int = 12  # windows per micro-step and process
    block_size: int = 1024
    gradient_accumulation_steps: int = 40  # GLOBAL micro-steps per optimizer step, divided among DDP processes
    # model (on resume the architecture comes from the checkpoint)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 0  # 0 = meta.json's vocab_size rounded up to a multiple of 64 (50257 -> 50304)
    dropout: float = 0.0
    bias: bool = True
    sla: bool = False
    sla_head_ratio: float = 0.75  # the first round(sla_head_ratio * n_head) heads skip
    sla_skip: int = 9  # layer l's skip heads read layer l - sla_skip's K/V
    # AdamW
    learning_rate: float = 6e-4
    max_iters: int = 600000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # learning rate: linear warmup, then cosine decay to min_lr at lr_decay_iters
    decay_lr: bool = True
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000
    min_lr: float = 6e-5
    # system
    device: str = "auto"  # 'auto' (cuda if available) | 'cpu' | 'cuda' | 'cuda:N'; under torchrun cuda:LOCAL_RANK
    dtype: str = "auto"  # 'auto' (bfloat16 on CUDA, float16 if unsupported; float32 on CPU) | 'bfloat16' | ...
    compile: bool = False
    # torch.compile's mode for the training step: 'default' | 'max-autotune-no-cudagraphs' | 'max-autotune' |
    # 'reduce-overhead' (the last two run the step as CUDA graphs: one process, gradient_accumulation_steps=1)
    compile_mode: str = "default"
    compile_optimizer: bool = False  # compile gradient clipping and AdamW's step together (AdamW then not fused)
    # 'auto' | 'sdpa' | 'fa4': FlashAttention-4 (flash-attn-4, requirements-fa4.txt; Hopper/Blackwell GPUs, bf16/fp16,
    # no dropout) for the causal attention of training and evaluation, or PyTorch's SDPA; auto: fa4 where it runs,
    # else sdpa. Kernels only, the math is the same, so a resumed run may switch
    attention: str = "auto"
    seed: int = 1337

    def __post_init__(self):
        """Each bad value named with the key to fix; the command line turns these into exit status 2."""
        at_least_one = ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                        "log_interval", "n_layer", "n_head", "n_embd")  # fmt: skip
        at_least_zero = ("max_iters", "final_eval_iters", "eval_batch_size", "vocab_size", "learning_rate", "min_lr",
                         "weight_decay", "grad_clip", "warmup_iters", "lr_decay_iters")  # fmt: skip
        for names, low in ((at_least_one, 1), (at_least_zero, 0)):
            for name in names:
                if not getattr(self, name) >= low:  # `not >=`: a nan fails too
                    raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):  # inf passes every `>=`
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if not 0 <= self.seed < 2**31:  # numpy takes 32-bit seeds, and each process adds its rank to the seed
            raise ValueError(f"seed must be in [0, 2**31 - 1], got {self.seed}")
        for size in self.eval_block_sizes:
            if size < 1:
                raise ValueError(f"eval_block_sizes must be context lengths >= 1, got {self.eval_block_sizes}")
        for name in ("dropout", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        GPTConfig(vocab_size=self.vocab_size or 1, **self.model_settings())  # the model's shape, as GPTConfig checks it
        check_dtype(self.dtype)
        check_compile_mode(self.compile_mode, self.compile)
        check_attention(self.attention, resolve_device(self.device), self.dtype, self.dropout)
        check_device(self.device)  # after fa4's check, whose message says more about a missing GPU

    def model_settings(self) -> dict:
        """The GPTConfig keys this config sets: the model's shape and its SLA settings. vocab_size 0 is sized from
        the data, and the kernels (KERNEL_KEYS) are chosen once the device is known (build_model)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(GPTConfig)
            if f.name not in ("vocab_size", *KERNEL_KEYS)
        }


EVAL_SEED = 0  # the validation windows' seed: fixed, so every run and every evaluation scores the same windows


def load_meta(data_dir: str, splits=("train", "val")) -> dict:
    """meta.json of a data folder, after checking that it is whole and that the token files for splits are there."""
    prepare_hint = (
        f"Prepare the data first, e.g. `python prepare_openwebtext.py --out_dir {data_dir}` (OpenWebText) or "
        f"`python prepare_openwebtext.py --files 'corpus/*.txt' --tokenizer byte --out_dir {data_dir}`"
    )
    for name in ("meta.json", *(f"{split}.bin" for split in splits)):
        if not os.path.exists(os.path.join(data_dir, name)):
            raise TrainError(f"{os.path.join(data_dir, name)} not found. {prepare_hint}")
    meta_path = os.path.join(data_dir, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TrainError(f"{meta_path} is not valid JSON ({err}): cut off or damaged? prepare the data again") from None
    missing = [key for key in ("tokenizer", "vocab_size", "dtype") if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise TrainError(
            f"{meta_path} lacks {', '.join(missing)}: not written by prepare_openwebtext.py? {prepare_hint}"
        )
    if meta["dtype"] not in ("uint16", "uint32"):
        raise TrainError(f"{meta_path}: dtype {meta['dtype']!r} is none of prepare_openwebtext.py's uint16, uint32")
    return meta


TOKEN_ID_SAMPLE = 1 << 22  # tokens whose largest id open_tokens checks: all of a smaller file, else spread samples


def open_tokens(data_dir: str, split: str, meta: dict, min_tokens: int) -> np.memmap:
    """
    data_dir/<split>.bin as a read-only memmap, after checking that it agrees with meta.json: a whole number of
    tokens, as many as meta.json records (where it does), ids below its vocab_size (all ids of a file up to
    TOKEN_ID_SAMPLE tokens, else that many in 64 spread runs: cheap on a 9B-token file), and min_tokens at least.
    """
    path = os.path.join(data_dir, f"{split}.bin")
    dtype = np.dtype(meta["dtype"])
    size = os.path.getsize(path)
    prepare_again = "prepare the data again (prepare_openwebtext.py --force)"
    if size == 0:
        raise TrainError(f"{path} is empty: {prepare_again}")
    if size % dtype.itemsize:
        raise TrainError(
            f"{path} is {size} bytes, not a whole number of {dtype} tokens ({dtype.itemsize} bytes each): "
            f"cut off? {prepare_again}"
        )
    tokens = np.memmap(path, dtype=dtype, mode="r")
    recorded = meta.get("splits", {}).get(split, {}).get("tokens")
    if recorded is not None and recorded != len(tokens):
        raise TrainError(
            f"{path} holds {len(tokens)} tokens, but {data_dir}/meta.json records {recorded}: the files are from "
            f"different preparations, or cut off; {prepare_again}"
        )
    if len(tokens) <= TOKEN_ID_SAMPLE:
        largest = int(tokens.max())
    else:
        run = TOKEN_ID_SAMPLE // 64
        largest = max(int(tokens[s : s + run].max()) for s in np.linspace(0, len(tokens) - run, 64, dtype=np.int64))
    if largest >= meta["vocab_size"]:
        raise TrainError(
            f"{path} holds token id {largest}, but {data_dir}/meta.json declares vocab_size {meta['vocab_size']}: "
            f"the tokens and meta.json do not belong together; {prepare_again}"
        )
    if len(tokens) < min_tokens:
        raise TrainError(
            f"{path} holds {len(tokens)} tokens, but a window of {min_tokens - 1} needs "
            f"{min_tokens}: use a smaller --block_size/--eval_block_sizes, or prepare more data "
            f"(for val.bin: prepare_openwebtext.py --val_fraction)"
        )
    return tokens


def windows_to_tensor(tokens: np.ndarray, starts, length: int, device, vocab_size: int | None = None) -> torch.Tensor:
    """
    (len(starts), length) int64 tensor of tokens[s : s + length] for each start s, on device. To a GPU through
    pinned memory without blocking, so the host can prepare the next batch while the device computes. With
    vocab_size, an id >= vocab_size is a TrainError here, not an index error (a device-side assert on a GPU).
    """
    windows = np.stack([tokens[s : s + length] for s in starts])
    if vocab_size is not None and windows.max() >= vocab_size:
        where = getattr(tokens, "filename", None) or "the token file"
        raise TrainError(f"{where} holds token id {windows.max()}, beyond the vocabulary of {vocab_size}")
    windows = torch.from_numpy(windows.astype(np.int64))
    if str(device).startswith("cuda"):
        return windows.pin_memory().to(device, non_blocking=True)
    return windows


def eval_window_starts(n_tokens: int, block_size: int, n_windows: int) -> np.ndarray:
    """
    Start offsets of the fixed validation windows at one context length. They depend on nothing but the val
    file and T (not on the training seed, state or world size), so evaluations compare across runs; drawn in
    sequence, so more windows extend the list instead of changing it.
    """
    return np.random.default_rng((EVAL_SEED, block_size)).integers(0, n_tokens - block_size, size=n_windows)


@torch.no_grad()
def evaluate_by_position(
    model: GPT,
    tokens: np.ndarray,
    block_sizes,
    eval_iters: int,
    batch_sizes: dict,
    dtype: str = "float32",
) -> dict[int, np.ndarray]:
    """
    Mean next-token loss at each position of the window, over eval_iters * batch_sizes[T] fixed windows of
    each length T in block_sizes, as {T: float64 array of length T}. Under torch.distributed the windows are
    split among the ranks and the sums all-reduced: every rank must call it, and all get the same numbers.
    Pass the bare model, not a DDP wrapper; a dtype other than float32 (e.g. "bfloat16") runs it under autocast.
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    autocast = autocast_context(str(device), dtype)
    was_training = model.training
    model.eval()
    losses = {}
    for T in block_sizes:
        batch_size = batch_sizes[T]
        starts = eval_window_starts(len(tokens), T, eval_iters * batch_size)
        # per-position loss sums, then the number of windows: one all-reduce carries both
        sums_and_count = torch.zeros(T + 1, dtype=torch.float64, device=device)
        my_starts = starts[rank::world_size]
        for first in range(0, len(my_starts), batch_size):
            windows = windows_to_tensor(tokens, my_starts[first : first + batch_size], T + 1, device)
            with autocast:
                _, token_losses = model(windows[:, :-1], windows[:, 1:], reduction="none", return_logits=False)
            sums_and_count[:T] += token_losses.double().sum(dim=0)
            sums_and_count[T] += windows.size(0)
        if world_size > 1:
            dist.all_reduce(sums_and_count)
        losses[T] = (sums_and_count[:T] / sums_and_count[T]).cpu().numpy()
    model.train(was_training)
    return losses


def evaluate(model: GPT, tokens: np.ndarray, block_sizes, eval_iters: int, batch_sizes: dict, dtype="float32"):
    """Mean next-token loss over the fixed windows of each length T, as {T: loss}; see evaluate_by_position."""
    by_position = evaluate_by_position(model, tokens, block_sizes, eval_iters, batch_sizes, dtype)
    return {T: float(losses.mean()) for T, losses in by_position.items()}


def position_buckets(T: int, block_sizes) -> list[tuple[int, int]]:
    """
    Position ranges [lo, hi) of a T-token window whose mean loss is logged apart: cut at 1024 and at every
    shorter evaluated length (16384 with 4K/8K/16K evaluated: 0-1024, 1024-4096, 4096-8192, 8192-16384).
    A gain from long-range context must show in the late buckets.
    """
    edges = [0, *sorted({edge for edge in (1024, *block_sizes) if 0 < edge < T}), T]
    return list(itertools.pairwise(edges))


def default_eval_block_sizes(block_size: int) -> tuple[int, ...]:
    return tuple(T for T in (4096, 8192, 16384) if T <= block_size) or (block_size,)


def get_lr(it: int, config: TrainConfig) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not config.decay_lr:
        return config.learning_rate
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
    if it > config.lr_decay_iters:
        return config.min_lr
    decay_ratio = (it - config.warmup_iters) / max(1, config.lr_decay_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (config.learning_rate - config.min_lr)


NOT_NUMBERS = ("iter", "config", "model_args", "provenance")  # keys of a log line that wandb does not plot


def make_log(log_path: str | None, wandb_run):
    """The one logging path: a JSON line in log_path (if given) and wandb (if a run is given). wandb gets the
    numbers; the run's settings ("config" lines) it has from wandb.init."""

    def log(metrics: dict):
        if log_path is not None:
            try:
                with open(log_path, "a") as f:  # opened per line: each line is on disk once logged
                    f.write(json.dumps(metrics) + "\n")
            except OSError as err:
                raise TrainError(f"cannot write {log_path}: {err.strerror or err}") from None
        numbers = {key: value for key, value in metrics.items() if key not in NOT_NUMBERS}
        if wandb_run is not None and numbers:
            wandb_run.log(numbers, step=metrics["iter"])

    return log


def drop_log_lines_after(log_path: str, iter_num: float) -> int:
    """
    On resume, forget lines that a crashed run logged after its last checkpoint: they will be redone. Lines that
    are no JSON record (cut off by a kill or a full disk) go too; returns how many such damaged lines there were.
    """
    if not os.path.exists(log_path):
        return 0
    kept, damaged = [], 0
    with open(log_path, errors="replace") as f:
        for line in f:
            try:
                logged_iter = json.loads(line)["iter"]
            except (json.JSONDecodeError, KeyError, TypeError):
                damaged += 1
                continue
            if logged_iter <= iter_num:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(log_path, "w") as f:
        f.writelines(kept)
    return damaged


# ----------------------------------------------------------------------------- the run's phases

# fixed by ckpt.pt: GPTConfig's fields but dropout and the kernel choices
ARCHITECTURE_KEYS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name not in ("dropout", *KERNEL_KEYS))
# keys that a resumed run may change and still continue the same training exactly: where it writes, how long it
# runs, how it is evaluated and logged, whether and how it is compiled and which attention kernels run
CONTINUATION_KEYS = {
    "out_dir", "overwrite", "init_from", "always_save_checkpoint", "eval_interval", "eval_iters", "final_eval_iters",
    "eval_block_sizes", "eval_batch_size", "eval_only", "eval_data_dir", "eval_tag", "log_interval", "wandb_log",
    "wandb_project", "wandb_run_name", "max_iters", "compile", "compile_mode", "compile_optimizer", "attention",
}  # fmt: skip


def resumed_config(config: TrainConfig, explicit_keys, checkpoint: dict, ckpt_path: str, say=print) -> TrainConfig:
    """
    The config of a resumed run: the checkpoint's saved config, overridden by the keys the user set (explicit_keys),
    with out_dir and init_from as given. A set key that contradicts the checkpoint's architecture is an error; one
    that changes the training itself (batch, seed, learning rate, ...) is allowed, with a note that the run is no
    longer an exact continuation.
    """
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise TrainError(
            f"{ckpt_path} has no {', '.join(missing)}: it holds a model to sample from, not a run to resume; "
            f"start a run from scratch in another --out_dir"
        )
    model_args = checkpoint["model_args"]
    given = {key: getattr(config, key) for key in explicit_keys}
    for key in ARCHITECTURE_KEYS:
        if key in given and given[key] != model_args[key] and not (key == "vocab_size" and given[key] == 0):
            raise TrainError(
                f"--{key}={given[key]} differs from the checkpoint's {key}={model_args[key]} ({ckpt_path}): "
                f"a resumed run keeps the checkpoint's architecture; leave out --{key}"
            )
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {key: value for key, value in checkpoint["config"].items() if key in known}
    unknown = sorted(set(checkpoint["config"]) - known)
    if unknown:
        say(f"note: ignoring keys of {ckpt_path}'s config that this train.py does not have: {', '.join(unknown)}")
    try:
        resumed = TrainConfig(**{**saved, **given, "out_dir": config.out_dir, "init_from": "resume"})
    except ValueError as err:
        raise ConfigError(f"the config of {ckpt_path} with your overrides: {err}") from None
    changed = [key for key in given if key not in CONTINUATION_KEYS and key in saved and given[key] != saved[key]]
    if changed and not resumed.eval_only:
        changes = ", ".join(f"{key}={given[key]} (was {saved[key]})" for key in changed)
        say(f"note: resuming with {changes}: the run is no longer an exact continuation of {ckpt_path}")
    return resumed


def check_run(config: TrainConfig, world_size: int):
    """Settings that cannot work together: found before building."""
    # The global batch is fixed by the config; processes share its micro-steps, so any world size trains alike.
    if config.gradient_accumulation_steps % world_size:
        raise ConfigError(
            f"gradient_accumulation_steps={config.gradient_accumulation_steps} is the global number of micro-steps"
            f" per optimizer step and must be divisible by the {world_size} processes"
        )
    if config.compile_mode in CUDA_GRAPH_MODES:
        check_cuda_graphs(config, world_size)
    if config.eval_block_sizes and max(config.eval_block_sizes) > config.block_size:
        raise ConfigError(
            f"eval_block_sizes {config.eval_block_sizes} go beyond the model's block_size {config.block_size}: "
            f"drop the larger ones (--eval_block_sizes=...) or train with a larger --block_size"
        )


def check_out_dir(config: TrainConfig):
    """
    Whether out_dir can take this run (rank 0, holding its lock). A run is its checkpoint: an out_dir whose run ended
    before its first save (max_iters=0, a crash, an early stop) holds only that run's log.jsonl, and a fresh run
    simply starts there, instead of being refused and sent to a resume that has nothing to resume.
    """
    ckpt_path, log_path = (os.path.join(config.out_dir, name) for name in ("ckpt.pt", "log.jsonl"))
    fresh = config.init_from != "resume"
    if fresh and os.path.exists(ckpt_path):
        if config.eval_only:  # it would evaluate a new model and log its loss as that run's, at iter 0
            raise TrainError(
                f"{config.out_dir} holds a run (ckpt.pt): --eval_only with --init_from={config.init_from} would "
                f"evaluate another model into its log; add --init_from=resume to evaluate the run's checkpoint, or "
                f"give another --out_dir"
            )
        if not config.overwrite:
            existing = [os.path.basename(path) for path in (ckpt_path, log_path) if os.path.exists(path)]
            raise TrainError(
                f"{config.out_dir} already holds a run ({', '.join(existing)}): continue it with "
                f"--out_dir={config.out_dir} --init_from=resume, or pass --overwrite=True to replace it with a new run"
            )
    elif fresh and not config.eval_only and os.path.exists(log_path):
        print(f"note: {log_path} is from a run that ended before its first checkpoint; this run replaces it")
    try:
        probe = os.path.join(config.out_dir, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as err:
        raise TrainError(f"cannot write to out_dir {config.out_dir}: {err.strerror or err}") from None


def check_cuda_graphs(config: TrainConfig, world_size: int):
    """
    A compile mode that runs the training step as CUDA graphs (CUDA_GRAPH_MODES) replays them with their outputs in
    one memory pool, which the next replay overwrites. So it trains one micro-step per optimizer step in one process:
    with accumulation a micro-step's replay overwrites the gradients of the one before it, which the parameters'
    .grad may still hold (wrong gradients, no error: pytorch/pytorch#169545), and under DDP the reducer all-reduces
    gradients that pool holds, a combination not verified to train correctly. Either is an error, not a fallback.
    """
    runs_as = f"compile_mode={config.compile_mode!r} runs the training step as CUDA graphs"
    other_modes = "or use --compile_mode=default (or max-autotune-no-cudagraphs)"
    if world_size > 1:
        raise ConfigError(
            f"{runs_as}, which train.py does not run under DDP ({world_size} processes): DDP would all-reduce "
            f"gradients held in the graphs' memory pool; train on one process, {other_modes}"
        )
    if config.gradient_accumulation_steps > 1:
        raise ConfigError(
            f"{runs_as}, whose replay overwrites the gradients of the micro-step before it: with "
            f"gradient_accumulation_steps={config.gradient_accumulation_steps} they would come out wrong; set "
            f"--gradient_accumulation_steps=1 (a larger --batch_size keeps the tokens per step), {other_modes}"
        )


def build_model(config: TrainConfig, checkpoint: dict | None, data_meta: dict, kernels: dict) -> GPT:
    """The model: from scratch, from a checkpoint (init_from=resume), or from released GPT-2 weights; computing with
    kernels (GPTConfig's KERNEL_KEYS), whatever the checkpoint's run used."""
    if config.init_from == "scratch":
        vocab_size = config.vocab_size or -(-data_meta["vocab_size"] // 64) * 64
        try:
            model = GPT(GPTConfig(vocab_size=vocab_size, **config.model_settings(), **kernels))
        except ValueError as err:  # GPTConfig's own checks name the key
            raise ConfigError(str(err)) from None
    elif config.init_from == "resume":
        model = model_from_checkpoint(checkpoint, dropout=config.dropout, **kernels)
    else:
        sla_settings = {key: getattr(config, key) for key in ("sla", "sla_head_ratio", "sla_skip")}
        model = pretrained_model(
            config.init_from, block_size=config.block_size, dropout=config.dropout, **sla_settings, **kernels
        )
        if model.config.block_size != config.block_size:
            raise TrainError(
                f"{config.init_from} has {model.config.block_size} positions; set --block_size to at most that"
            )
    model_config = model.config
    if model_config.sla and (model_config.n_skip_heads == 0 or model_config.sla_skip >= model_config.n_layer):
        raise ConfigError(
            f"--sla is set but no head would skip: round(sla_head_ratio * n_head) = "
            f"round({model_config.sla_head_ratio} * {model_config.n_head}) = {model_config.n_skip_heads} skip heads, "
            f"and sla_skip = {model_config.sla_skip} must be < n_layer = {model_config.n_layer}; "
            f"raise --sla_head_ratio or lower --sla_skip"
        )
    return model


def check_model_reads_data(config: TrainConfig, model: GPT, checkpoint: dict | None, data: dict[str, dict | None]):
    """Every data folder (name: meta) holds tokens of the model's tokenizer, with ids the model has embeddings for."""
    # the tokenizer the model has learnt, where known: its checkpoint's, GPT-2's, or (from scratch) the data's
    model_tokenizer = None  # a Hugging Face folder: only the vocabulary size can be checked
    if checkpoint:
        model_tokenizer = checkpoint["meta"]["tokenizer"]
    elif config.init_from == "scratch":
        model_tokenizer = next(meta for meta in data.values() if meta)["tokenizer"]
    elif config.init_from.startswith("gpt2"):
        model_tokenizer = "gpt2"
    for data_dir, data_meta in data.items():
        if data_meta and model_tokenizer and data_meta["tokenizer"] != model_tokenizer:
            raise TrainError(
                f"{data_dir} holds {data_meta['tokenizer']} tokens, but the model reads {model_tokenizer} tokens: "
                f"prepare it with `prepare_openwebtext.py --tokenizer {model_tokenizer}`"
            )
        if data_meta and data_meta["vocab_size"] > model.config.vocab_size:
            raise TrainError(
                f"{data_dir} has vocab_size {data_meta['vocab_size']}, more than the model's {model.config.vocab_size}:"
                f" set --vocab_size=0 (sized from meta.json) or at least {data_meta['vocab_size']}"
            )


@dataclass
class Progress:
    """The counters the loop advances (the first three are saved in every checkpoint) and its latest losses."""

    iter_num: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    saved_iter: int | None = None  # the iteration that out_dir/ckpt.pt holds; None: this run has none
    train_loss: float | None = None
    val_losses: dict = field(default_factory=dict)


@dataclass
class Run:
    """What setup() builds once and every phase reads."""

    config: TrainConfig
    device: str
    dtype: str  # resolved: bfloat16, float16 or float32
    rank: int
    world_size: int
    model: GPT  # the bare model; train_model wraps it (torch.compile, DDP) for the training forward and backward
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None  # None for eval_only
    scaler: torch.amp.GradScaler | None
    train_meta: dict | None
    train_tokens: np.memmap | None
    val_tokens: np.memmap
    eval_block_sizes: tuple[int, ...]
    eval_batch_sizes: dict[int, int]
    provenance: dict  # configurator.provenance: the code, torch, CUDA and device this run runs on
    log: object = None  # make_log's function
    wandb_run: object = None

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.config.out_dir, "ckpt.pt")

    @property
    def local_micro_steps(self) -> int:
        return self.config.gradient_accumulation_steps // self.world_size

    @property
    def tokens_per_iter(self) -> int:
        return self.config.gradient_accumulation_steps * self.config.batch_size * self.config.block_size

    def print(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)


def setup(config: TrainConfig, checkpoint: dict | None, device: str, rank: int) -> tuple[Run, Progress]:
    """Model, data, optimizer and log, restored from checkpoint if given: everything the loop needs."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    dtype = resolve_dtype(config.dtype, device)
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for the few float32 matmuls left outside autocast
    if config.compile_optimizer and dtype == "float16" and not config.eval_only:
        raise ConfigError(
            "compile_optimizer: compiles clipping and AdamW's step as one, which float16's loss scaling must run "
            "between (unscale, skip a step that overflowed): use --dtype=bfloat16, or --compile_optimizer=False"
        )
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    torch.manual_seed(config.seed + rank)  # DDP copies rank 0's initial weights to the others
    # the training data (none for eval_only) and the data evaluated on, which may be another corpus
    eval_data_dir = config.eval_data_dir or config.data_dir
    train_meta = None if config.eval_only else load_meta(config.data_dir)
    same_data = train_meta is not None and eval_data_dir == config.data_dir
    eval_meta = train_meta if same_data else load_meta(eval_data_dir, splits=("val",))
    attention = resolve_attention(config.attention, device, dtype, config.dropout)
    model = build_model(config, checkpoint, train_meta or eval_meta, kernels={"attention": attention})
    check_model_reads_data(config, model, checkpoint, {config.data_dir: train_meta, eval_data_dir: eval_meta})
    model.to(device)
    run_provenance = provenance(device)
    sla_summary = (
        f"{model.config.n_skip_heads} skip heads, sla_skip {model.config.sla_skip}" if model.config.sla else "off"
    )
    if rank == 0:
        n_params = model.get_num_params() / 1e6
        chosen = " (auto)" if config.attention == "auto" else ""
        compiled = f"compile mode {config.compile_mode}" if config.compile else "not compiled"
        print(describe_provenance(run_provenance))
        print(
            f"model: {n_params:.2f}M parameters, block_size {model.config.block_size}, SLA {sla_summary}, "
            f"attention {attention}{chosen}, {dtype}, {compiled}, compile_optimizer {config.compile_optimizer}"
        )

    eval_block_sizes = config.eval_block_sizes or default_eval_block_sizes(model.config.block_size)
    eval_batch_sizes = {
        T: config.eval_batch_size or max(1, config.batch_size * config.block_size // T) for T in eval_block_sizes
    }
    val_tokens = open_tokens(eval_data_dir, "val", eval_meta, min_tokens=max(eval_block_sizes) + 1)
    train_tokens, optimizer, scaler = None, None, None
    if not config.eval_only:
        train_tokens = open_tokens(config.data_dir, "train", train_meta, min_tokens=config.block_size + 1)
        device_type = "cuda" if device.startswith("cuda") else "cpu"
        betas = (config.beta1, config.beta2)
        optimizer = model.configure_optimizers(
            config.weight_decay, config.learning_rate, betas, device_type, for_compile=config.compile_optimizer
        )
        scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # float16 needs loss scaling
    run = Run(config, device, dtype, rank, world_size, model, model, optimizer, scaler, train_meta, train_tokens,
              val_tokens, eval_block_sizes, eval_batch_sizes, run_provenance)  # fmt: skip
    progress = Progress()
    if checkpoint:
        restore(run, progress, checkpoint)
    run.log, run.wandb_run = open_log(run, progress)
    if not config.eval_only:
        run.train_model = wrap_for_training(run)
    return run, progress


def wrap_for_training(run: Run) -> torch.nn.Module:
    """
    The model that the loop runs forward and backward: compiled if asked (in compile_mode), in DDP under torchrun.
    Evaluation runs the bare model, so no compiled graph (nor CUDA graph) is made for its other shapes.
    """
    mode = None if run.config.compile_mode == "default" else run.config.compile_mode
    train_model = torch.compile(run.model, mode=mode) if run.config.compile else run.model
    if run.ddp:
        on_gpu = run.device.startswith("cuda")
        train_model = DDP(train_model, device_ids=[torch.cuda.current_device()] if on_gpu else None)
        # Under DDP, torch.compile splits the model's graph at every 25 MB gradient bucket (its "DDPOptimizer"), so
        # that all-reduces overlap backward. We all-reduce once per optimizer step, after several micro-steps, so
        # there is little to overlap, while the split graph slowed every micro-step: 2 H100s ran at 0.94 (small
        # 16K) and 0.92 (medium 8K) of twice one GPU's tokens/s (results/ddp/). One graph instead.
        torch._dynamo.config.optimize_ddp = False
    return train_model


def open_log(run: Run, progress: Progress):
    """
    (log, wandb run): rank 0 writes out_dir/log.jsonl and, if enabled, wandb. A fresh run starts a fresh log (and
    with overwrite=True drops the old run's checkpoint); a resumed one forgets what was logged after its checkpoint.
    Each invocation (fresh, resumed, eval-only) logs its settings first, so a log says how its numbers were made.
    """
    config, log_path, wandb_run = run.config, None, None
    if run.master:
        if config.wandb_log:
            wandb_run = start_wandb(config)  # first: a wandb that cannot start leaves out_dir as it was
        log_path = os.path.join(config.out_dir, "log.jsonl")
        if config.init_from != "resume" and not config.eval_only:
            with contextlib.suppress(FileNotFoundError):
                os.remove(run.ckpt_path)  # check_run let this run replace an old one only with overwrite=True
            open(log_path, "w").close()
        else:
            # eval_only keeps every logged line, but not one cut off by a crash: the next line would join it
            damaged = drop_log_lines_after(log_path, math.inf if config.eval_only else progress.iter_num)
            if damaged:
                print(f"note: dropped {damaged} damaged line(s) of {log_path} (cut off by a crash or a full disk?)")
    log = make_log(log_path, wandb_run)
    log(
        {
            "iter": progress.iter_num,
            "tokens": progress.tokens_seen,
            # the kernels that run (attention=auto's choice among them), in the config as in model_args
            "config": {**asdict(config), "attention": run.model.config.attention},
            "model_args": asdict(run.model.config),
            "world_size": run.world_size,
            "provenance": run.provenance,
        }
    )
    return log, wandb_run


def start_wandb(config: TrainConfig):
    """A wandb run, or a TrainError that says how to get one (wandb raises errors of its own, with tracebacks)."""
    try:
        import wandb
    except ImportError:
        raise TrainError("wandb_log=True needs wandb: `pip install wandb`, or leave wandb_log off") from None
    try:
        return wandb.init(project=config.wandb_project, name=config.wandb_run_name, config=asdict(config))
    except Exception as err:  # e.g. UsageError: no API key; CommError: no network
        raise TrainError(
            f"wandb could not start a run ({first_line(err)}): log in once with `wandb login` (or set WANDB_API_KEY), "
            f"or log offline with WANDB_MODE=offline (`wandb sync` uploads later), or leave --wandb_log off"
        ) from None


# ----------------------------------------------------------------------------- checkpoint state


def training_state(run: Run, progress: Progress, rng: list[dict]) -> dict:
    """The one structure saved in ckpt.pt (see checkpoint.py); restore() reads it back."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "model_args": model_args(run.model.config),
        "config": asdict(run.config),
        "iter_num": progress.iter_num,
        "tokens_seen": progress.tokens_seen,
        "best_val_loss": progress.best_val_loss,
        "meta": run.train_meta,
        "rng": {"ranks": rng},  # per rank: python, numpy, torch, cuda; data windows follow iter_num
    }


def restore(run: Run, progress: Progress, checkpoint: dict):
    """Counters, optimizer, loss scaler and RNG states from a checkpoint (the weights are loaded by build_model)."""
    progress.iter_num = progress.saved_iter = checkpoint["iter_num"]
    progress.tokens_seen = checkpoint["tokens_seen"]
    progress.best_val_loss = checkpoint["best_val_loss"]
    if run.config.eval_only:
        return
    run.optimizer.load_state_dict(with_kernels_of(run.optimizer, checkpoint["optimizer"]))
    run.scaler.load_state_dict(checkpoint["scaler"])
    saved_rng = checkpoint["rng"]["ranks"]
    if len(saved_rng) == run.world_size:
        set_rng_state(saved_rng[run.rank])
    else:
        run.print(f"note: checkpoint from {len(saved_rng)} processes, now {run.world_size}: dropout RNG restarts")


OPTIMIZER_KERNEL_KEYS = ("lr", "foreach", "fused", "capturable")  # AdamW's param-group settings this run chooses


def with_kernels_of(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """
    A saved optimizer state dict with optimizer's implementation (fused, foreach, capturable: a resumed run may
    switch compile_optimizer) and learning-rate object (a tensor for a compiled step, which reads it as an input) in
    place of the saved ones; the loop sets the learning rate's value at every step.
    """
    groups = [
        {**saved_group, **{key: group[key] for key in OPTIMIZER_KERNEL_KEYS}}
        for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=True)
    ]
    return {**saved, "param_groups": groups}


def save(run: Run, progress: Progress, reason: str):
    """
    Every rank calls this (to gather its RNG state); rank 0 writes. Weights that are not finite are never saved.
    If rank 0 cannot write, every rank raises, instead of the others waiting for it in the next step.
    """
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        raise diverged(f"the weights hold non-finite values at iter {progress.iter_num}", run, progress)
    rng = [rng_state()]
    if run.ddp:
        rng = [None] * run.world_size
        dist.all_gather_object(rng, rng_state())
    error = [None]
    if run.master:
        try:
            save_checkpoint(training_state(run, progress, rng), run.ckpt_path)
        except TrainError as err:
            error = [str(err)]
    if run.ddp:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise TrainError(error[0] if run.master else f"rank 0 could not save {run.ckpt_path}; see its error")
    progress.saved_iter = progress.iter_num
    run.print(f"saved {run.ckpt_path} at iter {progress.iter_num} ({reason})")


def diverged(what: str, run: Run, progress: Progress) -> TrainError:
    """The error for a non-finite loss or weights, saying truthfully what the checkpoint holds."""
    if progress.saved_iter is None:
        kept = "no checkpoint was saved: start again, perhaps with a lower --learning_rate"
    else:
        kept = (
            f"{run.ckpt_path} (iter {progress.saved_iter}) left as it was: resume it with --init_from=resume, "
            f"perhaps with a lower --learning_rate"
        )
    return TrainError(f"{what}: training stopped, {kept}")


# ----------------------------------------------------------------------------- evaluation and training


def run_evaluation(run: Run, progress: Progress, eval_iters: int) -> dict[int, float]:
    """Evaluate on the fixed windows, print and log {tag}/loss@T and its position buckets; a non-finite loss stops."""
    tag = run.config.eval_tag
    by_position = evaluate_by_position(
        run.model, run.val_tokens, run.eval_block_sizes, eval_iters, run.eval_batch_sizes, run.dtype
    )
    losses = {T: float(position_losses.mean()) for T, position_losses in by_position.items()}
    metrics = {f"{tag}/loss@{T}": loss for T, loss in losses.items()}
    run.print(f"iter {progress.iter_num}: " + ", ".join(f"{key} {loss:.4f}" for key, loss in metrics.items()))
    for T, position_losses in by_position.items():
        buckets = position_buckets(T, run.eval_block_sizes)
        if len(buckets) > 1:  # one bucket would repeat loss@T
            for lo, hi in buckets:
                metrics[f"{tag}/loss@{T}/pos{lo}-{hi}"] = float(position_losses[lo:hi].mean())
    run.log({"iter": progress.iter_num, "tokens": progress.tokens_seen, **metrics})
    for T, loss in losses.items():
        if not math.isfinite(loss):
            raise diverged(f"{tag}/loss@{T} is {loss} at iter {progress.iter_num}", run, progress)
    return losses


def get_batch(run: Run, it: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Inputs and targets of global micro-step `micro_step` of optimizer step `it`. The windows come from a
    generator seeded by (seed, it, micro_step) alone, not by the rank or by any state: W processes that each
    take G / W of the G global micro-steps see exactly the windows that one process with G micro-steps
    sees, so any world size gives the same training, and a resumed run continues the same stream from
    iter_num alone (it is the data generator's whole state).
    """
    config = run.config
    generator = np.random.default_rng((config.seed, it, micro_step))
    starts = generator.integers(0, len(run.train_tokens) - config.block_size, size=config.batch_size)
    windows = windows_to_tensor(
        run.train_tokens, starts, config.block_size + 1, run.device, run.train_meta["vocab_size"]
    )
    return windows[:, :-1], windows[:, 1:]


def train_batches(run: Run, start_iter: int):
    """This rank's micro-batches from optimizer step start_iter on, in order (get_batch): the training stream."""
    first_micro_step = run.rank * run.local_micro_steps  # this rank's share of the global micro-steps
    for it in itertools.count(start_iter):
        for micro_step in range(run.local_micro_steps):
            yield get_batch(run, it, first_micro_step + micro_step)


class NonFiniteLoss(ArithmeticError):
    """A training step's loss is nan or inf. Raised when the step's loss reaches the host (StepOutcome.wait), once
    that step's optimizer step is queued: the weights in memory may be spoilt, so nothing is saved after it."""

    def __init__(self, loss: float):
        super().__init__(f"loss is {loss}")
        self.loss = loss


class StepOutcome:
    """
    A training step's mean loss and whether any process asked to stop, copied to the host behind the step without
    holding the host up: waiting for every step's loss before queuing the next left the device idle while the host
    launched the optimizer step and the next forward. wait() waits for this step alone (the steps queued after it
    keep the device busy), sets loss and stop, and raises NonFiniteLoss for a loss that is nan or inf.
    """

    def __init__(self, loss_and_stop: torch.Tensor, world_size: int):
        self.world_size = world_size
        self.loss: float | None = None
        self.stop: bool | None = None
        self._ready = None
        if loss_and_stop.device.type == "cuda":
            self._on_host = torch.empty(loss_and_stop.shape, dtype=loss_and_stop.dtype, pin_memory=True)
            self._on_host.copy_(loss_and_stop, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._on_host = loss_and_stop

    def wait(self) -> "StepOutcome":
        if self.loss is None:
            if self._ready is not None:
                self._ready.synchronize()
            loss_total, stop_votes = self._on_host.tolist()
            self.loss, self.stop = loss_total / self.world_size, stop_votes > 0
        if not math.isfinite(self.loss):
            raise NonFiniteLoss(self.loss)
        return self


def make_train_step(model, forward, optimizer, batches, *, micro_steps=1, grad_clip=1.0, autocast=None, scaler=None,
                    ddp_model=None, compile_optimizer=False):  # fmt: skip
    """
    The training step, as train.py trains with it and bench.py times it. step(stop_requested=False) queues one
    optimizer step of model on its device, waits for the step before it (so the host stays one step ahead of the
    device, never waiting for the step it just queued) and returns the new step's StepOutcome, not waited for:
    - micro_steps forward passes forward(inputs, targets) -> loss under autocast, each followed by the next batch
      drawn from the iterator batches (while the device works) and the backward of loss / micro_steps (through
      scaler, float16's loss scaling, if given). Under DDP (ddp_model, the DDP wrapper) only the last micro-step's
      backward all-reduces the gradients;
    - the mean loss and the stop request, all-reduced together under DDP so that every process agrees on both, and
      sent to the host (StepOutcome); the wait for the step before raises NonFiniteLoss if its loss was not finite;
    - clipping at grad_clip (0: none) and the optimizer's step, compiled together with compile_optimizer (PyTorch's
      compiled-optimizer recipe; the optimizer then made by configure_optimizers(for_compile=True)), and the
      gradients set to None.
    With CUDA graphs (compile modes reduce-overhead and max-autotune) each step is a new graph generation: the last
    step's outputs are used up (train.py's check_cuda_graphs allows one micro-step only).
    """
    autocast = contextlib.nullcontext() if autocast is None else autocast
    scaler = torch.amp.GradScaler(enabled=False) if scaler is None else scaler
    device = next(model.parameters()).device
    loss_scaling = scaler.is_enabled()  # float16 (compile_optimizer refuses it: torch.compile skips GradScaler)

    def clip_and_step():
        if loss_scaling:
            scaler.unscale_(optimizer)  # the true gradients are clipped
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if loss_scaling:
            scaler.step(optimizer)  # skips a step whose gradients overflowed
        else:
            optimizer.step()

    if compile_optimizer:
        clip_and_step = torch.compile(clip_and_step)
    batch = next(batches)
    previous = None  # the last step's outcome
    # CUDA graphs exist on CUDA only; elsewhere the call would import inductor (2 s) for nothing
    cuda_graphs_possible = device.type == "cuda"

    def step(stop_requested: bool = False) -> StepOutcome:
        nonlocal batch, previous
        if cuda_graphs_possible:
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the last step's outputs are used up, reuse them
        # micro-steps: forward, backward, and the next batch fetched while the device works
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(micro_steps):
            last_micro_step = micro_step == micro_steps - 1
            # DDP all-reduces gradients in backward; only the last micro-step's backward needs to
            sync = ddp_model.no_sync() if ddp_model is not None and not last_micro_step else contextlib.nullcontext()
            with sync:
                with autocast:
                    loss = forward(*batch)
                batch = next(batches)
                scaler.scale(loss / micro_steps).backward()
            loss_sum += loss.detach()

        # loss all-reduce: one all-reduce carries the loss and the stop flag, so all ranks agree on both. The flag is
        # filled in on the device: a tensor made from the host's value would be a blocking copy, which waits for the
        # forward and backward just queued and leaves the device idle while the host launches the optimizer step
        loss_and_stop = torch.stack([loss_sum / micro_steps, torch.full_like(loss_sum, float(stop_requested))])
        world_size = 1
        if ddp_model is not None:
            dist.all_reduce(loss_and_stop)
            world_size = dist.get_world_size()
        outcome = StepOutcome(loss_and_stop, world_size)

        # optimizer step
        clip_and_step()
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        # the step before: done by now or soon (this one is queued behind it); its loss checked
        if previous is not None:
            previous.wait()
        previous = outcome
        return outcome

    return step


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float):
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # compile_optimizer: the compiled step reads it as an input, not a constant
        else:
            group["lr"] = lr


class StepClock:
    """Seconds per training step between log lines; restarted after an evaluation, so that it times training only."""

    def __init__(self, iter_num: int):
        self.restart(iter_num)

    def restart(self, iter_num: int):
        self.time, self.iter_num = time.perf_counter(), iter_num

    def lap(self, iter_num: int) -> float:
        now = time.perf_counter()
        seconds_per_step = (now - self.time) / (iter_num - self.iter_num)
        self.time, self.iter_num = now, iter_num
        return seconds_per_step


def log_step(run: Run, progress: Progress, lr: float, clock: StepClock):
    # No synchronize: the step's loss is on the host, so its forward and backward are done and laps from one log line
    # to the next time whole steps; its optimizer step, still queued, keeps the device busy while the host logs
    step_time = clock.lap(progress.iter_num)
    tokens_per_s = run.tokens_per_iter / step_time
    mfu = run.model.estimate_mfu(tokens_per_s / run.world_size, seq_len=run.config.block_size)  # per GPU
    print(
        f"iter {progress.iter_num}: loss {progress.train_loss:.4f}, lr {lr:.2e}, {step_time * 1000:.1f} ms/step, "
        f"{tokens_per_s:,.0f} tokens/s, mfu {'-' if mfu is None else f'{mfu:.1%}'}"
    )
    run.log(
        {
            "iter": progress.iter_num,
            "tokens": progress.tokens_seen,
            "train/loss": progress.train_loss,
            "lr": lr,
            "ms_per_step": step_time * 1000,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
        }
    )


def fit(run: Run, progress: Progress, stop_requested: "StopRequest") -> dict:
    """The training loop, from progress.iter_num to max_iters or a stop request (SIGTERM, SIGINT)."""
    config = run.config
    run.print(
        f"{run.tokens_per_iter:,} tokens per optimizer step = {config.gradient_accumulation_steps} micro-steps "
        f"({run.local_micro_steps} on each of {run.world_size} processes) x {config.batch_size} x {config.block_size}"
    )
    if progress.iter_num == 0:
        progress.val_losses = run_evaluation(run, progress, config.eval_iters)
    elif progress.iter_num >= config.max_iters:
        run.print(f"at iter {progress.iter_num}, max_iters={config.max_iters}: nothing to train (raise max_iters)")
    train_step = make_train_step(
        run.model, lambda x, y: run.train_model(x, y, return_logits=False)[1], run.optimizer,
        train_batches(run, progress.iter_num), micro_steps=run.local_micro_steps, grad_clip=config.grad_clip,
        autocast=autocast_context(run.device, run.dtype), scaler=run.scaler,
        ddp_model=run.train_model if run.ddp else None, compile_optimizer=config.compile_optimizer,
    )  # fmt: skip
    clock = StepClock(progress.iter_num)
    outcome = None  # the last step's loss and stop votes, on their way to the host
    while progress.iter_num < config.max_iters:
        # learning rate
        lr = get_lr(progress.iter_num, config)
        set_learning_rate(run.optimizer, lr)

        # micro-steps, loss all-reduce, optimizer step (make_train_step): queued on the device; the call returns once
        # the step before is done, its loss checked. This step's loss is waited for only where it is needed
        previous = outcome
        try:
            outcome = train_step(stop_requested.is_set())  # a non-finite loss here is the step before's: iter_num
            progress.iter_num += 1
            progress.tokens_seen += run.tokens_per_iter
            finished = progress.iter_num == config.max_iters
            log_due = progress.iter_num % config.log_interval == 0
            evaluating = progress.iter_num % config.eval_interval == 0 or finished
            stop = previous is not None and previous.stop  # asked for by the step before's votes: all ranks agree
            if log_due or evaluating or stop:  # the same on every rank
                progress.train_loss = outcome.wait().loss
                stop = stop or outcome.stop
        except NonFiniteLoss as err:
            raise diverged(f"loss is {err.loss} at iter {progress.iter_num}", run, progress) from None

        # logging
        if log_due and run.master:
            log_step(run, progress, lr, clock)

        # evaluation and checkpoint
        if evaluating:
            eval_iters = config.final_eval_iters if finished and config.final_eval_iters else config.eval_iters
            progress.val_losses = run_evaluation(run, progress, eval_iters)
            stop = stop or stop_agreed(run, stop_requested)  # asked during the evaluation: this save is the last
            val_loss = progress.val_losses[max(run.eval_block_sizes)]  # the longest context is the one SLA is about
            improved = val_loss < progress.best_val_loss
            progress.best_val_loss = min(progress.best_val_loss, val_loss)
            if improved or config.always_save_checkpoint or finished or stop:
                save(run, progress, "end of training" if finished else "evaluation")
            clock.restart(progress.iter_num)  # ms/step: training steps only
        elif stop:
            save(run, progress, "stop requested")

        # stop
        if stop:
            launcher = "torchrun <its options> train.py" if run.ddp else "python train.py"
            run.print(
                f"stopped at iter {progress.iter_num}; continue with: {launcher} --out_dir={config.out_dir} "
                f"--init_from=resume (the checkpoint holds the rest of the config)"
            )
            break
    return summary(run, progress)


def stop_agreed(run: Run, stop_requested: "StopRequest") -> bool:
    """Whether any rank was asked to stop. Under DDP every rank calls it and all get the same answer, so that all
    save and leave together (a rank that left alone would leave the others waiting in the next all-reduce)."""
    votes = torch.tensor(float(stop_requested.is_set()), device=run.device)
    if run.ddp:
        dist.all_reduce(votes)
    return votes.item() > 0


def summary(run: Run, progress: Progress) -> dict:
    """Close wandb; the run's summary."""
    if run.wandb_run is not None:
        run.wandb_run.finish()
    return {
        "iter_num": progress.iter_num,
        "train_loss": progress.train_loss,
        "val_losses": progress.val_losses,
        "best_val_loss": progress.best_val_loss,
        "tokens_seen": progress.tokens_seen,
        "out_dir": run.config.out_dir,
    }


def main(config: TrainConfig, explicit_keys=None, stop_handler_stays: bool = False) -> dict:
    """
    Train (or, with eval_only, evaluate) as config says; returns a summary of the run. explicit_keys are the keys
    the user set (the command line's: configurator.parse_cli_explicit); on resume they override the checkpoint's
    saved config, which gives every other key. None, for in-process callers, counts each key that differs from
    TrainConfig's default as set. In-process callers get their SIGTERM and SIGINT handlers back at the end, unless
    stop_handler_stays (for the command line, see cli).
    """
    if explicit_keys is None:
        explicit_keys = {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != f.default}
    # only rank 0 writes out_dir, so only rank 0 locks it; torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    with out_dir_lock(config.out_dir) if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext():
        return train_or_evaluate(config, explicit_keys, stop_handler_stays)


def train_or_evaluate(config: TrainConfig, explicit_keys, stop_handler_stays: bool) -> dict:
    """main's work, in out_dir: load the checkpoint to resume, check, join the process group, set up, run."""
    ddp = "RANK" in os.environ  # a plain `python train.py` is one process
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    checkpoint = None
    if config.init_from == "resume":
        ckpt_path = run_checkpoint_path(config.out_dir)
        checkpoint = load_checkpoint(ckpt_path)  # to the CPU: the device may be among the saved settings
        config = resumed_config(config, explicit_keys, checkpoint, ckpt_path, print if rank == 0 else lambda _: None)
    check_run(config, int(os.environ.get("WORLD_SIZE", 1)))
    if rank == 0:
        check_out_dir(config)

    device = resolve_device(config.device)
    if device == "cuda" or (ddp and device.startswith("cuda")):
        device = f"cuda:{local_rank}"  # one GPU per process
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if ddp:
        if device.startswith("cuda"):
            dist.init_process_group(backend="nccl", device_id=torch.device(device))
        else:
            dist.init_process_group(backend="gloo")
    run = None
    try:
        # From here a stop signal saves (see StopRequest). Before, there is nothing to save, and the signal's default
        # action ends the process at once, also while it waits in init_process_group, where no Python handler runs
        # (torchrun stops the workers so when a peer has failed).
        with stop_requests(rank, keep=stop_handler_stays) as stop_requested:
            run, progress = setup(config, checkpoint, device, rank)
            checkpoint = None  # free the loaded tensors
            if config.eval_only:
                progress.val_losses = run_evaluation(run, progress, config.final_eval_iters or config.eval_iters)
                result = summary(run, progress)
            else:
                result = fit(run, progress, stop_requested)
            if ddp:
                dist.barrier()  # no rank tears the group down while rank 0 still writes
            return result
    finally:
        if ddp:
            close_process_group(run)


def run_checkpoint_path(out_dir: str) -> str:
    """out_dir's ckpt.pt, to resume. A log.jsonl without it is a run that ended before its first save: nothing to
    resume, and the way on is to start afresh (load_checkpoint's own message covers an out_dir with neither)."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(ckpt_path) and os.path.exists(os.path.join(out_dir, "log.jsonl")):
        raise TrainError(
            f"{out_dir} holds no checkpoint: its run ended before its first save, so there is nothing to resume; "
            f"start it afresh (without --init_from=resume)"
        )
    return ckpt_path


# ----------------------------------------------------------------------------- stopping, and the out_dir lock

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """
    The handler of SIGTERM (a scheduler's preemption or time limit) and SIGINT (Ctrl-C): it sets a flag, which fit()
    reads after each step and after each evaluation, then saves and returns. Every later signal, of either kind, only
    asks again: `timeout` and schedulers that signal a whole process group deliver a signal two or three times within
    milliseconds, and a second Ctrl-C must neither throw away the steps since the last checkpoint nor cut a save short.
    SIGKILL ends a run at once (ckpt.pt stays whole: saves go through a temporary file).

    The flag is a plain attribute, not a threading.Event: a handler runs between any two bytecodes of the main thread,
    so the second signal of a pair can run it again inside the first one's run, and Event.set() would then wait
    forever for the lock that the interrupted set() holds: the run hung, unsaved, until the scheduler killed it.
    """

    def __init__(self, rank: int):
        self.rank = rank
        self.requested = False

    def is_set(self) -> bool:
        return self.requested

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        already_stopping, self.requested = self.requested, True
        if already_stopping:
            message = (
                f"rank {self.rank}: got {name} again; already stopping: the run saves, then exits "
                f"(kill -KILL {os.getpid()} ends it now, losing the steps since the last checkpoint)"
            )
        else:
            message = f"rank {self.rank}: got {name}; saving after this step"
        # os.write, not print: a handler runs between any two bytecodes, maybe inside a print to stderr, whose buffer
        # raises on a reentrant write
        os.write(2, (message + "\n").encode())


@contextlib.contextmanager
def stop_requests(rank: int, keep: bool = False):
    """A StopRequest handles SIGTERM and SIGINT in the block; yields it (is_set() after a signal). The previous handlers
    are restored afterwards, unless keep: then the StopRequest stays, and the caller decides."""
    handler = StopRequest(rank)
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield handler
    finally:
        for sig, previous_handler in previous.items():
            if not keep:
                signal.signal(sig, signal.SIG_DFL if previous_handler is None else previous_handler)


LOCK_FILE = "train.lock"


@contextlib.contextmanager
def out_dir_lock(out_dir: str):
    """
    out_dir, made if missing and locked for the block: a second train.py started on it meanwhile is refused, instead
    of writing its log and checkpoints between this run's. The lock is an flock on out_dir/train.lock, not a pid
    file: the kernel releases it however the process ends (crash and SIGKILL included), so the lock of a dead run is
    simply taken over. An out_dir that this run made and leaves holding nothing but the lock file (it failed before
    writing: data not found, GPT-2 weights not downloadable) is removed again.
    """
    created = not os.path.isdir(out_dir)
    lock_path = os.path.join(out_dir, LOCK_FILE)
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise TrainError(f"cannot write to out_dir {out_dir}: {err.strerror or err}") from None
    try:
        take_lock(fd, out_dir)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield
    except BaseException:
        if created and os.listdir(out_dir) == [LOCK_FILE]:
            os.remove(lock_path)  # while still locked, so that no run takes the lock of a file about to go
            os.rmdir(out_dir)
        raise
    finally:
        os.close(fd)  # releases the lock


def take_lock(fd: int, out_dir: str):
    """Lock the open lock file fd without waiting, and write who holds it; a TrainError naming the holder if taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        raise TrainError(
            f"another train.py is running in {out_dir}{f' ({holder})' if holder else ''}: wait for it to end or "
            f"stop it (SIGTERM saves), or give another --out_dir"
        ) from None
    except OSError as err:  # a file system without locks (some network mounts)
        print(f"note: cannot lock {out_dir}/{LOCK_FILE} ({err.strerror}): a second run there would not be refused")
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)


def close_process_group(run: Run | None):
    """
    Free the process group, and so join its worker threads, inside destroy_process_group. Its Python object
    frees it with the GIL released; DDP's reducer, if it held the last reference, would free it holding the GIL,
    and wait forever on a gloo worker that is itself waiting for the GIL to drop a tensor of an earlier
    collective (a hung CPU test, seen in py-spy). So the DDP wrapper goes first.
    """
    if run is not None:
        run.train_model = run.model  # the bare model, without the DDP wrapper
    dist.destroy_process_group()


def cli() -> int:
    """
    `python train.py ...`; its exit status: 0 when the run finished, or stopped on a signal and saved; 1 for a
    TrainError (data, files, a diverged run, another run in out_dir); 2 for a ConfigError (settings that cannot work).
    """
    # Until training is set up a stop signal ends the process at once (nothing to save yet; Ctrl-C too, without a
    # traceback). Then main's StopRequest handles it, and stays after main has returned: the second signal of a pair
    # may come later, and must not kill a run that has saved.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    config, explicit_keys = parse_cli_explicit(TrainConfig)
    try:
        main(config, explicit_keys, stop_handler_stays=True)
        return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        # Ignored from here, not just handled: at shutdown Python gives signals with Python handlers back their
        # default action, and a late signal would still kill the finished process.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(cli())
