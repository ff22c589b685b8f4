"""
Train GPT-2, optionally with Skip-Layer Attention, on the token files that prepare_openwebtext.py writes.

    python train.py config/tiny_cpu.py                                          # CPU demo
    python train.py config/train_gpt2_small_4k.py --sla                         # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_small_16k.py --sla
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...  # 2 nodes
    python train.py --out_dir=out --init_from=resume                            # continue exactly
    python train.py --out_dir=out --init_from=resume --eval_only --eval_data_dir=data/owt --eval_tag=owt

Keys: `python train.py --help`. The helpers at the top (evaluate, checkpoints) are reused by other scripts;
main() reads top to bottom as the training loop.
"""

import contextlib
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import autocast_context, check_dtype, parse_cli, resolve_device, resolve_dtype
from model import GPT, GPTConfig


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
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
    seed: int = 1337

    def __post_init__(self):
        for name in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.log_interval < 1 or self.max_iters < 0 or self.final_eval_iters < 0:
            raise ValueError("log_interval must be >= 1, and max_iters and final_eval_iters >= 0")
        check_dtype(self.dtype)


class TrainError(RuntimeError):
    """A problem the user fixes (data, settings, divergence); the message says how. CLI: printed, exit 1."""


EVAL_SEED = 0  # the validation windows' seed: fixed, so every run and every evaluation scores the same windows


def load_meta(data_dir: str, splits=("train", "val")) -> dict:
    """meta.json of a data folder, after checking that the token files for splits are there."""
    for name in ("meta.json", *(f"{split}.bin" for split in splits)):
        if not os.path.exists(os.path.join(data_dir, name)):
            raise TrainError(
                f"{os.path.join(data_dir, name)} not found. Prepare the data first, e.g. "
                f"`python prepare_openwebtext.py --out_dir {data_dir}` (OpenWebText) or "
                f"`python prepare_openwebtext.py --files 'corpus/*.txt' --tokenizer byte --out_dir {data_dir}`"
            )
    with open(os.path.join(data_dir, "meta.json")) as f:
        return json.load(f)


def open_tokens(data_dir: str, split: str, meta: dict, min_tokens: int) -> np.memmap:
    tokens = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.dtype(meta["dtype"]), mode="r")
    if len(tokens) < min_tokens:
        raise TrainError(
            f"{data_dir}/{split}.bin holds {len(tokens)} tokens, but a window of {min_tokens - 1} needs "
            f"{min_tokens}: use a smaller --block_size/--eval_block_sizes, or prepare more data "
            f"(for val.bin: prepare_openwebtext.py --val_fraction)"
        )
    return tokens


def windows_to_tensor(tokens: np.ndarray, starts, length: int, device) -> torch.Tensor:
    """(len(starts), length) int64 tensor of tokens[s : s + length] for each start s, on device. To a GPU through
    pinned memory without blocking, so the host can prepare the next batch while the device computes."""
    windows = torch.from_numpy(np.stack([tokens[s : s + length] for s in starts]).astype(np.int64))
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


def rng_state() -> dict:
    """This process's RNG states as plain lists and tensors (torch.load(weights_only=True) accepts them)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict):
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def save_checkpoint(checkpoint: dict, path: str):
    """Atomic: a crash while writing leaves the previous checkpoint as it was."""
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint written by train.py (keys: see save() in main), loaded with weights_only=True."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise TrainError(
            f"no checkpoint at {path}: train one first (python train.py --out_dir={os.path.dirname(path)} ...), "
            f"or pass --out_dir=<a run's folder with ckpt.pt>"
        )
    return torch.load(path, map_location=map_location, weights_only=True)


def model_from_checkpoint(checkpoint: dict, **overrides) -> GPT:
    """The GPT of a checkpoint, weights loaded; overrides change GPTConfig fields that keep the shapes (dropout)."""
    model = GPT(GPTConfig(**{**checkpoint["model_args"], **overrides}))
    # train.py saves the bare model; a torch.compile'd module's state dict has its keys prefixed
    model.load_state_dict({key.removeprefix("_orig_mod."): value for key, value in checkpoint["model"].items()})
    return model


def make_log(log_path: str | None, wandb_run):
    """The one logging path: a JSON line in log_path (if given) and wandb (if a run is given). wandb gets the
    numbers; the run's settings ("config" lines) it has from wandb.init."""

    def log(metrics: dict):
        if log_path is not None:
            with open(log_path, "a") as f:  # opened per line: each line is on disk once logged
                f.write(json.dumps(metrics) + "\n")
        numbers = {key: value for key, value in metrics.items() if key not in ("iter", "config", "model_args")}
        if wandb_run is not None and numbers:
            wandb_run.log(numbers, step=metrics["iter"])

    return log


