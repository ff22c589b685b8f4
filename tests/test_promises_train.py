"""
The README's training and evaluation promises, each checked against a computation made here, not against a second
run of the same code: the learning-rate schedule's values, one optimizer step redone by hand (micro-step loss
scaling, clipping, weight-decay groups, the learning rate applied) and a resumed second step (optimizer state and
data stream carried over), checkpoint counters through resume, atomic checkpoint writes, log trimming on resume,
log_interval and the logged rates, always_save_checkpoint, evaluation on fixed windows with the default lengths and
batch sizes (scored here by transformers' GPT-2), uint32 token files, SIGINT, and the DDP divisibility error.
"""

import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SUBPROCESS_ENV, cli, finish, random_hf_gpt2, read_until, start_train, tiny_settings
from torch.nn import functional as F

import model as model_module
import plot_results
import train
from configurator import parse_config
from model import GPT
from train import (
    TrainConfig,
    TrainError,
    default_eval_block_sizes,
    drop_log_lines_after,
    eval_window_starts,
    evaluate,
    get_lr,
    load_checkpoint,
    main,
    model_from_checkpoint,
    open_tokens,
    save_checkpoint,
    windows_to_tensor,
)

TOKENS_PER_ITER = 2 * 4 * 64  # gradient_accumulation_steps x batch_size x block_size of settings()
BETA1, BETA2, ADAM_EPS = 0.9, 0.95, 1e-8  # TrainConfig's betas; torch's AdamW eps


def settings(data_dir, out_dir, **overrides) -> dict:
    """A tiny model that trains in a fraction of a second per step; a fresh out_dir for every fresh run."""
    return tiny_settings(data_dir, out_dir, **{"max_iters": 4, "eval_interval": 2, **overrides})


def read_log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def logged_iters(out_dir, key: str) -> list[int]:
    return [line["iter"] for line in read_log(out_dir) if key in line]


def tokens(data_dir, split: str) -> np.ndarray:
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.uint16, mode="r")


def windows(token_ids: np.ndarray, starts, length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([token_ids[s : s + length] for s in starts]).astype(np.int64))


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory) -> Path:
    """A random 2-layer GPT-2 over the byte vocabulary, saved as a Hugging Face folder: a known starting model.
    Biases and LayerNorm gains are random too, so that weight decay on them would show."""
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf-gpt2")
    random_hf_gpt2(path, n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=257)
    return path


# ---------------------------------------------------------------------------------------- learning-rate schedule


def test_learning_rate_schedule_values():
    """Linear warmup from lr/(warmup+1), cosine decay from learning_rate to min_lr at lr_decay_iters, then min_lr."""
    config = TrainConfig(learning_rate=1.0, warmup_iters=10, lr_decay_iters=110, min_lr=0.1)
    expected = {
        0: 1 / 11,  # warmup: (it + 1) / (warmup_iters + 1) of the peak
        4: 5 / 11,
        9: 10 / 11,
        10: 1.0,  # the peak, where the cosine starts
        35: 0.1 + 0.9 * (2 + 2**0.5) / 4,  # a quarter of the way: cos(pi / 4)
        60: 0.55,  # half way: the mean of peak and floor
        85: 0.1 + 0.9 * (2 - 2**0.5) / 4,
        110: 0.1,  # min_lr at lr_decay_iters
        111: 0.1,
        10_000: 0.1,
    }
    for it, lr in expected.items():
        assert get_lr(it, config) == pytest.approx(lr, rel=1e-12), f"iter {it}"
    constant = TrainConfig(learning_rate=0.5, warmup_iters=10, lr_decay_iters=110, min_lr=0.1, decay_lr=False)
    assert {get_lr(it, constant) for it in (0, 5, 60, 500)} == {0.5}


