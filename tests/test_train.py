"""train.py on CPU with tiny models on byte-level OpenWebText-sample data: learning, DDP equivalence, exact
resume (also from DDP to DDP and to one process), SIGTERM, divergence, data errors, eval-only runs and wandb."""

import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    SUBPROCESS_ENV,
    cli,
    finish,
    random_hf_gpt2,
    read_until,
    run_or_fail_if_hung,
    start,
    write_byte_data,
)
from conftest import tiny_settings as tiny
from torch.nn import functional as F

from configurator import ConfigError, parse_config
from model import GPT, GPTConfig
from train import (
    NonFiniteLoss,
    TrainConfig,
    TrainError,
    eval_window_starts,
    get_lr,
    load_checkpoint,
    main,
    make_train_step,
    model_from_checkpoint,
    open_tokens,
    position_buckets,
    save_checkpoint,
    windows_to_tensor,
)


def read_log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def train_losses(out_dir) -> dict[int, float]:
    return {line["iter"]: line["train/loss"] for line in read_log(out_dir) if "train/loss" in line}


def val_losses(out_dir, key="val/loss@64") -> dict[int, float]:
    return {line["iter"]: line[key] for line in read_log(out_dir) if key in line}


def assert_losses_match(got: dict, expected: dict, tol: float):
    assert got.keys() == expected.keys()
    for it in expected:
        assert got[it] == pytest.approx(expected[it], abs=tol), f"iter {it}"


def assert_run_is_right_on_its_own(out_dir, data_dir, max_iters: int, tokens_per_iter=2 * 4 * 64):
    """For tests that compare a run with another run of the same code, where a bug both share would pass: every
    step logged exactly once (only rank 0 writes; resume trims), the token counters, and the final validation
    loss equal to the saved model's mean loss on the fixed windows, recomputed here."""
    log = read_log(out_dir)
    assert [line["iter"] for line in log if "train/loss" in line] == list(range(1, max_iters + 1))
    val_iters = [line["iter"] for line in log if "val/loss@64" in line]
    assert val_iters == sorted(set(val_iters)) and val_iters[-1] == max_iters  # each evaluation logged once
    assert all(line["tokens"] == line["iter"] * tokens_per_iter for line in log)
    checkpoint = load_checkpoint(str(out_dir))
    assert checkpoint["iter_num"] == max_iters and checkpoint["tokens_seen"] == max_iters * tokens_per_iter
    config = checkpoint["config"]
    n_windows = (config["final_eval_iters"] or config["eval_iters"]) * config["batch_size"]  # at T = block_size
    val = np.memmap(Path(data_dir) / "val.bin", dtype=np.uint16, mode="r")
    starts = eval_window_starts(len(val), 64, n_windows)
    windows = torch.from_numpy(np.stack([val[s : s + 65] for s in starts]).astype(np.int64))
    with torch.no_grad():
        logits, _ = model_from_checkpoint(checkpoint).eval()(windows[:, :-1], windows[:, 1:])
    final = [line for line in log if "val/loss@64" in line][-1]
    assert final["val/loss@64"] == pytest.approx(
        F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item(), rel=1e-5
    )


def test_tiny_model_learns(byte_data, tmp_path):
    settings = tiny(byte_data, tmp_path, n_embd=64, max_iters=60, eval_interval=30, eval_iters=8, learning_rate=1e-2)
    summary = main(TrainConfig(**settings))
    val = val_losses(tmp_path)
    assert sorted(val) == [0, 30, 60]
    assert val[0] > 5.0  # about ln(257) = 5.55 at initialisation
    assert val[60] < val[0] - 1.0
    assert summary["val_losses"] == {64: val[60]}
    assert summary["iter_num"] == 60 and summary["tokens_seen"] == 60 * 2 * 4 * 64

    log = read_log(tmp_path)
    assert all("iter" in line for line in log)
    assert all(log[0]["config"][key] == value for key, value in settings.items())
    assert log[0]["model_args"]["n_embd"] == 64 and log[0]["world_size"] == 1
    train_lines = [line for line in log if "train/loss" in line]
    assert [line["iter"] for line in train_lines] == list(range(1, 61))
    assert train_lines[0]["lr"] == pytest.approx(1e-2 / 3)  # warmup: (0 + 1) / (2 + 1) of the peak
    for line in train_lines:
        assert line["lr"] == get_lr(line["iter"] - 1, TrainConfig(**settings))  # the step that ended at iter
        assert line["ms_per_step"] > 0 and line["tokens"] == line["iter"] * 2 * 4 * 64
        assert line["tokens_per_s"] * line["ms_per_step"] / 1000 == pytest.approx(2 * 4 * 64)
        assert line["mfu"] is None  # no GPU, no peak to measure against

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    contract_keys = {"model", "optimizer", "model_args", "config", "iter_num", "tokens_seen", "best_val_loss", "meta"}
    assert contract_keys | {"rng"} <= checkpoint.keys()
    assert not any(key.startswith("_orig_mod.") for key in checkpoint["model"])
    assert checkpoint["iter_num"] == 60 and checkpoint["meta"]["tokenizer"] == "byte"
    assert checkpoint["model_args"]["vocab_size"] == 320  # 257 rounded up to a multiple of 64