def drop_log_lines_after(log_path: str, iter_num: int):
    """On resume, forget lines that a crashed run logged after its last checkpoint: they will be redone."""
    if os.path.exists(log_path):
        with open(log_path) as f:
            lines = [line for line in f if json.loads(line)["iter"] <= iter_num]
        with open(log_path, "w") as f:
            f.writelines(lines)


def main(config: TrainConfig) -> dict:
    """Train (or, with eval_only, evaluate) as config says; returns a summary of the run."""
    # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python train.py` is one process
    ddp = "RANK" in os.environ
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
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
    # SIGTERM (cluster preemption) and SIGINT set a flag; the loop finishes its step, saves and exits 0.
    # The handler then steps aside, so a second signal acts at once.
    stop_requested = threading.Event()

    def request_stop(signum, frame):
        print(f"rank {rank}: got {signal.Signals(signum).name}; saving after this step", file=sys.stderr, flush=True)
        stop_requested.set()
        signal.signal(signum, previous_handlers[signum] or signal.SIG_DFL)

    previous_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous_handlers:
        signal.signal(sig, request_stop)
    try:
        summary = _run(config, device, ddp, rank, stop_requested)
        if ddp:
            dist.barrier()  # no rank tears the group down while rank 0 still writes
        return summary
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if ddp:
            dist.destroy_process_group()