CONFIGS = sorted((REPO / "config").glob("train_gpt2_*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_gpu_configs_train_with_nanogpts_schedule_and_the_default_sla(path):
    """The README's training settings: nanoGPT's warmup, cosine, clipping and AdamW; 6e-4 peak for small, 3e-4
    for medium, decaying to a tenth; 3 of 4 heads skip, at the skip distance its size's ablation measured best."""
    config = parse_config(TrainConfig, [str(path), "--sla"])
    assert (config.decay_lr, config.warmup_iters, config.lr_decay_iters) == (True, 2000, 600_000)
    assert (config.grad_clip, config.weight_decay, config.beta1, config.beta2) == (1.0, 0.1, 0.9, 0.95)
    assert config.learning_rate == (3e-4 if "medium" in path.name else 6e-4)
    assert config.min_lr == pytest.approx(config.learning_rate / 10)
    size = "medium" if "medium" in path.name else "small"
    assert (config.sla_head_ratio, config.sla_skip) == (0.75, measured_sla_skip(*SKIP_ABLATIONS[size]))


@functools.cache  # one reading of each ablation folder, not one per config
def measured_sla_skip(folder: str, arms: tuple[str, ...]) -> int:
    """The skip distance of the lowest-mean arm of an ablation, which must be told apart from plain to be a default."""
    ablation = str(REPO / "results" / folder)
    best = plot_results.main(["--ablation", ablation, "--best_sla_arm", "--among", *arms])
    assert plot_results.main(["--ablation", ablation, "--told_apart", best]) == "yes", (folder, best)
    return int(best.removeprefix("sla-skip"))


# The configs' skip distance follows the committed ablations: a seed that reorders the arms fails the test above.
SKIP_ABLATIONS = {  # size: (results folder, the skip-distance arms it compares at sla_head_ratio=0.75)
    "small": ("sla-ablation-16k", ("sla-skip9", "sla-skip3", "sla-skip1")),
    "medium": ("sla-ablation-medium-8k", ("sla-skip9", "sla-skip15")),
}


# ---------------------------------------------------------------------------------- optimizer steps redone by hand


def reference_gradients(model: GPT, train_tokens: np.ndarray, it: int, seed=1337, micro_steps=2, batch_size=4):
    """The gradient of optimizer step `it` as the README defines it: the mean next-token loss (computed here from
    the full logits) averaged over the step's micro-steps, micro-step m drawing its windows from
    np.random.default_rng((seed, it, m))."""
    block_size = model.config.block_size
    model.zero_grad()
    losses = []
    for micro_step in range(micro_steps):
        generator = np.random.default_rng((seed, it, micro_step))
        batch = windows(train_tokens, generator.integers(0, len(train_tokens) - block_size, size=batch_size), 65)
        logits, _ = model(batch[:, :-1], batch[:, 1:])
        losses.append(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
    torch.stack(losses).mean().backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def adam_state(checkpoint: dict) -> dict[str, dict]:
    """The checkpoint's AdamW state (exp_avg, exp_avg_sq, step) by parameter name."""
    model = model_from_checkpoint(checkpoint)
    optimizer = model.configure_optimizers(0.0, 0.0, (BETA1, BETA2), "cpu")
    optimizer.load_state_dict(checkpoint["optimizer"])
    return {name: optimizer.state[param] for name, param in model.named_parameters()}


def decayed(name: str) -> bool:
    """Weight decay on matrices and embeddings only, not on biases or LayerNorm gains."""
    return name.endswith(("wte.weight", "wpe.weight", "c_attn.weight", "c_proj.weight", "c_fc.weight"))


def adamw_update(weights, state, lr: float, weight_decay: float) -> torch.Tensor:
    """Decoupled weight decay, then Adam's bias-corrected step, from the optimizer's own moments."""
    step = int(state["step"])
    m_hat, v_hat = state["exp_avg"] / (1 - BETA1**step), state["exp_avg_sq"] / (1 - BETA2**step)
    return weights * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + ADAM_EPS)


def relative_error(got: dict, expected: dict) -> float:
    names = sorted(expected)
    got_flat, expected_flat = (torch.cat([d[n].flatten() for n in names]) for d in (got, expected))
    return ((got_flat - expected_flat).norm() / expected_flat.norm()).item()


def norm(tensors: dict) -> float:
    return torch.cat([t.flatten() for t in tensors.values()]).norm().item()


def test_first_and_resumed_optimizer_steps_redone_by_hand(byte_data, hf_gpt2, tmp_path):
    """From known weights (a saved GPT-2), train.py's first step must apply exactly the mean gradient over the
    micro-steps with the warmup's learning rate and weight decay on matrices only; a resumed second step must
    continue AdamW's moments and the data stream."""
    run = settings(
        byte_data, tmp_path / "run", init_from=str(hf_gpt2), max_iters=1, eval_interval=1, eval_iters=1,
        grad_clip=0.0, weight_decay=0.5, learning_rate=1e-2, warmup_iters=3, lr_decay_iters=10, min_lr=1e-3,
    )  # fmt: skip
    main(TrainConfig(**run))
    first = load_checkpoint(run["out_dir"])
    assert first["iter_num"] == 1 and first["tokens_seen"] == TOKENS_PER_ITER

    start = GPT.from_pretrained(str(hf_gpt2))
    weights = {name: param.detach().clone() for name, param in start.named_parameters()}
    gradients = reference_gradients(start, tokens(byte_data, "train"), it=0)
    state = adam_state(first)
    assert {int(s["step"]) for s in state.values()} == {1}
    # after one step AdamW's first moment is (1 - beta1) x the gradient it was given
    applied = {name: s["exp_avg"] / (1 - BETA1) for name, s in state.items()}
    assert relative_error(applied, gradients) < 1e-5  # not 2x: the loss is divided by the micro-steps
    squares = {name: s["exp_avg_sq"] / (1 - BETA2) for name, s in state.items()}
    assert relative_error(squares, {name: g.square() for name, g in gradients.items()}) < 1e-4
    lr = 1e-2 * 1 / 4  # warmup: step 0 of 3 runs at (0 + 1) / (3 + 1) of the peak
    for name, before in weights.items():
        expected = adamw_update(before, state[name], lr, 0.5 if decayed(name) else 0.0)
        assert (first["model"][name] - expected).abs().max() < 2e-6, name

    main(TrainConfig(**{**run, "init_from": "resume", "max_iters": 2}))
    second = load_checkpoint(run["out_dir"])
    assert second["iter_num"] == 2 and second["tokens_seen"] == 2 * TOKENS_PER_ITER
    assert second["model_args"] == first["model_args"] and second["meta"] == first["meta"]
    assert len(second["rng"]["ranks"]) == 1
    gradients = reference_gradients(model_from_checkpoint(first), tokens(byte_data, "train"), it=1)
    state, previous = adam_state(second), state
    assert {int(s["step"]) for s in state.values()} == {2}
    # exp_avg = beta1 * the saved exp_avg + (1 - beta1) * gradient: the moments came back from the checkpoint
    applied = {name: (s["exp_avg"] - BETA1 * previous[name]["exp_avg"]) / (1 - BETA1) for name, s in state.items()}
    assert relative_error(applied, gradients) < 1e-4  # and the windows of step 1, not step 0's again
    lr = 1e-2 * 2 / 4
    for name in weights:
        expected = adamw_update(first["model"][name], state[name], lr, 0.5 if decayed(name) else 0.0)
        assert (second["model"][name] - expected).abs().max() < 2e-6, name


def test_gradient_clipping_scales_the_applied_gradient_to_grad_clip(byte_data, hf_gpt2, tmp_path):
    gradients = reference_gradients(GPT.from_pretrained(str(hf_gpt2)), tokens(byte_data, "train"), it=0)
    grad_clip = norm(gradients) / 4  # well below the gradient's norm, so clipping must act
    run = settings(
        byte_data, tmp_path / "run", init_from=str(hf_gpt2), max_iters=1, eval_interval=1, eval_iters=1,
        grad_clip=grad_clip,
    )  # fmt: skip
    main(TrainConfig(**run))
    applied = {name: s["exp_avg"] / (1 - BETA1) for name, s in adam_state(load_checkpoint(run["out_dir"])).items()}
    assert norm(applied) == pytest.approx(grad_clip, rel=1e-4)
    clipped = {name: g * grad_clip / norm(gradients) for name, g in gradients.items()}
    assert relative_error(applied, clipped) < 1e-4


# ------------------------------------------------------------------------------------------------- evaluation


def hf_mean_loss(hf_dir: Path, val_tokens: np.ndarray, T: int, n_windows: int) -> float:
    """transformers' GPT-2 scores the first n_windows fixed validation windows of length T."""
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    batch = windows(val_tokens, eval_window_starts(len(val_tokens), T, n_windows), T + 1)
    with torch.no_grad():
        logits = hf_model(batch[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).double(), batch[:, 1:].flatten()).item()


def loss_keys(line: dict, tag="val") -> dict[str, float]:
    """The whole-window loss keys of a log line (not the position buckets)."""
    return {key: value for key, value in line.items() if re.fullmatch(rf"{tag}/loss@\d+", key)}


def test_evaluation_windows_lengths_and_batch_sizes(byte_data, hf_gpt2, tmp_path):
    """The first evaluation of a run from known weights equals transformers' loss on the fixed windows: as many
    as eval_iters x (batch_size x block_size / T) at each length, the same for any training seed."""
    val_tokens = tokens(byte_data, "val")
    first_evaluation = {}
    for seed in (1, 2):
        run = settings(
            byte_data, tmp_path / f"seed{seed}", init_from=str(hf_gpt2), seed=seed, max_iters=1, eval_interval=1,
            eval_block_sizes=(16, 32, 64),
        )  # fmt: skip
        main(TrainConfig(**run))
        first_evaluation[seed] = loss_keys(read_log(run["out_dir"])[1])
    assert first_evaluation[1] == first_evaluation[2]  # windows never depend on the run
    assert first_evaluation[1].keys() == {"val/loss@16", "val/loss@32", "val/loss@64"}
    for T, n_windows in ((16, 2 * 16), (32, 2 * 8), (64, 2 * 4)):  # eval_iters x (4 x 64 / T)
        expected = hf_mean_loss(hf_gpt2, val_tokens, T, n_windows)
        assert first_evaluation[1][f"val/loss@{T}"] == pytest.approx(expected, rel=1e-5), T
    # the check can tell window counts apart: 4 fewer windows give another mean
    assert abs(hf_mean_loss(hf_gpt2, val_tokens, 16, 28) - hf_mean_loss(hf_gpt2, val_tokens, 16, 32)) > 1e-4

    # no eval_block_sizes: block_size (64) alone; eval_batch_size overrides the windows per batch
    run = settings(byte_data, tmp_path / "default", init_from=str(hf_gpt2), max_iters=1, eval_batch_size=3)
    main(TrainConfig(**run))
    evaluation = loss_keys(read_log(run["out_dir"])[1])
    assert evaluation.keys() == {"val/loss@64"}
    assert evaluation["val/loss@64"] == pytest.approx(hf_mean_loss(hf_gpt2, val_tokens, 64, 2 * 3), rel=1e-5)


def test_default_eval_block_sizes():
    assert default_eval_block_sizes(16384) == (4096, 8192, 16384)
    assert default_eval_block_sizes(12288) == (4096, 8192)
    assert default_eval_block_sizes(4096) == (4096,)
    assert default_eval_block_sizes(1024) == (1024,)
    assert default_eval_block_sizes(64) == (64,)


def test_evaluate_does_not_depend_on_global_random_state(byte_data, hf_gpt2):
    model = GPT.from_pretrained(str(hf_gpt2)).train()
    val_tokens = tokens(byte_data, "val")
    results = []
    for seed in (0, 1):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        results.append(evaluate(model, val_tokens, (32,), 2, {32: 3}))
    assert results[0] == results[1]
    assert results[0][32] == pytest.approx(hf_mean_loss(hf_gpt2, val_tokens, 32, 6), rel=1e-5)
    assert model.training  # evaluation puts the model back into training mode
    starts = eval_window_starts(len(val_tokens), 32, 10)
    assert np.array_equal(eval_window_starts(len(val_tokens), 32, 4), starts[:4])  # more windows extend the list


# -------------------------------------------------------------------------------- logging and checkpoint writes


def test_log_interval_and_the_logged_rates(byte_data, tmp_path, monkeypatch):
    """Train lines every log_interval steps; lr is the schedule's; ms_per_step is per step (each step here sleeps
    0.2 s); tokens_per_s and mfu follow from it; evaluations at 0, every eval_interval, and at the end."""
    real_get_lr = train.get_lr

    def slow_get_lr(it, config):  # once per optimizer step
        time.sleep(0.2)
        return real_get_lr(it, config)

    monkeypatch.setattr(train, "get_lr", slow_get_lr)
    monkeypatch.setattr(model_module, "gpu_peak_bf16_flops", lambda: 1e9)  # a pretend GPU, so MFU is a number
    run = settings(byte_data, tmp_path / "run", max_iters=7, eval_interval=3, log_interval=3)
    main(TrainConfig(**run))
    log = read_log(run["out_dir"])
    train_lines = [line for line in log if "train/loss" in line]
    assert [line["iter"] for line in train_lines] == [3, 6]
    assert logged_iters(run["out_dir"], "val/loss@64") == [0, 3, 6, 7]
    # 6 * 35,712 parameters (wte 320 x 32 + 2 layers x 12,704 + ln_f 64) + 12 x 2 layers x 32 x 64: FLOPs per token
    flops_per_token = 6 * 35_712 + 12 * 2 * 32 * 64
    for line in train_lines:
        assert line["lr"] == real_get_lr(line["iter"] - 1, TrainConfig(**run))  # the step that ended there
        assert line["tokens"] == line["iter"] * TOKENS_PER_ITER
        assert 200 <= line["ms_per_step"] < 540, line  # 3 steps of >= 200 ms each between the lines
        assert line["tokens_per_s"] * line["ms_per_step"] / 1000 == pytest.approx(TOKENS_PER_ITER)
        assert line["mfu"] == pytest.approx(flops_per_token * line["tokens_per_s"] / 1e9, rel=1e-9)
    assert all(line["tokens"] == line["iter"] * TOKENS_PER_ITER for line in log)


def torn_save(obj, f, *args, **kwargs):
    """torch.save crashing (disk full, preemption) half-way through writing."""
    if hasattr(f, "write"):
        f.write(b"half a checkpoint")
    else:
        Path(f).write_bytes(b"half a checkpoint")
    raise OSError("No space left on device")


def test_checkpoint_write_is_atomic(byte_data, tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"iter_num": 1, "weights": torch.arange(4.0)}, path)
    real_save = torch.save
    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(TrainError, match=r"cannot save ckpt.pt in .*: No space left on device; .* left as it was"):
        save_checkpoint({"iter_num": 2, "weights": torch.zeros(4)}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the torn temporary file is removed
    monkeypatch.setattr(torch, "save", real_save)
    previous = torch.load(path, weights_only=True)  # a bare dict: load_checkpoint wants train.py's keys
    assert previous["iter_num"] == 1 and torch.equal(previous["weights"], torch.arange(4.0))

    # and in a run: the save at iter 4 crashes; the one of iter 2 is still there, whole
    saves = []

    def second_save_crashes(obj, f, *args, **kwargs):
        saves.append(obj["iter_num"])
        return (torn_save if len(saves) == 2 else real_save)(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", second_save_crashes)
    run = settings(byte_data, tmp_path / "run", max_iters=4, eval_interval=2)
    with pytest.raises(TrainError, match="No space left"):
        main(TrainConfig(**run))
    monkeypatch.setattr(torch, "save", real_save)
    assert saves == [2, 4] and load_checkpoint(run["out_dir"])["iter_num"] == 2


def test_resume_drops_log_lines_after_the_checkpoint(byte_data, tmp_path):
    """A run that crashed after logging past its last checkpoint: the resumed log has every step exactly once."""
    run = settings(byte_data, tmp_path / "run", max_iters=4, eval_interval=2)
    main(TrainConfig(**run))
    shutil.copy(tmp_path / "run" / "ckpt.pt", tmp_path / "ckpt-iter4.pt")
    main(TrainConfig(**{**run, "init_from": "resume", "max_iters": 8}))
    shutil.copy(tmp_path / "ckpt-iter4.pt", tmp_path / "run" / "ckpt.pt")  # steps 5-8 logged, never saved
    main(TrainConfig(**{**run, "init_from": "resume", "max_iters": 8}))
    assert logged_iters(run["out_dir"], "train/loss") == list(range(1, 9))
    assert logged_iters(run["out_dir"], "val/loss@64") == [0, 2, 4, 6, 8]
    assert logged_iters(run["out_dir"], "config") == [0, 4, 4]  # one line per invocation that is kept

    log_path = tmp_path / "log.jsonl"
    log_path.write_text("".join(json.dumps({"iter": it}) + "\n" for it in (0, 1, 2, 3, 2, 3)))
    drop_log_lines_after(str(log_path), 2)
    assert [json.loads(line)["iter"] for line in log_path.read_text().splitlines()] == [0, 1, 2, 2]


def test_always_save_checkpoint_and_counters_carried_through_resume(byte_data, tmp_path, monkeypatch):
    """best_val_loss, iter_num and tokens_seen come back from the checkpoint. With a best_val_loss no evaluation
    can beat, always_save_checkpoint=True saves at every evaluation; False only at the end."""
    saved_at = []
    real_save_checkpoint = train.save_checkpoint

    def recording_save_checkpoint(checkpoint, path):
        saved_at.append(checkpoint["iter_num"])
        real_save_checkpoint(checkpoint, path)

    monkeypatch.setattr(train, "save_checkpoint", recording_save_checkpoint)
    run = settings(byte_data, tmp_path / "run", max_iters=2, eval_interval=2)
    main(TrainConfig(**run))
    assert saved_at == [2]
    path = tmp_path / "run" / "ckpt.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["best_val_loss"] = -1.0
    torch.save(checkpoint, path)

    saved_at.clear()
    main(TrainConfig(**{**run, "init_from": "resume", "max_iters": 6, "always_save_checkpoint": True}))
    assert saved_at == [4, 6]  # at every evaluation, improved or not
    checkpoint = load_checkpoint(str(path))
    assert checkpoint["best_val_loss"] == -1.0
    assert checkpoint["iter_num"] == 6 and checkpoint["tokens_seen"] == 6 * TOKENS_PER_ITER

    saved_at.clear()
    main(TrainConfig(**{**run, "init_from": "resume", "max_iters": 10, "always_save_checkpoint": False}))
    assert saved_at == [10]  # iter 8 did not improve on -1: no save; the end of training always saves
    checkpoint = load_checkpoint(str(path))
    assert checkpoint["best_val_loss"] == -1.0 and checkpoint["tokens_seen"] == 10 * TOKENS_PER_ITER


# --------------------------------------------------------------------------------------------------- data and CLI


def test_uint32_token_files_are_read_as_uint32(tmp_path):
    """Vocabularies above 65,536 tokens are stored as uint32 (meta.json's dtype); windows keep the large ids."""
    ids = (np.arange(1000, dtype=np.uint32) * 97) % 100_000 + 1
    assert ids.max() > 65_536
    ids.tofile(tmp_path / "train.bin")
    meta = {"tokenizer": "wide", "vocab_size": 100_001, "eot_token": 0, "dtype": "uint32"}
    token_ids = open_tokens(str(tmp_path), "train", meta, min_tokens=11)
    assert len(token_ids) == 1000
    batch = windows_to_tensor(token_ids, [0, 700], 11, "cpu")
    assert torch.equal(batch, torch.from_numpy(np.stack([ids[:11], ids[700:711]]).astype(np.int64)))


def test_sigint_saves_and_exits_zero(byte_data, tmp_path):
    run = settings(byte_data, tmp_path / "run", max_iters=100_000, eval_interval=100_000)
    process = start_train(run)
    read_until(process, "iter 1:")
    process.send_signal(signal.SIGINT)
    output, errors = finish(process, timeout=60)
    assert process.returncode == 0, errors[-3000:]
    checkpoint = load_checkpoint(run["out_dir"])
    stopped_at = checkpoint["iter_num"]
    assert 1 <= stopped_at < 100 and f"stopped at iter {stopped_at}" in output
    assert checkpoint["tokens_seen"] == stopped_at * TOKENS_PER_ITER
    assert logged_iters(run["out_dir"], "train/loss") == list(range(1, stopped_at + 1))


def test_ddp_gradient_accumulation_must_divide_among_processes(byte_data, tmp_path):
    run = settings(byte_data, tmp_path / "run", gradient_accumulation_steps=3, max_iters=1)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*torchrun, "train.py", *cli(run)],
        cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "gradient_accumulation_steps=3 is the global number of micro-steps" in result.stderr
    assert "divisible by the 2 processes" in result.stderr
    assert not (tmp_path / "run" / "ckpt.pt").exists()
