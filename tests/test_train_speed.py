"""
train.py's speed settings and the step that bench.py times: one training step function for both, compile_mode and
compile_optimizer (their checks, a compiled optimizer step that trains and resumes as the eager one, without being
compiled again as the learning rate changes), kernel choices as the model's configuration (not in checkpoints), the
provenance of every log and bench row, and experiments/train_speed.sh on the CPU.
"""

import importlib.util
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from conftest import REPO, SUBPROCESS_ENV, cli, tiny_settings

import bench
import train
from checkpoint import load_checkpoint, model_from_checkpoint
from configurator import ConfigError, parse_config, provenance
from model import KERNEL_KEYS, GPTConfig
from train import TrainConfig, check_run, main

PEER = REPO.parent / "shared" / "peers" / "nanogpt"


def read_log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def losses(out_dir) -> dict[tuple[int, str], float]:
    return {
        (line["iter"], key): value
        for line in read_log(out_dir)
        for key, value in line.items()
        if key == "train/loss" or key.startswith("val/loss")
    }


# ------------------------------------------------------------------------------------------ one step function


def counting(make_train_step, made: list, calls: list):
    """make_train_step, each step it makes recorded in made and each call of one in calls."""

    def recording_make_train_step(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def counted_step(*step_args):
            calls.append(counted_step)
            return step(*step_args)

        made.append((counted_step, kwargs))
        return counted_step

    return recording_make_train_step


def test_bench_times_train_py_step_function(monkeypatch):
    """bench.py has no step of its own: every model it times (ours, SLA, nanoGPT's) runs a step that train.py's
    make_train_step made, and every timed or warm-up step is a call of one."""
    assert bench.make_train_step is train.make_train_step
    made, calls = [], []
    monkeypatch.setattr(bench, "make_train_step", counting(train.make_train_step, made, calls))
    config = bench.BenchConfig(
        shapes=("tiny:16:1",), sla_skips=(1,), peer=str(PEER), device="cpu", warmup_steps=2, rounds=2, block_steps=3,
        vocab_size=256, decode_tokens=0,
    )  # fmt: skip
    rows = bench.main(config)
    assert [row["model"] for row in rows] == ["plain", "nanogpt", "sla"] and len(made) == 3
    for step, _ in made:
        assert calls.count(step) == 2 + 2 * 3
    assert all(row["timed_steps"] == 2 * 3 and row["error"] is None for row in rows)


def test_train_py_trains_with_its_step_function(byte_data, tmp_path, monkeypatch):
    """fit() takes every optimizer step through one step that make_train_step made, with the run's micro-steps and
    clipping."""
    made, calls = [], []
    monkeypatch.setattr(train, "make_train_step", counting(train.make_train_step, made, calls))
    main(TrainConfig(**tiny_settings(byte_data, tmp_path, max_iters=3, eval_interval=3, grad_clip=0.5)))
    ((step, kwargs),) = made
    assert calls == [step] * 3
    assert kwargs["micro_steps"] == 2 and kwargs["grad_clip"] == 0.5 and kwargs["ddp_model"] is None


# ------------------------------------------------------------------------------- compile_mode, compile_optimizer


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compile", "--compile_mode=fastest"], "compile_mode must be one of default, max-autotune-no-cudagraphs"),
        (
            ["--compile_mode=reduce-overhead"],
            "compile_mode: 'reduce-overhead' applies to compiled models: add --compile",
        ),
        (["--compile_mode=max-autotune-no-cudagraphs"], "compile_mode: 'max-autotune-no-cudagraphs' applies to"),
    ],
)
def test_compile_mode_errors_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainConfig, argv)