def _run(config: TrainConfig, device: str, ddp: bool, rank: int, stop_requested: threading.Event) -> dict:
    world_size = dist.get_world_size() if ddp else 1
    master = rank == 0
    print0 = print if master else lambda *args, **kwargs: None
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = resolve_dtype(config.dtype, device)
    autocast = autocast_context(device, dtype)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the few float32 matmuls left outside autocast

    # The global batch is fixed by the config; processes share its micro-steps, so any world size trains alike.
    if config.gradient_accumulation_steps % world_size:
        raise TrainError(
            f"gradient_accumulation_steps={config.gradient_accumulation_steps} is the global number of micro-steps"
            f" per optimizer step and must be divisible by the {world_size} processes"
        )
    local_micro_steps = config.gradient_accumulation_steps // world_size
    tokens_per_iter = config.gradient_accumulation_steps * config.batch_size * config.block_size

    # ---- model: scratch, resume, or released GPT-2 weights ----
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    torch.manual_seed(config.seed + rank)  # DDP copies rank 0's initial weights to the others
    # the training data (none for eval_only) and the data evaluated on, which may be another corpus
    eval_data_dir = config.eval_data_dir or config.data_dir
    train_meta = None if config.eval_only else load_meta(config.data_dir)
    same_data = train_meta is not None and eval_data_dir == config.data_dir
    eval_meta = train_meta if same_data else load_meta(eval_data_dir, splits=("val",))
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    checkpoint = None
    sla_settings = {k: getattr(config, k) for k in ("sla", "sla_head_ratio", "sla_skip")}
    if config.init_from == "scratch":
        vocab_size = config.vocab_size or -(-(train_meta or eval_meta)["vocab_size"] // 64) * 64
        arch = {k: getattr(config, k) for k in ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")}
        try:
            model_config = GPTConfig(vocab_size=vocab_size, **arch, **sla_settings)
        except ValueError as err:  # GPTConfig's own checks name the key
            raise TrainError(str(err)) from None
        raw_model = GPT(model_config)
    elif config.init_from == "resume":
        checkpoint = load_checkpoint(ckpt_path, map_location=device)
        raw_model = model_from_checkpoint(checkpoint, dropout=config.dropout)
        # an exact continuation needs the same model and windows: pass the original run's config again
        saved = checkpoint["model_args"]
        for key in ("block_size", "n_layer", "n_head", "n_embd", "bias", "sla", "sla_head_ratio", "sla_skip"):
            if getattr(config, key) != saved[key]:
                raise TrainError(
                    f"--{key}={getattr(config, key)} differs from the checkpoint's {key}={saved[key]} ({ckpt_path}): "
                    f"resume with the settings (config file and overrides) of the run that wrote it"
                )
    else:
        raw_model = GPT.from_pretrained(
            config.init_from, block_size=config.block_size, dropout=config.dropout, **sla_settings
        )
        if raw_model.config.block_size != config.block_size:
            raise TrainError(
                f"{config.init_from} has {raw_model.config.block_size} positions; set --block_size to at most that"
            )
    model_config = raw_model.config
    if model_config.sla and (model_config.n_skip_heads == 0 or model_config.sla_skip >= model_config.n_layer):
        raise TrainError(
            f"--sla is set but no head would skip: round(sla_head_ratio * n_head) = "
            f"round({model_config.sla_head_ratio} * {model_config.n_head}) = {model_config.n_skip_heads} skip heads, "
            f"and sla_skip = {model_config.sla_skip} must be < n_layer = {model_config.n_layer}; "
            f"raise --sla_head_ratio or lower --sla_skip"
        )
    # the tokenizer the model has learnt, where known: its checkpoint's, GPT-2's, or (from scratch) the data's
    model_tokenizer = None  # a Hugging Face folder: only the vocabulary size can be checked
    if checkpoint:
        model_tokenizer = checkpoint["meta"]["tokenizer"]
    elif config.init_from == "scratch":
        model_tokenizer = (train_meta or eval_meta)["tokenizer"]
    elif config.init_from.startswith("gpt2"):
        model_tokenizer = "gpt2"
    for data_dir, data_meta in ((config.data_dir, train_meta), (eval_data_dir, eval_meta)):
        if data_meta and model_tokenizer and data_meta["tokenizer"] != model_tokenizer:
            raise TrainError(
                f"{data_dir} holds {data_meta['tokenizer']} tokens, but the model reads {model_tokenizer} tokens: "
                f"prepare it with `prepare_openwebtext.py --tokenizer {model_tokenizer}`"
            )
        if data_meta and data_meta["vocab_size"] > model_config.vocab_size:
            raise TrainError(
                f"{data_dir} has vocab_size {data_meta['vocab_size']}, more than the model's {model_config.vocab_size}:"
                f" set --vocab_size=0 (sized from meta.json) or at least {data_meta['vocab_size']}"
            )
    raw_model.to(device)
    sla_summary = (
        f"{model_config.n_skip_heads} skip heads, sla_skip {model_config.sla_skip}" if model_config.sla else "off"
    )
    n_params = raw_model.get_num_params() / 1e6
    print0(f"model: {n_params:.2f}M parameters, block_size {model_config.block_size}, SLA {sla_summary}")

    # ---- evaluation: fixed windows at each context length ----
    eval_block_sizes = config.eval_block_sizes or default_eval_block_sizes(model_config.block_size)
    if max(eval_block_sizes) > model_config.block_size:
        raise TrainError(
            f"eval_block_sizes {eval_block_sizes} go beyond the model's block_size {model_config.block_size}: "
            f"drop the larger ones (--eval_block_sizes=...) or train with a larger --block_size"
        )
    val_tokens = open_tokens(eval_data_dir, "val", eval_meta, min_tokens=max(eval_block_sizes) + 1)
    eval_batch_sizes = {
        T: config.eval_batch_size or max(1, config.batch_size * config.block_size // T) for T in eval_block_sizes
    }
    iter_num = checkpoint["iter_num"] if checkpoint else 0
    tokens_seen = checkpoint["tokens_seen"] if checkpoint else 0
    best_val_loss = checkpoint["best_val_loss"] if checkpoint else float("inf")

    # ---- logging: rank 0 writes out_dir/log.jsonl and, if enabled, wandb ----
    log_path, wandb_run = None, None
    if master:
        os.makedirs(config.out_dir, exist_ok=True)
        log_path = os.path.join(config.out_dir, "log.jsonl")
        if config.init_from != "resume" and not config.eval_only:
            open(log_path, "w").close()  # a fresh run starts a fresh log
        elif not config.eval_only:
            drop_log_lines_after(log_path, iter_num)
        if config.wandb_log:
            try:
                import wandb
            except ImportError:
                raise TrainError("wandb_log=True needs wandb: `pip install wandb`, or leave wandb_log off") from None
            wandb_run = wandb.init(project=config.wandb_project, name=config.wandb_run_name, config=asdict(config))
    log = make_log(log_path, wandb_run)
    # each invocation (fresh, resumed, eval-only) records its settings, so a log says how its numbers were made
    log(
        {
            "iter": iter_num,
            "tokens": tokens_seen,
            "config": asdict(config),
            "model_args": asdict(model_config),
            "world_size": world_size,
        }
    )

    def run_evaluation(eval_iters: int) -> dict[int, float]:
        by_position = evaluate_by_position(raw_model, val_tokens, eval_block_sizes, eval_iters, eval_batch_sizes, dtype)
        losses = {T: float(position_losses.mean()) for T, position_losses in by_position.items()}
        metrics = {f"{config.eval_tag}/loss@{T}": loss for T, loss in losses.items()}
        print0(f"iter {iter_num}: " + ", ".join(f"{key} {loss:.4f}" for key, loss in metrics.items()))
        for T, position_losses in by_position.items():
            buckets = position_buckets(T, eval_block_sizes)
            if len(buckets) > 1:  # one bucket would repeat loss@T
                for lo, hi in buckets:
                    metrics[f"{config.eval_tag}/loss@{T}/pos{lo}-{hi}"] = float(position_losses[lo:hi].mean())
        log({"iter": iter_num, "tokens": tokens_seen, **metrics})
        return losses

    def finish(train_loss=None, val_losses=None) -> dict:
        """Close wandb; the run's summary."""
        if wandb_run is not None:
            wandb_run.finish()
        return {
            "iter_num": iter_num,
            "train_loss": train_loss,
            "val_losses": val_losses or {},
            "best_val_loss": best_val_loss,
            "tokens_seen": tokens_seen,
            "out_dir": config.out_dir,
        }

    if config.eval_only:
        return finish(val_losses=run_evaluation(config.final_eval_iters or config.eval_iters))

    # ---- training state ----
    train_tokens = open_tokens(config.data_dir, "train", train_meta, min_tokens=config.block_size + 1)
    optimizer = raw_model.configure_optimizers(
        config.weight_decay, config.learning_rate, (config.beta1, config.beta2), device_type
    )
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # float16 needs loss scaling
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        saved_rng = checkpoint["rng"]["ranks"]
        if len(saved_rng) == world_size:
            set_rng_state(saved_rng[rank])
        else:
            print0(f"note: checkpoint from {len(saved_rng)} processes, now {world_size}: dropout RNG restarts")
    checkpoint = None  # free the loaded tensors
    train_model = torch.compile(raw_model) if config.compile else raw_model
    if ddp:
        # DDP keeps its process group alive until the interpreter exits (torch 2.13), and on gloo that keeps the
        # group's worker threads too; one still freeing the tensors of our own collectives (loss, evaluation, RNG
        # gather) while Python shuts down aborts a finished run. So on gloo DDP gets a group of its own and the
        # default group is torn down in main(). On NCCL, destroy_process_group shuts the communicators down
        # itself, so one group serves (untested here: we had no multi-GPU machine).
        ddp_group = dist.new_group(backend="gloo") if device_type == "cpu" else None
        device_ids = [torch.cuda.current_device()] if device_type == "cuda" else None
        train_model = DDP(train_model, device_ids=device_ids, process_group=ddp_group)
        # Under DDP, torch.compile splits the model's graph at every 25 MB gradient bucket (its "DDPOptimizer"), so
        # that all-reduces overlap backward. We all-reduce once per optimizer step, after several micro-steps, so
        # there is little to overlap, while the split graph slowed every micro-step: 2 H100s ran at 0.94 (small
        # 16K) and 0.92 (medium 8K) of twice one GPU's tokens/s (results/ddp/). One graph instead.
        torch._dynamo.config.optimize_ddp = False

    def get_batch(it: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Inputs and targets of global micro-step `micro_step` of optimizer step `it`. The windows come from a
        generator seeded by (seed, it, micro_step) alone, not by the rank or by any state: W processes that each
        take G / W of the G global micro-steps see exactly the windows that one process with G micro-steps
        sees, so any world size gives the same training, and a resumed run continues the same stream from
        iter_num alone (it is the data generator's whole state).
        """
        generator = np.random.default_rng((config.seed, it, micro_step))
        starts = generator.integers(0, len(train_tokens) - config.block_size, size=config.batch_size)
        windows = windows_to_tensor(train_tokens, starts, config.block_size + 1, device)
        return windows[:, :-1], windows[:, 1:]

    def save(reason: str):
        """Every rank calls this (to gather its RNG state); rank 0 writes."""
        rng = [rng_state()]
        if ddp:
            rng = [None] * world_size
            dist.all_gather_object(rng, rng_state())
        if master:
            state = {
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "model_args": asdict(model_config),
                "config": asdict(config),
                "iter_num": iter_num,
                "tokens_seen": tokens_seen,
                "best_val_loss": best_val_loss,
                "meta": train_meta,
                "rng": {"ranks": rng},  # per rank: python, numpy, torch, cuda; data windows follow iter_num
            }
            save_checkpoint(state, ckpt_path)
            print0(f"saved {ckpt_path} at iter {iter_num} ({reason})")

    print0(
        f"{tokens_per_iter:,} tokens per optimizer step = {config.gradient_accumulation_steps} micro-steps "
        f"({local_micro_steps} on each of {world_size} processes) x {config.batch_size} x {config.block_size}"
    )
    val_losses = run_evaluation(config.eval_iters) if iter_num == 0 else None
    train_loss = None
    first_micro_step = rank * local_micro_steps  # this rank's share of the global micro-steps
    x, y = get_batch(iter_num, first_micro_step)
    last_log_time, last_log_iter = time.perf_counter(), iter_num
    while iter_num < config.max_iters:
        lr = get_lr(iter_num, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(local_micro_steps):
            last_micro_step = micro_step == local_micro_steps - 1
            # DDP all-reduces gradients in backward; only the last micro-step's backward needs to
            sync = train_model.no_sync() if ddp and not last_micro_step else contextlib.nullcontext()
            with sync:
                with autocast:
                    _, loss = train_model(x, y, return_logits=False)
                # fetch the next micro-batch while the device works on this one
                next_iter, next_micro_step = (iter_num + 1, 0) if last_micro_step else (iter_num, micro_step + 1)
                x, y = get_batch(next_iter, first_micro_step + next_micro_step)
                scaler.scale(loss / local_micro_steps).backward()
            loss_sum += loss.detach()

        # One all-reduce per step carries the loss (for the log and the divergence check) and the stop flag,
        # so all ranks agree on both. Waiting for it costs little: a step is many micro-steps long.
        loss_and_stop = torch.stack([loss_sum / local_micro_steps, loss_sum.new_tensor(stop_requested.is_set())])
        if ddp:
            dist.all_reduce(loss_and_stop)
        loss_total, stop_votes = loss_and_stop.tolist()
        train_loss, stop = loss_total / world_size, stop_votes > 0
        if not math.isfinite(train_loss):
            raise TrainError(
                f"loss is {train_loss} at iter {iter_num + 1}: training stopped, {ckpt_path} left as it was "
                f"(resume it with --init_from=resume, perhaps with a lower --learning_rate)"
            )
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        tokens_seen += tokens_per_iter

        if iter_num % config.log_interval == 0 and master:
            if device_type == "cuda":
                torch.cuda.synchronize()  # the clock reads finished work; only on log steps, not every step
            now = time.perf_counter()
            step_time = (now - last_log_time) / (iter_num - last_log_iter)
            last_log_time, last_log_iter = now, iter_num
            tokens_per_s = tokens_per_iter / step_time
            mfu = raw_model.estimate_mfu(tokens_per_s / world_size, seq_len=config.block_size)  # per GPU
            print(
                f"iter {iter_num}: loss {train_loss:.4f}, lr {lr:.2e}, {step_time * 1000:.1f} ms/step, "
                f"{tokens_per_s:,.0f} tokens/s, mfu {'-' if mfu is None else f'{mfu:.1%}'}"
            )
            log(
                {
                    "iter": iter_num,
                    "tokens": tokens_seen,
                    "train/loss": train_loss,
                    "lr": lr,
                    "ms_per_step": step_time * 1000,
                    "tokens_per_s": tokens_per_s,
                    "mfu": mfu,
                }
            )

        finished = iter_num == config.max_iters
        if iter_num % config.eval_interval == 0 or finished:
            val_losses = run_evaluation(
                config.final_eval_iters if finished and config.final_eval_iters else config.eval_iters
            )
            val_loss = val_losses[max(eval_block_sizes)]  # the longest context is the one SLA is about
            improved = val_loss < best_val_loss
            best_val_loss = min(best_val_loss, val_loss)
            if improved or config.always_save_checkpoint or finished or stop:
                save("end of training" if finished else "evaluation")
            last_log_time, last_log_iter = time.perf_counter(), iter_num  # ms/step: training steps only
        elif stop:
            save("stop requested")
        if stop:
            print0(f"stopped at iter {iter_num}; continue with --init_from=resume")
            break
    return finish(train_loss, val_losses)


if __name__ == "__main__":
    try:
        main(parse_cli(TrainConfig))
    except TrainError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