def torchrun_train(settings: dict, script: str = "train.py") -> str:
    """train.py (or a script that runs train.main) under a 2-process torchrun (gloo on CPU); its stdout."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = run_or_fail_if_hung([*torchrun, script, *cli(settings)], f"torchrun {script}", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_ddp_two_processes_match_one_with_same_global_batch(byte_data, tmp_path):
    settings = tiny(byte_data, tmp_path / "one", max_iters=6, eval_interval=3)
    main(TrainConfig(**settings))
    assert "1 on each of 2 processes" in torchrun_train({**settings, "out_dir": str(tmp_path / "two")})
    assert_losses_match(train_losses(tmp_path / "two"), train_losses(tmp_path / "one"), tol=1e-5)
    assert_losses_match(val_losses(tmp_path / "two"), val_losses(tmp_path / "one"), tol=1e-5)
    assert_run_is_right_on_its_own(tmp_path / "two", byte_data, max_iters=6)


def test_ddp_teardown_joins_gloo_threads_in_destroy_process_group(byte_data, tmp_path):
    """train.py's DDP teardown frees the process group inside destroy_process_group, its worker threads joined
    there: a gloo thread that lives on past it can abort the finished run at interpreter shutdown (1 CI run in
    ~30) or deadlock against the thread that frees it (a hung test). Seen in the thread list, not left to luck."""
    script = tmp_path / "list_threads_at_teardown.py"
    script.write_text(
        "import glob, os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import torch.distributed as dist\n"
        "import train\n"
        "from configurator import parse_cli_explicit\n"
        "destroy_process_group = dist.destroy_process_group\n"
        "def destroy_and_list_threads(*args):\n"
        "    destroy_process_group(*args)\n"
        "    names = [open(path).read().strip() for path in glob.glob('/proc/self/task/*/comm')]\n"
        f"    open(os.path.join({str(tmp_path)!r}, 'threads-' + os.environ['RANK']), 'w').write('\\n'.join(names))\n"
        "dist.destroy_process_group = destroy_and_list_threads\n"
        "train.main(*parse_cli_explicit(train.TrainConfig))\n"
    )
    torchrun_train(tiny(byte_data, tmp_path / "run", max_iters=2, eval_interval=2), script=str(script))
    for rank in (0, 1):
        names = (tmp_path / f"threads-{rank}").read_text().split("\n")
        assert names and not any("gloo" in name for name in names), (rank, names)


def test_sigterm_to_torchruns_workers_saves_and_exits_0(byte_data, tmp_path):
    """As the README says: SIGTERM to the workers stops the run gracefully (all save once, torchrun exits 0);
    SIGTERM to torchrun itself also saves (torchrun passes it on), but torchrun exits 1 with a traceback."""
    # between log lines a stop request is read one step late (the step's outcome is waited for during the next)
    settings = tiny(byte_data, tmp_path, max_iters=100_000, eval_interval=100_000, log_interval=7)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for target, expected_returncode in (("workers", 0), ("torchrun", 1)):
        out_dir = tmp_path / target
        command = [*torchrun, "train.py", *cli({**settings, "out_dir": str(out_dir)})]
        process = subprocess.Popen(
            command, cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for line in process.stdout:
            if line.startswith("iter 7:"):
                break
        workers = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(workers) == 2
        for pid in workers if target == "workers" else [process.pid]:
            os.kill(int(pid), signal.SIGTERM)
        output, errors = process.communicate(timeout=60)
        assert process.returncode == expected_returncode, errors[-3000:]
        stopped_at = load_checkpoint(str(out_dir))["iter_num"]
        assert f"stopped at iter {stopped_at}; continue with: torchrun <its options> train.py" in output
        assert ("SignalException" in errors) == (target == "torchrun")


def test_ddp_checkpoint_resumes_under_ddp_and_in_one_process(byte_data, tmp_path):
    reference = tiny(byte_data, tmp_path / "reference", max_iters=6, eval_interval=3)
    main(TrainConfig(**reference))
    interrupted = {**reference, "out_dir": str(tmp_path / "ddp"), "max_iters": 3}
    torchrun_train(interrupted)
    shutil.copytree(tmp_path / "ddp", tmp_path / "one")
    resume = {**interrupted, "max_iters": 6, "init_from": "resume"}
    torchrun_train(resume)
    main(TrainConfig(**{**resume, "out_dir": str(tmp_path / "one")}))
    for out_dir in ("ddp", "one"):
        assert_losses_match(train_losses(tmp_path / out_dir), train_losses(tmp_path / "reference"), tol=1e-5)
        assert_losses_match(val_losses(tmp_path / out_dir), val_losses(tmp_path / "reference"), tol=1e-5)
        assert_run_is_right_on_its_own(tmp_path / out_dir, byte_data, max_iters=6)


def test_resume_continues_exactly(byte_data, tmp_path):
    # dropout makes the torch RNG state matter; lr_decay_iters, not max_iters, sets the schedule
    reference = tiny(byte_data, tmp_path / "reference", dropout=0.1, max_iters=8)
    main(TrainConfig(**reference))
    interrupted = {**reference, "out_dir": str(tmp_path / "resumed"), "max_iters": 4}
    main(TrainConfig(**interrupted))
    main(TrainConfig(**{**interrupted, "max_iters": 8, "init_from": "resume"}))
    assert_losses_match(train_losses(tmp_path / "resumed"), train_losses(tmp_path / "reference"), tol=1e-6)
    assert_losses_match(val_losses(tmp_path / "resumed"), val_losses(tmp_path / "reference"), tol=1e-6)
    assert_run_is_right_on_its_own(tmp_path / "resumed", byte_data, max_iters=8)


def train_until_sigterm(command: list[str], after_line: str) -> str:
    """Run train.py's command, send SIGTERM once it prints a line starting with after_line; its stdout."""
    process = start(command)
    output = read_until(process, after_line)
    process.send_signal(signal.SIGTERM)
    rest, errors = finish(process, timeout=60)
    assert process.returncode == 0, errors[-3000:]
    return output + rest


