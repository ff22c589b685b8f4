"""
Sample text from a trained checkpoint or from OpenAI's GPT-2 weights, with the model's KV-cache generate.

    python sample.py --out_dir=out-sla --start="The meaning of life is" --num_samples=3
    python sample.py --out_dir=out-sla --start=FILE:prompt.txt --temperature=0.7 --top_k=50
    python sample.py --init_from=gpt2 --sla --sla_skip=1             # GPT-2 weights, run with SLA

Keys: `python sample.py --help`. A checkpoint samples with the SLA settings it was trained with (its
model_args); --sla, --sla_head_ratio and --sla_skip apply to GPT-2 weights only.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from checkpoint import TrainError, load_checkpoint, model_from_checkpoint, pretrained_model
from configurator import (
    autocast_context,
    check_device,
    check_dtype,
    parse_cli,
    resolve_device,
    resolve_dtype,
    resolve_freeze_weights,
)
from model import GPT
from prepare_openwebtext import get_tokenizer

MIN_TEMPERATURE = 1e-6  # greedy in effect already; far below it, logits / temperature overflow float32 to inf


@dataclass
class SampleConfig:
    init_from: str = "resume"  # 'resume' (out_dir/ckpt.pt) | 'gpt2' | 'gpt2-medium' | ... | a Hugging Face GPT-2 dir
    out_dir: str = "out"
    # SLA for GPT-2 weights; None: not given (GPTConfig's default). With a checkpoint, only its own values are allowed.
    sla: bool | None = None
    sla_head_ratio: float | None = None
    sla_skip: int | None = None
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 3
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 is greedy
    top_k: int | None = 200  # None: sample from the full distribution
    seed: int = 1337
    device: str = "auto"  # 'auto' (cuda if available) | 'cpu' | 'cuda' | 'cuda:N'
    dtype: str = "auto"  # 'auto' (bfloat16 on CUDA, float16 if unsupported; float32 on CPU) | 'bfloat16' | ...
    compile: bool = False
    # with compile: the weights become constants of the compiled decode step, so autocast casts them once, not per token
    # (1.5x the tokens/s on an H100); None: with --compile
    freeze_weights: bool | None = None

    def __post_init__(self):
        if self.num_samples < 1 or self.max_new_tokens < 0:
            raise ValueError("num_samples must be >= 1 and max_new_tokens >= 0")
        if not (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE):  # `not`: a nan fails too
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None: the full distribution), got {self.top_k}")
        self.freeze_weights = resolve_freeze_weights("freeze_weights", self.freeze_weights, self.compile)
        check_dtype(self.dtype)
        check_device(self.device)


class SampleError(RuntimeError):
    """A problem the user fixes (paths, prompt, flags); the message says how. CLI: printed, exit 1."""


def requested_sla(config: SampleConfig) -> dict:
    """The SLA settings given on the command line (those not None), --sla=False included."""
    requested = {}
    for key in ("sla", "sla_head_ratio", "sla_skip"):
        if getattr(config, key) is not None:
            requested[key] = getattr(config, key)
    return requested


def load_checkpoint_model(config: SampleConfig) -> tuple[GPT, str]:
    """The model of out_dir/ckpt.pt and the name of the tokenizer its training data used."""
    path = Path(config.out_dir) / "ckpt.pt"
    try:
        checkpoint = load_checkpoint(str(path))
        model = model_from_checkpoint(checkpoint)
    except TrainError as err:
        raise SampleError(str(err)) from None
    model_args = checkpoint["model_args"]
    for key, value in requested_sla(config).items():
        if value != model_args[key]:
            raise SampleError(
                f"--{key}={value} differs from the checkpoint's {key}={model_args[key]} ({path}): a checkpoint "
                f"samples with the SLA settings it was trained with, so leave out --{key}"
            )
    tokenizer_name = checkpoint.get("meta", {}).get("tokenizer")
    if tokenizer_name is None:
        raise SampleError(f"{path} records no tokenizer (checkpoint['meta']['tokenizer']); was it made by train.py?")
    return model, tokenizer_name


def load_pretrained_model(config: SampleConfig) -> GPT:
    overrides = requested_sla(config)
    without_effect = [f"--{key}" for key in overrides if key != "sla"] if not config.sla else []
    if without_effect:
        raise SampleError(f"{', '.join(without_effect)} without --sla would change nothing")
    try:
        return pretrained_model(config.init_from, **overrides)
    except TrainError as err:
        raise SampleError(str(err)) from None


def load_tokenizer(name: str, source: str):
    try:
        return get_tokenizer(name)
    except (ValueError, RuntimeError) as err:  # an unknown name; tiktoken's BPE files not found offline
        raise SampleError(f"{source} uses the tokenizer {name!r}, which sample.py cannot load: {err}") from None


def drop_padding_tokens(model: GPT, vocab_size: int):
    """
    Keep only the tokenizer's rows of the (tied) token embedding. train.py rounds the vocabulary up to a
    multiple of 64 for faster matmuls; the extra ids are no tokens, yet a model can sample them. Without
    their logits, the softmax samples from the real tokens alone.
    """
    if vocab_size > model.config.vocab_size:
        raise SampleError(f"the tokenizer has {vocab_size} tokens, the model only {model.config.vocab_size}")
    weight = nn.Parameter(model.lm_head.weight[:vocab_size])
    model.lm_head.weight = model.transformer.wte.weight = weight
    model.config.vocab_size = vocab_size


def read_prompt(start: str) -> str:
    if not start.startswith("FILE:"):
        return start
    path = Path(start.removeprefix("FILE:"))
    if not path.is_file():
        raise SampleError(f"prompt file {path} not found (from --start={start})")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SampleError(f"prompt file {path} (from --start={start}) is not UTF-8 text: byte {err.start}") from None


def main(config: SampleConfig) -> list[str]:
    """Print config.num_samples samples (prompt included) and the decoding speed; return the samples."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    autocast = autocast_context(device, dtype)

    if config.init_from == "resume":
        model, tokenizer_name = load_checkpoint_model(config)
        tokenizer = load_tokenizer(tokenizer_name, f"the checkpoint in {config.out_dir}")
    else:
        model = load_pretrained_model(config)
        tokenizer = load_tokenizer("gpt2", config.init_from)  # every released GPT-2 uses its own BPE
    drop_padding_tokens(model, tokenizer.vocab_size)
    model.eval().to(device)
    if config.compile:
        # the step generate runs per token; its shapes are the same for any prompt
        model.compile_decode_step(freeze_weights=config.freeze_weights)

    prompt_ids = tokenizer.encode(read_prompt(config.start)) or [tokenizer.eot_token]
    if len(prompt_ids) > model.config.block_size:
        raise SampleError(
            f"the prompt is {len(prompt_ids)} tokens, longer than the model's block_size of "
            f"{model.config.block_size}: shorten it"
        )
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(config.seed)  # the same seed gives the same samples

    if config.compile:
        # A warm-up on one token, with a generator of its own (the samples stay the seed's), compiles the decode
        # step; on CUDA its next steps record and replay the CUDA graph.
        started = time.perf_counter()
        with autocast:
            warm_up = model.generate(prompt[:, :1], 4, config.temperature, config.top_k, torch.Generator(device))
        warm_up[0, -1].item()  # waits for the device
        print(f"decode step compiled in {time.perf_counter() - started:.1f} s (once per process)", file=sys.stderr)

    samples, seconds = [], 0.0
    for _ in range(config.num_samples):
        started = time.perf_counter()
        with autocast:
            ids = model.generate(prompt, config.max_new_tokens, config.temperature, config.top_k, generator)
        ids = ids[0].tolist()  # waits for the device, so the clock reads finished work
        seconds += time.perf_counter() - started
        samples.append(tokenizer.decode(ids))
        print(samples[-1])
        print("-" * 80)
    new_tokens = config.num_samples * config.max_new_tokens
    step = "compiled" if config.compile else "eager"
    print(
        f"{new_tokens} tokens in {seconds:.2f} s: {new_tokens / seconds:.1f} tokens/s, each sample's prompt prefill "
        f"included ({device}, {dtype}, {step} decode step)",
        file=sys.stderr,
    )
    return samples


if __name__ == "__main__":
    try:
        main(parse_cli(SampleConfig))
    except SampleError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