def test_keys_are_listed_by_help():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0
    for key in ("--compile_mode='default'", "--compile_optimizer=False", "--attention='auto'"):
        assert key in result.stdout


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_refuse_accumulation_and_ddp(byte_data, tmp_path, mode):
    """CUDA graphs train one micro-step per optimizer step in one process: with accumulation a replay overwrites the
    gradients of the micro-step before it, and DDP is not verified with them. Errors that say so, before anything
    is built or written; one process with one micro-step per step passes."""
    settings = tiny_settings(byte_data, tmp_path / "run", compile=True, compile_mode=mode)
    message = (
        rf"compile_mode='{mode}' runs the training step as CUDA graphs.*gradient_accumulation_steps=2 they would come "
        r"out wrong.*--gradient_accumulation_steps=1"
    )
    with pytest.raises(ConfigError, match=message):
        main(TrainConfig(**settings))
    assert not (tmp_path / "run").exists()
    one_micro_step = TrainConfig(**{**settings, "gradient_accumulation_steps": 2})
    with pytest.raises(ConfigError, match=r"which train.py does not run under DDP \(2 processes\).*one process"):
        check_run(one_micro_step, world_size=2)  # 1 micro-step on each of 2 processes
    check_run(TrainConfig(**{**settings, "gradient_accumulation_steps": 1}), world_size=1)


def test_compile_optimizer_refuses_float16(byte_data, tmp_path):
    settings = tiny_settings(byte_data, tmp_path / "run", dtype="float16", compile_optimizer=True)
    with pytest.raises(ConfigError, match=r"compile_optimizer: .* float16's loss scaling .* --dtype=bfloat16"):
        main(TrainConfig(**settings))


def test_compiled_optimizer_trains_as_eager_and_a_run_may_switch_to_it(byte_data, tmp_path, capsys):
    """A run resumed with compile_optimizer (the clipping and AdamW's step compiled by inductor, here on the CPU)
    continues the eager run exactly, as an exact continuation; the learning rate, a tensor, changes at every step
    without the step being compiled again."""
    reference = tiny_settings(byte_data, tmp_path / "reference", max_iters=5, eval_interval=2)
    main(TrainConfig(**reference))
    interrupted = {**reference, "out_dir": str(tmp_path / "switched"), "max_iters": 2}
    main(TrainConfig(**interrupted))
    capsys.readouterr()
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    resume = TrainConfig(**{**interrupted, "init_from": "resume", "max_iters": 5, "compile_optimizer": True})
    main(resume, explicit_keys={"out_dir", "init_from", "max_iters", "compile_optimizer"})
    assert "no longer an exact continuation" not in capsys.readouterr().out
    # clipping and the step: two graphs (the optimizer breaks the graph before its step), made once for 3 steps
    assert graphs["unique_graphs"] - before == 2
    got, expected = losses(tmp_path / "switched"), losses(tmp_path / "reference")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key
    configs = [line["config"] for line in read_log(tmp_path / "switched") if "config" in line]
    assert [config["compile_optimizer"] for config in configs] == [False, True]
    optimizer = load_checkpoint(str(tmp_path / "switched"))["optimizer"]
    assert all(torch.is_tensor(group["lr"]) and not group["fused"] for group in optimizer["param_groups"])
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------ kernels in the model config


def test_kernel_choices_are_the_models_configuration_not_the_checkpoints(byte_data, tmp_path):
    """A checkpoint's model_args say what the model computes, not how: a reader picks the kernels (GPTConfig's
    defaults unless given), also from a checkpoint whose model_args name some."""
    main(TrainConfig(**tiny_settings(byte_data, tmp_path, max_iters=1, eval_interval=1, attention="sdpa")))
    checkpoint = load_checkpoint(str(tmp_path))
    assert not set(KERNEL_KEYS) & checkpoint["model_args"].keys()
    logged = read_log(tmp_path)[0]["model_args"]
    assert {key: logged[key] for key in KERNEL_KEYS} == {"attention": "sdpa", "recompute_mixed_kv": True,
                                                         "skip_unread_kv": True}  # fmt: skip
    naming_kernels = {**checkpoint, "model_args": {**checkpoint["model_args"], "attention": "fa4",
                                                   "skip_unread_kv": False}}  # fmt: skip
    model = model_from_checkpoint(naming_kernels)
    assert (model.config.attention, model.config.skip_unread_kv) == ("sdpa", True)
    assert all(block.attn.causal_attention is None and block.attn.skip_unread_kv for block in model.transformer.h)
    chosen = model_from_checkpoint(checkpoint, recompute_mixed_kv=False)
    assert all(not block.attn.recompute_mixed_kv for block in chosen.transformer.h)
    with pytest.raises(ValueError, match=r"attention must be one of sdpa, fa4, got 'auto'"):
        GPTConfig(attention="auto")  # auto is a script's setting, chosen before the model is built