def test_sigterm_saves_and_resumes_to_the_same_losses(byte_data, tmp_path):
    settings = tiny(byte_data, tmp_path / "stopped", dropout=0.1, max_iters=100_000, eval_interval=100_000)
    output = train_until_sigterm([sys.executable, "train.py", *cli(settings)], "iter 1:")
    stopped_at = load_checkpoint(str(tmp_path / "stopped"))["iter_num"]
    assert 1 <= stopped_at < 100 and f"stopped at iter {stopped_at}" in output

    # the hint, run as printed (without the config: the checkpoint holds it), continues the same run
    (hint,) = re.findall(r"continue with: (python train.py .*) \(the checkpoint", output)
    command = [sys.executable, *hint.split()[1:]]
    assert command[1:] == ["train.py", f"--out_dir={tmp_path / 'stopped'}", "--init_from=resume"]
    train_until_sigterm(command, f"iter {stopped_at + 2}:")
    resumed_to = load_checkpoint(str(tmp_path / "stopped"))["iter_num"]
    assert resumed_to >= stopped_at + 2
    # one more step to max_iters, so the run ends with its final evaluation
    main(TrainConfig(**{**settings, "init_from": "resume", "max_iters": resumed_to + 1}))
    main(TrainConfig(**{**settings, "out_dir": str(tmp_path / "reference"), "max_iters": resumed_to + 1}))
    assert_losses_match(train_losses(tmp_path / "stopped"), train_losses(tmp_path / "reference"), tol=1e-6)
    assert_run_is_right_on_its_own(tmp_path / "stopped", byte_data, max_iters=resumed_to + 1)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(byte_data, tmp_path):
    settings = tiny(byte_data, tmp_path, max_iters=4, eval_interval=2)
    main(TrainConfig(**settings))
    checkpoint_bytes = hashlib.sha256((tmp_path / "ckpt.pt").read_bytes()).hexdigest()
    # a huge constant learning rate blows the weights up after one step: the next loss is nan
    diverging = {**settings, "init_from": "resume", "max_iters": 8, "learning_rate": 1e30, "decay_lr": False}
    with pytest.raises(TrainError, match=r"loss is nan at iter 6.*left as it was"):
        main(TrainConfig(**diverging))
    assert hashlib.sha256((tmp_path / "ckpt.pt").read_bytes()).hexdigest() == checkpoint_bytes
    assert not (tmp_path / "ckpt.pt.tmp").exists()


def test_a_step_returns_before_its_loss_is_read_and_the_next_step_checks_it():
    """make_train_step's step queues its work and returns without waiting for its own loss: the next call waits for
    it, and raises NonFiniteLoss for it, as does waiting for it directly."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    batches = iter(lambda: (torch.randint(0, 32, (2, 16)), torch.randint(0, 32, (2, 16))), None)
    poisoned_calls = {2}  # the second step's loss is nan
    calls = []

    def forward(inputs, targets):
        calls.append(None)
        loss = model(inputs, targets)[1]
        return loss * float("nan") if len(calls) in poisoned_calls else loss

    step = make_train_step(model, forward, optimizer, batches)
    first = step()
    assert first.loss is None  # not read yet
    second = step(stop_requested=True)
    assert math.isfinite(first.loss) and first.stop is False and second.loss is None
    with pytest.raises(NonFiniteLoss, match="loss is nan"):
        step()  # the third step's call checks the second
    with pytest.raises(NonFiniteLoss, match="loss is nan"):
        second.wait()
    assert second.stop is True


def test_a_non_finite_loss_between_log_lines_names_its_iter(byte_data, tmp_path):
    """Between log lines and evaluations a step's loss is read during the next step: the error still names the
    step whose loss was not finite, and nothing is saved."""
    settings = tiny(byte_data, tmp_path, max_iters=50, eval_interval=50, log_interval=25)
    # a huge constant learning rate blows the weights up in the first step: the second step's loss is nan
    diverging = {**settings, "learning_rate": 1e30, "decay_lr": False}
    with pytest.raises(TrainError, match=r"loss is nan at iter 2: training stopped, no checkpoint was saved"):
        main(TrainConfig(**diverging))
    assert not (tmp_path / "ckpt.pt").exists()


def test_eval_only_on_another_data_dir(byte_data, tmp_path, owt_jsonl):
    settings = tiny(byte_data, tmp_path / "run", max_iters=2, eval_interval=2)
    main(TrainConfig(**settings))
    documents = [json.loads(line)["text"] for line in owt_jsonl.read_text().splitlines()[:50]]
    other_data = write_byte_data(tmp_path / "other", documents)
    eval_only = {**settings, "init_from": "resume", "eval_only": True, "eval_data_dir": str(other_data)}
    first = main(TrainConfig(**eval_only, eval_tag="other", eval_block_sizes=(32, 64)))
    second = main(TrainConfig(**eval_only, eval_tag="other", eval_block_sizes=(32, 64)))
    assert first["val_losses"] == second["val_losses"]  # the same fixed windows every time
    assert first["val_losses"].keys() == {32, 64}
    last = read_log(tmp_path / "run")[-1]
    assert last["iter"] == 2 and {"other/loss@32", "other/loss@64"} <= last.keys()
    assert sorted(val_losses(tmp_path / "run")) == [0, 2]  # the training log is kept


def test_evaluation_by_position(byte_data, tmp_path):
    """Loss by position bucket: the right buckets, each the mean of an independent per-token computation over
    the fixed windows; the final evaluation uses final_eval_iters batches."""
    settings = tiny(byte_data, tmp_path, max_iters=2, eval_interval=2, eval_block_sizes=(16, 64), final_eval_iters=5)
    main(TrainConfig(**settings))
    assert position_buckets(16384, (4096, 8192, 16384)) == [(0, 1024), (1024, 4096), (4096, 8192), (8192, 16384)]
    assert position_buckets(4096, (4096, 8192, 16384)) == [(0, 1024), (1024, 4096)]
    assert position_buckets(64, (16, 64)) == [(0, 16), (16, 64)]

    final = read_log(tmp_path)[-1]
    assert final["iter"] == 2
    bucket_keys = {key for key in final if "/pos" in key}
    assert bucket_keys == {"val/loss@64/pos0-16", "val/loss@64/pos16-64"}  # one bucket at 16: not repeated
    model = model_from_checkpoint(load_checkpoint(str(tmp_path)))
    meta = json.loads((byte_data / "meta.json").read_text())
    tokens = open_tokens(str(byte_data), "val", meta, min_tokens=65)
    batch_size = 4  # the training micro-batch's 4 x 64 tokens per evaluation batch at length 64
    starts = eval_window_starts(len(tokens), 64, 5 * batch_size)
    windows = torch.from_numpy(np.stack([tokens[s : s + 65] for s in starts]).astype(np.int64))
    with torch.no_grad():
        logits, _ = model(windows[:, :-1], windows[:, 1:])
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
    assert final["val/loss@64"] == pytest.approx(per_token.mean().item(), rel=1e-5)
    assert final["val/loss@64/pos0-16"] == pytest.approx(per_token[:, :16].mean().item(), rel=1e-5)
    assert final["val/loss@64/pos16-64"] == pytest.approx(per_token[:, 16:].mean().item(), rel=1e-5)
    # the mid-run evaluation at iter 0 used eval_iters=2 batches: other windows, another loss
    first_eval = next(line for line in read_log(tmp_path) if "val/loss@64" in line)
    assert first_eval["iter"] == 0 and "val/loss@64/pos16-64" in first_eval


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"data_dir": "/nonexistent/data"}, TrainError, r"meta.json not found.*prepare_openwebtext.py"),
        ({"vocab_size": 128}, TrainError, r"vocab_size 257, more than the model's 128"),
        ({"block_size": 4_000_000}, TrainError, r"train.bin holds \d+ tokens.*smaller --block_size"),
        ({"sla": True, "sla_skip": 2}, ConfigError, r"no head would skip.*sla_skip = 2 must be < n_layer = 2"),
        ({"sla": True, "sla_head_ratio": 0.2}, ConfigError, r"no head would skip: .* = 0 skip heads"),
        ({"eval_block_sizes": (32, 128)}, ConfigError, r"beyond the model's block_size 64.*--eval_block_sizes"),
        ({"init_from": "resume"}, TrainError, r"no checkpoint at"),
        ({"init_from": "/nonexistent/gpt2-folder"}, TrainError, r"cannot load GPT-2 weights '/nonexistent/gpt2-fold"),
    ],
)
def test_errors_say_what_to_do(byte_data, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        main(TrainConfig(**{**tiny(byte_data, tmp_path), **overrides}))


def test_resume_with_other_architecture_is_an_error(byte_data, tmp_path):
    main(TrainConfig(**tiny(byte_data, tmp_path, max_iters=1)))
    with pytest.raises(TrainError, match=r"--n_layer=3 differs from the checkpoint's n_layer=2"):
        main(TrainConfig(**tiny(byte_data, tmp_path, init_from="resume", n_layer=3)))


def test_init_from_a_hugging_face_gpt2_folder_with_sla(byte_data, tmp_path):
    pytest.importorskip("transformers")
    hf_model = random_hf_gpt2(tmp_path / "hf", n_layer=2, n_head=4, n_embd=32, n_positions=128, vocab_size=257)
    # learning_rate 0: AdamW (weight decay included) leaves the weights as loaded, so the checkpoint holds them
    settings = tiny(
        byte_data, tmp_path / "out", init_from=str(tmp_path / "hf"), sla=True, sla_skip=1, max_iters=2,
        learning_rate=0.0, min_lr=0.0,
    )  # fmt: skip
    summary = main(TrainConfig(**settings))
    checkpoint = load_checkpoint(str(tmp_path / "out"))
    model_args = checkpoint["model_args"]
    assert model_args["block_size"] == 64 and model_args["n_head"] == 4 and model_args["sla"]  # cropped to 64
    assert summary["iter_num"] == 2 and math.isfinite(summary["val_losses"][64])
    idx = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(idx).logits
        as_plain, _ = model_from_checkpoint(checkpoint, sla=False).eval()(idx, idx)
        with_sla, _ = model_from_checkpoint(checkpoint).eval()(idx, idx)
    assert (as_plain - expected).abs().max() < 1e-5  # the Hugging Face weights, every one in its place
    assert (with_sla - expected).abs().max() > 1e-3  # and the run used them with SLA
    with pytest.raises(TrainError, match=r"has 128 positions; set --block_size to at most that"):
        main(TrainConfig(**{**settings, "out_dir": str(tmp_path / "other"), "block_size": 256}))


def test_val_shorter_than_eval_window_is_an_error(byte_data, tmp_path):
    data = write_byte_data(tmp_path / "short", ["a" * 1000] * 24 + ["b" * 10])  # val: 11 tokens
    with pytest.raises(TrainError, match=r"val.bin holds 11 tokens"):
        main(TrainConfig(**tiny(data, tmp_path / "out")))


def test_wandb_missing_is_a_clear_error(byte_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(TrainError, match="wandb_log=True needs wandb"):
        main(TrainConfig(**tiny(byte_data, tmp_path, wandb_log=True)))


def wandb_offline_records(run_file: Path):
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log: a 7-byte header, then records
    of a 4-byte checksum, 2-byte length, 1-byte type, in 32 KiB blocks), as wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = run_file.read_bytes(), 7, b""
    assert data[:4] == b":W&B", "not a wandb run file"
    while position + 7 <= len(data):
        if (left_in_block := 32768 - position % 32768) < 7:  # a block's tail too short for a header is padding
            position += left_in_block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def test_wandb_offline_run_logs_the_same_metrics(byte_data, tmp_path):
    pytest.importorskip("wandb")
    settings = tiny(byte_data, tmp_path / "out", max_iters=2, eval_interval=2, wandb_log=True)
    env = {**SUBPROCESS_ENV, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    result = subprocess.run(
        [sys.executable, "train.py", *cli(settings)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    logged, config = {}, {}  # (step, key) -> value; config key -> value
    for record in wandb_offline_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            logged.update({(items["_step"], key): value for key, value in items.items() if not key.startswith("_")})
        elif record.WhichOneof("record_type") in ("run", "config"):  # wandb.init's config, then any updates
            updates = record.run.config.update if record.HasField("run") else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    assert config["learning_rate"] == 3e-3 and config["max_iters"] == 2
    expected = {
        (line["iter"], key): value
        for line in read_log(tmp_path / "out")
        for key, value in line.items()
        if key not in ("iter", "config", "model_args", "provenance") and value is not None
    }
    assert {key for _, key in expected} >= {"train/loss", "lr", "ms_per_step", "tokens_per_s", "val/loss@64"}
    assert {key: logged.get(key) for key in expected} == pytest.approx(expected)  # every number, as log.jsonl has it
    assert logged[(1, "lr")] == pytest.approx(3e-3 / 3)  # warmup's first step


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def base_run(byte_data, out_dir, **overrides) -> dict:
    """A finished 4-step run with a checkpoint at iter 4; its settings."""
    settings = tiny(byte_data, out_dir, max_iters=4, eval_interval=2, **overrides)
    main(TrainConfig(**settings))
    return settings


def test_a_non_finite_validation_loss_never_reaches_the_checkpoint(byte_data, tmp_path):
    settings = base_run(byte_data, tmp_path)
    diverging = {**settings, "init_from": "resume", "learning_rate": 1e6, "max_iters": 60, "eval_interval": 1}
    with pytest.raises(TrainError, match=r"is nan at iter (\d+): training stopped, .*ckpt.pt \(iter (\d+)\) left") as e:
        main(TrainConfig(**diverging))
    saved_iter = int(re.search(r"\(iter (\d+)\) left as it was", str(e.value)).group(1))
    checkpoint = load_checkpoint(str(tmp_path))
    assert checkpoint["iter_num"] == saved_iter  # the message says what the checkpoint holds
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["model"].values())
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_takes_the_checkpoint_config_and_the_given_keys(byte_data, tmp_path, owt_jsonl, capsys):
    """As `python train.py --out_dir=X --init_from=resume` does: every key not given comes from the checkpoint."""
    base_run(byte_data, tmp_path / "run", dropout=0.1)
    reference = tiny(byte_data, tmp_path / "reference", dropout=0.1, max_iters=6, eval_interval=2)
    main(TrainConfig(**reference))
    resume = TrainConfig(out_dir=str(tmp_path / "run"), init_from="resume", max_iters=6)
    summary = main(resume, explicit_keys={"out_dir", "init_from", "max_iters"})
    assert summary["iter_num"] == 6 and "no longer an exact continuation" not in capsys.readouterr().out
    assert_losses_match(train_losses(tmp_path / "run"), train_losses(tmp_path / "reference"), tol=1e-6)

    other_data = write_byte_data(tmp_path / "other", [json.loads(line)["text"] for line in owt_jsonl.open()][:50])
    eval_only = TrainConfig(
        out_dir=str(tmp_path / "run"), init_from="resume", eval_only=True, eval_data_dir=str(other_data)
    )
    summary = main(eval_only, explicit_keys={"out_dir", "init_from", "eval_only", "eval_data_dir"})
    assert summary["val_losses"].keys() == {64}

    # a key that changes the training is a note, one that changes the architecture an error
    changed = {"out_dir": str(tmp_path / "run"), "init_from": "resume", "max_iters": 7, "learning_rate": 1e-4}
    main(TrainConfig(**changed), explicit_keys=set(changed))
    assert "learning_rate=0.0001 (was 0.003): the run is no longer an exact continuation" in capsys.readouterr().out
    with pytest.raises(TrainError, match=r"--block_size=1024 differs from the checkpoint's block_size=64"):
        main(TrainConfig(out_dir=str(tmp_path / "run"), init_from="resume"), explicit_keys={"block_size"})


def test_a_damaged_log_line_does_not_block_resume(byte_data, tmp_path, capsys):
    settings = base_run(byte_data, tmp_path)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"iter": 5, "tokens": 2560, "train/lo')  # cut off by a kill or a full disk
    main(TrainConfig(**{**settings, "init_from": "resume", "max_iters": 6}))
    assert "dropped 1 damaged line(s)" in capsys.readouterr().out
    assert sorted(train_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]  # every line is JSON again


def write_damaged_checkpoints(good: Path, folder: Path) -> dict[str, Path]:
    """Damaged copies of the checkpoint good, one folder per kind of damage."""
    data = good.read_bytes()

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    contents = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "zeros": bytes(len(data)),
        "random": np.random.default_rng(0).bytes(4096),
    }
    paths = {}
    for kind in (*contents, "bare_state_dict", "pickle_with_code"):
        paths[kind] = folder / kind
        paths[kind].mkdir()
        if kind in contents:
            (paths[kind] / "ckpt.pt").write_bytes(contents[kind])
        elif kind == "bare_state_dict":
            torch.save(torch.load(good, weights_only=True)["model"], paths[kind] / "ckpt.pt")
        else:
            torch.save({"model": Exploit()}, paths[kind] / "ckpt.pt")
    return paths


def test_a_damaged_checkpoint_is_one_clear_error(byte_data, tmp_path):
    settings = base_run(byte_data, tmp_path / "run")
    damaged = write_damaged_checkpoints(tmp_path / "run" / "ckpt.pt", tmp_path)
    messages = {
        "truncated": r"is damaged or cut off .*not a complete torch.save archive",
        "empty": r"is damaged or cut off",
        "zeros": r"is damaged or cut off",
        "random": r"is damaged or cut off",
        "bare_state_dict": r"is not a checkpoint that train.py wrote: it has no model, model_args, meta",
        "pickle_with_code": r"holds Python objects other than tensors .* not a checkpoint that train.py wrote",
    }
    for kind, out_dir in damaged.items():
        for eval_only in (False, True):
            with pytest.raises(TrainError, match=messages[kind]) as error:
                main(
                    TrainConfig(**{**settings, "out_dir": str(out_dir), "init_from": "resume", "eval_only": eval_only})
                )
            assert str(out_dir / "ckpt.pt") in str(error.value) and "weights_only=False" not in str(error.value)
    # on the command line: one line, exit 1
    result = subprocess.run(
        [sys.executable, "train.py", f"--out_dir={damaged['zeros']}", "--init_from=resume", "--eval_only"],
        cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.startswith(f"error: {damaged['zeros'] / 'ckpt.pt'} is damaged")
    assert result.stderr.count("\n") == 1


def test_a_full_disk_names_the_folder_and_keeps_the_last_checkpoint(byte_data, tmp_path):
    settings = base_run(byte_data, tmp_path)
    before = sha256(tmp_path / "ckpt.pt")
    # this process's temporary checkpoint goes to /dev/full, where every write fails with ENOSPC
    temp_path = tmp_path / f"ckpt.pt.{os.getpid()}.tmp"
    temp_path.symlink_to("/dev/full")
    with pytest.raises(TrainError, match=rf"cannot save ckpt.pt in {tmp_path}: No space left on device; .*left as"):
        main(TrainConfig(**{**settings, "init_from": "resume", "max_iters": 6}))
    assert not temp_path.exists() and not temp_path.is_symlink()  # the temporary file is removed
    assert sha256(tmp_path / "ckpt.pt") == before


def test_a_write_that_fails_mid_file_names_its_cause(tmp_path):
    """A disk that fills up part-way through the file: here the file-size limit stops the write at 100 kB."""
    save_checkpoint({"weights": torch.zeros(10)}, str(tmp_path / "ckpt.pt"))
    before = sha256(tmp_path / "ckpt.pt")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG), no signal kills us
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
    try:
        with pytest.raises(TrainError, match=rf"cannot save ckpt.pt in {tmp_path}: File too large; .* left as it was"):
            save_checkpoint({"weights": torch.zeros(1_000_000)}, str(tmp_path / "ckpt.pt"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert [path.name for path in tmp_path.iterdir()] == ["ckpt.pt"] and sha256(tmp_path / "ckpt.pt") == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_dir_is_named(byte_data, tmp_path):
    settings = base_run(byte_data, tmp_path / "run")
    os.chmod(tmp_path / "run", 0o555)
    try:
        with pytest.raises(TrainError, match=r"cannot write to out_dir .*run: Permission denied"):
            main(TrainConfig(**{**settings, "init_from": "resume", "max_iters": 6}))
    finally:
        os.chmod(tmp_path / "run", 0o755)


def test_an_out_dir_that_cannot_be_made_is_named(byte_data, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(TrainError, match=r"cannot write to out_dir .*a_file/run: Not a directory"):
        main(TrainConfig(**tiny(byte_data, tmp_path / "a_file" / "run")))


def save_many(path: str) -> int:
    checkpoint = {"weights": torch.randn(200_000)}
    for _ in range(30):
        save_checkpoint(checkpoint, path)
    return os.getpid()


def test_two_processes_saving_one_checkpoint_both_succeed(tmp_path):
    """Two runs on one out_dir write their own temporary files: neither renames the other's away."""
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        pids = list(pool.map(save_many, [str(tmp_path / "ckpt.pt")] * 2))
    assert len(set(pids)) == 2
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["weights"].shape == (200_000,)
    assert [path.name for path in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_fresh_run_into_an_existing_run_is_refused_unless_overwrite(byte_data, tmp_path):
    settings = base_run(byte_data, tmp_path)
    before = sha256(tmp_path / "ckpt.pt"), (tmp_path / "log.jsonl").read_text()
    with pytest.raises(
        TrainError, match=r"already holds a run \(ckpt.pt, log.jsonl\): .*--init_from=resume.*--overwrite"
    ):
        main(TrainConfig(**settings))
    assert (sha256(tmp_path / "ckpt.pt"), (tmp_path / "log.jsonl").read_text()) == before
    main(TrainConfig(**{**settings, "max_iters": 2, "overwrite": True}))
    assert load_checkpoint(str(tmp_path))["iter_num"] == 2 and sorted(train_losses(tmp_path)) == [1, 2]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("id_beyond_vocab", r"train.bin holds token id 300, but .*meta.json declares vocab_size 257"),
        ("empty_val", r"val.bin is empty"),
        ("odd_bytes", r"train.bin is \d+ bytes, not a whole number of uint16 tokens"),
        ("cut_meta", r"meta.json is not valid JSON"),
        ("short_train", r"train.bin holds \d+ tokens, but .*meta.json records \d+"),
    ],
)
def test_data_that_contradicts_its_meta_is_caught_before_training(byte_data, tmp_path, damage, message):
    data = tmp_path / "data"
    shutil.copytree(byte_data, data)
    if damage == "id_beyond_vocab":
        tokens = np.fromfile(data / "train.bin", dtype=np.uint16)
        tokens[len(tokens) // 2] = 300
        tokens.tofile(data / "train.bin")
    elif damage == "empty_val":
        (data / "val.bin").write_bytes(b"")
    elif damage == "odd_bytes":
        (data / "train.bin").write_bytes((data / "train.bin").read_bytes() + b"\0")
    elif damage == "cut_meta":
        (data / "meta.json").write_text((data / "meta.json").read_text()[:40])
    else:
        (data / "train.bin").write_bytes((data / "train.bin").read_bytes()[:-2])
    with pytest.raises(TrainError, match=message):
        main(TrainConfig(**tiny(data, tmp_path / "out")))
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_batches_check_token_ids_that_the_spot_check_did_not_read(tmp_path):
    tokens = np.zeros(1000, dtype=np.uint16)
    tokens[500] = 999
    tokens.tofile(tmp_path / "train.bin")
    memmap = np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="r")
    assert windows_to_tensor(memmap, [0, 600], 100, "cpu", vocab_size=257).shape == (2, 100)
    with pytest.raises(TrainError, match=r"train.bin holds token id 999, beyond the vocabulary of 257"):
        windows_to_tensor(memmap, [450], 100, "cpu", vocab_size=257)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--eval_block_sizes=0"], "eval_block_sizes must be context lengths >= 1, got (0,)"),
        (["--eval_block_sizes=-5"], "eval_block_sizes must be context lengths >= 1, got (-5,)"),
        (["--eval_batch_size=-1"], "eval_batch_size must be >= 0, got -1"),
        (["--learning_rate=nan"], "learning_rate must be >= 0, got nan"),
        (["--dropout=1"], "dropout must be in [0, 1), got 1.0"),
        (["--sla_skip=0"], "sla_skip must be >= 1"),
        (["--seed=-1"], "seed must be in [0, 2**31 - 1], got -1"),
        (["--seed=99999999999"], "seed must be in [0, 2**31 - 1], got 99999999999"),
        (["--n_embd=32", "--n_head=3"], "n_embd (32) must be divisible by n_head (3)"),
        (["--sla_head_ratio=2"], "sla_head_ratio must be in [0, 1], got 2.0"),
        (["--learning_rate=inf"], "learning_rate must be a finite number, got inf"),
        (["--grad_clip=inf"], "grad_clip must be a finite number, got inf"),
        (["--min_lr=-inf"], "min_lr must be >= 0, got -inf"),
        (["--device=gpu"], "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ],
)
def test_bad_values_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(TrainConfig, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_config_error_on_the_command_line():
    result = subprocess.run([sys.executable, "train.py", "--device=cuda"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == "error: device 'cuda', but torch sees no CUDA GPU: use --device=cpu (or auto)\n"