# ----------------------------------------------------------------------------------------------------- provenance


def provenance_of(code_dir: Path) -> dict:
    """provenance('cpu') as a copy of configurator.py in code_dir computes it: loaded from there, under a name of its
    own, so that its code folder is code_dir."""
    spec = importlib.util.spec_from_file_location("configurator_copy", code_dir / "configurator.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    return copy.provenance("cpu")


def git(folder: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True).stdout.strip()


def test_provenance_names_the_commit_and_uncommitted_changes(tmp_path):
    """The commit of the code's checkout and whether tracked files differ from it (untracked ones do not count);
    outside a checkout, or inside another repository's, no commit and the reason."""
    code = tmp_path / "checkout"
    code.mkdir()
    shutil.copy(REPO / "configurator.py", code)
    git(code, "init", "-q")
    git(code, "add", "configurator.py")
    git(code, "commit", "-q", "-m", "code")
    record = provenance_of(code)
    assert record["commit"] == git(code, "rev-parse", "HEAD") and record["dirty"] is False
    assert record["commit_error"] is None
    assert (record["torch"], record["cuda"], record["device"]) == (torch.__version__, torch.version.cuda, "cpu")
    assert record.keys() >= {"flash-attn-4", "nvidia-cutlass-dsl"}
    (code / "out.log").write_text("an output")
    assert provenance_of(code)["dirty"] is False
    with open(code / "configurator.py", "a") as f:
        f.write("# changed\n")
    assert provenance_of(code)["dirty"] is True

    copied = tmp_path / "copy"
    copied.mkdir()
    shutil.copy(REPO / "configurator.py", copied)
    record = provenance_of(copied)
    assert record["commit"] is None and record["dirty"] is None
    assert "not a git repository" in record["commit_error"]
    nested = code / "vendored"
    nested.mkdir()
    shutil.copy(REPO / "configurator.py", nested)
    record = provenance_of(nested)
    assert record["commit"] is None and "is not a git checkout (inside" in record["commit_error"]


def test_train_and_bench_record_their_provenance(byte_data, tmp_path, capsys):
    main(TrainConfig(**tiny_settings(byte_data, tmp_path / "run", max_iters=1, eval_interval=1)))
    first = read_log(tmp_path / "run")[0]
    assert first["provenance"] == provenance("cpu") and "config" in first
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("code: ") and "torch " + torch.__version__ in printed[0]
    config = bench.BenchConfig(
        shapes=("tiny:16:1",), sla_skips=(), device="cpu", warmup_steps=1, rounds=1, block_steps=1, vocab_size=256,
        decode_tokens=0,
    )  # fmt: skip
    (row,) = bench.main(config)
    assert row["provenance"] == provenance("cpu")


def test_a_run_outside_a_git_checkout_says_so(byte_data, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    for path in REPO.glob("*.py"):
        shutil.copy(path, code)
    settings = tiny_settings(byte_data, tmp_path / "run", max_iters=1, eval_interval=1)
    result = subprocess.run([sys.executable, "train.py", *cli(settings)],
                            cwd=code, env=SUBPROCESS_ENV, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("code: no git commit (")
    record = read_log(tmp_path / "run")[0]["provenance"]
    assert record["commit"] is None and "not a git repository" in record["commit_error"]
    assert math.isfinite(read_log(tmp_path / "run")[-1]["val/loss@64"])


# ------------------------------------------------------------------------------------------ the GPU measurement


def test_train_speed_script_writes_a_row_per_shape_model_and_settings(tmp_path):
    """experiments/train_speed.sh on the CPU with a tiny shape, nothing compiled: for each settings one bench.py run
    and one train.py run per model, then rows that put train.py's steady tokens/s beside bench.py's and nanoGPT's.
    Each shape's rows are appended when its runs are done: a shape that fails leaves those of the shapes before."""
    env = {
        **SUBPROCESS_ENV, "PYTHON": sys.executable, "WORK": str(tmp_path / "work"), "DEST": str(tmp_path / "results"),
        "PEER": str(PEER), "DEVICE": "cpu", "STEPS": "6", "SKIP": "2", "LOG_INTERVAL": "2", "VOCAB_SIZE": "256",
        "FASTEST": "--attention=sdpa", "DEFAULTS": "--compile_optimizer=False", "EXTRA_ARGS": "--vocab_size=256",
        "BENCH_ARGS": "--warmup_steps=1 --rounds=2 --block_steps=1",
    }  # fmt: skip
    result = subprocess.run(["bash", "experiments/train_speed.sh", "tiny:32:2"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results" / "train-speed-cpu.jsonl").read_text().splitlines()]
    assert [(row["settings"], row["sla"]) for row in rows] == [
        ("fastest", False), ("fastest", True), ("defaults", False), ("defaults", True),
    ]  # fmt: skip
    fields = ("shape", "sla", "attention", "compile_mode", "compile_optimizer", "train_tokens_per_s",
              "bench_tokens_per_s", "nanogpt_tokens_per_s", "gpu", "torch")  # fmt: skip
    for row in rows:
        assert list(row)[: len(fields)] == list(fields)
        assert row["shape"] == "tiny:32:2" and row["gpu"] == "cpu" and row["torch"] == torch.__version__
        assert row["attention"] == row["bench_attention"] == "sdpa" and row["compile_mode"] is None
        assert min(row["train_tokens_per_s"], row["bench_tokens_per_s"], row["nanogpt_tokens_per_s"]) > 0
        assert row["train_vs_nanogpt"] == pytest.approx(row["train_tokens_per_s"] / row["nanogpt_tokens_per_s"])
        assert row["train_steps_timed"] == 4  # steps 3-6: the log's lines after step 2, every 2 steps
        assert row["provenance"]["device"] == "cpu"
    logs = tmp_path / "work" / "logs" / "tiny-32-2"  # per shape: bench's rows and output, each run's log and output
    assert {path.name for path in logs.iterdir()} == {
        f"{name}{suffix}" for settings in ("fastest", "defaults") for suffix in (".jsonl", ".txt")
        for name in (f"bench-{settings}", f"{settings}-tiny-32-2-plain", f"{settings}-tiny-32-2-sla")
    }  # fmt: skip
    log = [json.loads(line) for line in (logs / "fastest-tiny-32-2-sla.jsonl").open()]
    steady = [line["ms_per_step"] for line in log if "train/loss" in line and line["iter"] > 2]
    assert rows[1]["train_tokens_per_s"] == pytest.approx(32 * 2 / (statistics.median(steady) / 1000))
    assert log[0]["config"]["block_size"] == 32 and log[0]["config"]["gradient_accumulation_steps"] == 1
    plain, sla = rows[0]["train_tokens_per_s"], rows[1]["train_tokens_per_s"]
    assert rows[1]["sla_vs_plain_step_time"] == pytest.approx(plain / sla)
    assert not (tmp_path / "work" / "runs" / "fastest-tiny-32-2-sla" / "ckpt.pt").exists()
    # SETTINGS picks which settings to measure and a wrong name, like a wrong shape (a batch of 0), stops before
    # anything runs; rows are appended settings by settings, so settings whose bench.py run fails (an unknown compile
    # mode) leave the rows of those before
    wrong = subprocess.run(["bash", "experiments/train_speed.sh", "tiny:32:2"], cwd=REPO,
                           env={**env, "SETTINGS": "fast"}, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert wrong.returncode == 1 and 'SETTINGS="fast"' in wrong.stderr and "fastest or defaults" in wrong.stderr
    wrong = subprocess.run(["bash", "experiments/train_speed.sh", "tiny:32:2,tiny:32:0"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert wrong.returncode == 1 and "==" not in wrong.stdout
    assert "error: shapes: 'tiny:32:0' is not model:block_size:batch_size" in wrong.stderr
    again = subprocess.run(["bash", "experiments/train_speed.sh", "tiny:32:2"], cwd=REPO,
                           env={**env, "SETTINGS": "defaults fastest", "FASTEST": "--compile_mode=fastest"},
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 1, again.stdout[-3000:] + again.stderr[-3000:]
    assert "compile_mode must be one of" in again.stdout
    assert "appended 2 rows" in again.stdout.split("== fastest tiny:32:2")[0]
    rows = [json.loads(line) for line in (tmp_path / "results" / "train-speed-cpu.jsonl").read_text().splitlines()]
    assert [(row["settings"], row["sla"]) for row in rows[4:]] == [("defaults", False), ("defaults", True)]
