"""
train.py and prepare_openwebtext.py run as users and schedulers run them, with real signals: a stop signal that comes
twice (`timeout`, a scheduler signalling a process group, Ctrl-C pressed twice), a second run started on a busy
out_dir, a run that ends before its first checkpoint, and failures that must be one line (bad settings, wandb without
a login, GPT-2 weights offline, a full disk). Where timing decides, each case runs several times.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SUBPROCESS_ENV, cli, finish, read_until, run_or_fail_if_hung, start, start_train
from conftest import tiny_settings as tiny

from train import TrainConfig, load_checkpoint, main

UNTIL_STOPPED = {"max_iters": 100_000, "eval_interval": 100_000}  # a run that trains until a signal stops it
HAS_TIMEOUT = shutil.which("timeout") is not None


def run_to_end(command: list[str], env: dict | None = None) -> tuple[int, str, str]:
    return run_all([command], [env])[0]


def run_all(commands: list[list[str]], envs: list[dict] | None = None) -> list[tuple[int, str, str]]:
    """Commands run side by side (the 2 cores mostly wait for Python's imports); their statuses and output."""
    processes = [start(command, env) for command, env in zip(commands, envs or [None] * len(commands), strict=True)]
    results = []
    for process in processes:
        stdout, stderr = finish(process)
        results.append((process.returncode, stdout, stderr))
    return results


def logged(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def assert_stopped_and_saved(out_dir: Path, process: subprocess.Popen) -> tuple[str, str]:
    """A run stopped by a signal as the README promises: exit 0, one save of the step it stopped at, the resume hint,
    every step logged once, no temporary file, no traceback. Its stdout and stderr."""
    stdout, stderr = finish(process)
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    stopped_at = int(re.search(r"stopped at iter (\d+); continue with", stdout).group(1))
    assert load_checkpoint(str(out_dir))["iter_num"] == stopped_at
    assert re.findall(r"^saved .*ckpt.pt at iter (\d+)", stdout, re.MULTILINE) == [str(stopped_at)]
    assert [line["iter"] for line in logged(out_dir) if "train/loss" in line] == list(range(1, stopped_at + 1))
    assert not list(out_dir.glob("*.tmp"))
    return stdout, stderr


# ----------------------------------------------------------------------------- train.py: stop signals


@pytest.mark.skipif(not HAS_TIMEOUT, reason="needs coreutils' timeout")
def test_sigterm_to_the_process_group_of_timeout_saves_and_exits_0(byte_data, tmp_path):
    """`setsid timeout 300 python train.py`, the group signalled as a scheduler does: timeout passes the signal on,
    so train.py gets it two or three times within milliseconds. Three runs side by side."""
    runs = {out_dir: start_train(tiny(byte_data, out_dir, **UNTIL_STOPPED), prefix=("timeout", "300"))
            for out_dir in (tmp_path / f"run{number}" for number in range(3))}  # fmt: skip
    for process in runs.values():
        read_until(process, "iter 3:")
        os.killpg(process.pid, signal.SIGTERM)
    for out_dir, process in runs.items():
        assert_stopped_and_saved(out_dir, process)


@pytest.mark.parametrize(
    ("signals", "gap", "repeats"),
    [
        ((signal.SIGTERM, signal.SIGTERM), 0.02, 3),
        ((signal.SIGINT, signal.SIGINT), 0.2, 3),  # Ctrl-C pressed twice
        ((signal.SIGINT, signal.SIGINT), 0.005, 1),  # Ctrl-C on `timeout ...`, which passes it on
    ],
    ids=["two-sigterms-20ms", "two-sigints-200ms", "two-sigints-5ms"],
)
def test_a_second_stop_signal_changes_nothing(byte_data, tmp_path, signals, gap, repeats):
    """A second signal, during the step, the save or after it, neither kills the run nor loses its steps: it saves
    once and exits 0. Runs side by side."""
    runs = {out_dir: start_train(tiny(byte_data, out_dir, **UNTIL_STOPPED))
            for out_dir in (tmp_path / f"run{number}" for number in range(repeats))}  # fmt: skip
    for process in runs.values():
        read_until(process, "iter 3:")
        process.send_signal(signals[0])
        time.sleep(gap)
        process.send_signal(signals[1])
    for out_dir, process in runs.items():
        _, stderr = assert_stopped_and_saved(out_dir, process)
        assert f"got {signals[0].name}; saving after this step" in stderr


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_stop_signal_during_the_save_lets_it_finish(byte_data, tmp_path, second):
    """The second signal lands while ckpt.pt's temporary file is being written (a model big enough for the save to
    take a while): the save completes, nothing is left behind, the run exits 0."""
    settings = tiny(byte_data, tmp_path, n_layer=4, n_head=4, n_embd=384, **UNTIL_STOPPED)
    process = start_train(settings)
    read_until(process, "iter 1:")
    process.send_signal(signal.SIGINT)
    while not list(tmp_path.glob("ckpt.pt.*.tmp")):
        assert process.poll() is None, "the run ended before its save could be seen"
        time.sleep(0.001)
    process.send_signal(second)
    _, stderr = assert_stopped_and_saved(tmp_path, process)
    assert f"got {second.name} again; already stopping: the run saves, then exits" in stderr


# Runs train.py's stop handler for a first signal, and delivers the second signal of the pair at its first line, then
# (afresh) at its second, and so on through every line that the handler and what it calls run: wherever the second
# lands, the handler must return. Prints how many placements it tried.
SECOND_SIGNAL_AT_EVERY_LINE = """
import signal, sys
from train import StopRequest, stop_requests

def first_signal_with_the_second_at(line_number):
    lines = 0
    def trace(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
            if lines == line_number:
                signal.raise_signal(signal.SIGTERM)
        return trace
    def trace_the_handler(frame, event, arg):  # its lines and those of every function it calls
        caller = frame
        while caller is not None and caller.f_code is not StopRequest.__call__.__code__:
            caller = caller.f_back
        return trace if caller is not None else None
    with stop_requests(rank=0) as stop_request:
        sys.settrace(trace_the_handler)
        signal.raise_signal(signal.SIGTERM)
        sys.settrace(None)
        assert stop_request.is_set()
    return lines

line_number = 1
while first_signal_with_the_second_at(line_number) >= line_number:
    line_number += 1
print("placements", line_number)
"""


def test_a_second_signal_inside_the_stop_handler_does_not_hang_it():
    """A handler runs between any two bytecodes, so the second signal of a pair (timeout's, a scheduler's) can run
    train.py's handler again inside the first one's run. It must not wait there for anything the interrupted run holds
    (threading.Event.set() took a lock: the run hung, unsaved, about once in a few hundred pairs)."""
    result = run_or_fail_if_hung([sys.executable, "-c", SECOND_SIGNAL_AT_EVERY_LINE], "the stop handler", timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) > 1, result.stdout  # the handler's lines were traced, each a placement
    assert "got SIGTERM again; already stopping" in result.stderr


def test_a_worker_waiting_for_its_peers_stops_at_once(byte_data, tmp_path):
    """Before training is set up there is nothing to save, and a stop signal ends train.py at once, also while it
    waits for its peers in init_process_group, where no Python handler would run: torchrun stops the other workers so
    when one has failed. Here rank 1 of 2 waits for a rank 0 that never comes (the test only listens on its port)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(listener.getsockname()[1])}
        env = {**SUBPROCESS_ENV, **rendezvous, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
        process = start_train(tiny(byte_data, tmp_path), env=env)
        listener.settimeout(60)
        connection, _ = listener.accept()  # rank 1's store client: train.py is in init_process_group
        with connection:
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            finish(process, timeout=15)
    assert process.returncode == -signal.SIGTERM


def test_a_stop_during_an_evaluation_saves_once(byte_data, tmp_path):
    """SIGTERM while the model is evaluated at iter 10 (slow here: thousands of one-window batches; resumed from iter
    9, so that it is the only slow evaluation): that evaluation's save is the run's last, at iter 10, not followed by
    another save a step later. Three runs side by side."""
    out_dirs = [tmp_path / f"run{number}" for number in range(3)]
    for out_dir in out_dirs:
        main(TrainConfig(**tiny(byte_data, out_dir, max_iters=9, eval_interval=10)))
    slow_evaluation = {"init_from": "resume", "max_iters": 100_000, "eval_iters": 2000, "eval_batch_size": 1}
    runs = {out_dir: start_train({"out_dir": out_dir, **slow_evaluation}) for out_dir in out_dirs}
    for process in runs.values():
        read_until(process, "iter 10: loss")  # the training line; the evaluation starts right after it
        process.send_signal(signal.SIGTERM)
    for out_dir, process in runs.items():
        stdout, _ = assert_stopped_and_saved(out_dir, process)
        assert "at iter 10 (evaluation)" in stdout and "stopped at iter 10;" in stdout


# ----------------------------------------------------------------------------- train.py: one run per out_dir


def test_two_runs_started_at_once_on_one_out_dir_one_is_refused(byte_data, tmp_path):
    """Started together into a fresh out_dir (seeds 1 and 2): one runs, the other is refused with one error line,
    and the log and the checkpoint are the winner's alone. Twice."""
    for attempt in range(2):
        out_dir = tmp_path / f"run{attempt}"
        runs = {seed: start_train(tiny(byte_data, out_dir, seed=seed, **UNTIL_STOPPED)) for seed in (1, 2)}
        deadline = time.monotonic() + 30  # the loser is refused as soon as it has imported torch
        while all(process.poll() is None for process in runs.values()):
            assert time.monotonic() < deadline, "both runs are training in one out_dir"
            time.sleep(0.05)
        (loser,) = [seed for seed, process in runs.items() if process.poll() is not None]
        winner = 3 - loser
        _, loser_errors = finish(runs[loser])
        assert runs[loser].returncode == 1 and loser_errors.count("\n") == 1, loser_errors
        assert loser_errors.startswith(f"error: another train.py is running in {out_dir} (pid {runs[winner].pid} on ")
        read_until(runs[winner], "iter 1:")
        runs[winner].send_signal(signal.SIGTERM)
        assert_stopped_and_saved(out_dir, runs[winner])
        config_lines = [line for line in logged(out_dir) if "config" in line]
        assert [line["config"]["seed"] for line in config_lines] == [winner]
        assert load_checkpoint(str(out_dir))["config"]["seed"] == winner


def test_a_running_run_refuses_a_resume_and_an_evaluation(byte_data, tmp_path):
    """While a run trains, a resume (here under torchrun) or an --eval_only of its out_dir is refused: both would
    rewrite its log. The refused torchrun ends at once: its other worker, waiting for rank 0 in init_process_group,
    dies on torchrun's SIGTERM instead of holding out for torchrun's 30 s shutdown timeout."""
    settings = tiny(byte_data, tmp_path, **UNTIL_STOPPED)
    process = start_train(settings)
    read_until(process, "iter 1:")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    (resume, evaluation) = run_all(
        [
            [*torchrun, *cli({**settings, "init_from": "resume"})],
            [sys.executable, "train.py", *cli({**settings, "init_from": "resume", "eval_only": True})],
        ]
    )
    # a worker that held out would be SIGKILLed after the 30 s, and torchrun would say so
    assert "forcefully exiting" not in resume[2], resume[2][-3000:]
    refused = f"error: another train.py is running in {tmp_path} (pid {process.pid} on "
    assert resume[0] == 1 and refused in resume[2], resume[2][-3000:]
    assert evaluation[0] == 1 and evaluation[2].startswith(refused) and evaluation[2].count("\n") == 1, evaluation[2]
    process.send_signal(signal.SIGTERM)
    assert_stopped_and_saved(tmp_path, process)


def test_a_run_that_ended_before_its_first_save_leaves_no_lock_and_no_run(byte_data, tmp_path):
    """A run killed (SIGKILL: no handler runs) or finished (max_iters=0) before its first checkpoint leaves a log
    but no run: a resume says why it cannot, and the next fresh run starts there, taking over the dead run's lock."""
    killed, empty = tmp_path / "killed", tmp_path / "empty"
    process = start_train(tiny(byte_data, killed, **UNTIL_STOPPED))
    finished = start_train(tiny(byte_data, empty, max_iters=0))
    read_until(process, "iter 2:")
    process.kill()
    process.wait()
    assert (killed / "log.jsonl").exists() and (killed / "train.lock").exists() and not (killed / "ckpt.pt").exists()
    finish(finished)
    assert finished.returncode == 0 and (empty / "log.jsonl").exists() and not (empty / "ckpt.pt").exists()
    returncode, _, errors = run_to_end([sys.executable, "train.py", f"--out_dir={killed}", "--init_from=resume"])
    assert returncode == 1 and errors == (
        f"error: {killed} holds no checkpoint: its run ended before its first save, so there is nothing to resume; "
        f"start it afresh (without --init_from=resume)\n"
    )
    fresh = run_all([[sys.executable, "train.py", *cli(tiny(byte_data, out_dir))] for out_dir in (killed, empty)])
    for out_dir, (returncode, output, errors) in zip((killed, empty), fresh, strict=True):
        assert returncode == 0, errors
        assert "is from a run that ended before its first checkpoint; this run replaces it" in output
        assert load_checkpoint(str(out_dir))["iter_num"] == 8
        assert [line["iter"] for line in logged(out_dir) if "train/loss" in line] == list(range(1, 9))


def test_eval_only_without_resume_on_a_run_is_refused(byte_data, tmp_path):
    """--eval_only into an out_dir that holds a run would evaluate a new random model and log it as that run's
    iter 0: refused, the log left as it was. (With --init_from=resume it evaluates the run's checkpoint.)"""
    settings = tiny(byte_data, tmp_path, max_iters=2, eval_interval=2)
    main(TrainConfig(**settings))
    log_before = (tmp_path / "log.jsonl").read_bytes()
    returncode, _, errors = run_to_end([sys.executable, "train.py", *cli({**settings, "eval_only": True})])
    assert returncode == 1 and errors.count("\n") == 1, errors
    assert errors.startswith(f"error: {tmp_path} holds a run (ckpt.pt): --eval_only with --init_from=scratch")
    assert "add --init_from=resume to evaluate the run's checkpoint" in errors
    assert (tmp_path / "log.jsonl").read_bytes() == log_before


# ----------------------------------------------------------------------------- train.py and sample.py: one-line errors


def test_wandb_without_a_login_is_one_error_line_and_leaves_no_out_dir(byte_data, tmp_path):
    pytest.importorskip("wandb")
    env = {key: value for key, value in SUBPROCESS_ENV.items() if not key.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    out_dir = tmp_path / "run"
    command = [sys.executable, "train.py", *cli(tiny(byte_data, out_dir, wandb_log=True))]
    returncode, _, errors = run_to_end(command, env)
    assert returncode == 1 and errors.count("\n") == 1, errors
    assert errors.startswith("error: wandb could not start a run (") and "Traceback" not in errors
    assert "`wandb login`" in errors and "WANDB_MODE=offline" in errors
    assert not out_dir.exists()


# The command line's side of test_train's test_bad_values_are_config_errors, which has the others
BAD_SETTINGS = {
    "seed=-1": ({"seed": -1}, "error: seed must be in [0, 2**31 - 1], got -1\n"),
    "learning_rate=inf": ({"learning_rate": "inf"}, "error: learning_rate must be a finite number, got inf\n"),
    # found only once the model is built (out_dir exists by then): its shape may come from a checkpoint or GPT-2
    "sla_skip=n_layer": ({"sla": True, "sla_skip": 2}, "error: --sla is set but no head would skip: "),
}


def test_bad_settings_are_one_config_error_line_with_status_2(byte_data, tmp_path):
    commands = [[sys.executable, "train.py", *cli(tiny(byte_data, tmp_path / name, **settings))]
                for name, (settings, _) in BAD_SETTINGS.items()]  # fmt: skip
    for (name, (_, message)), (returncode, _, errors) in zip(BAD_SETTINGS.items(), run_all(commands), strict=True):
        assert (returncode, errors.count("\n")) == (2, 1), (name, errors)
        assert errors.startswith(message), (name, errors)
        assert not (tmp_path / name).exists(), name


class UnreachableHub:
    """The Hugging Face Hub's address as a listener that drops every connection at once and counts them: a script
    that retries connects again and again (huggingface_hub's downloads retry for about 23 s), one that works from the
    cache never connects."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._drop_connections, daemon=True).start()

    def _drop_connections(self):
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                connection, _ = self.listener.accept()
                self.connections += 1
                connection.close()

    def __repr__(self) -> str:
        return f"UnreachableHub({self.connections} connections)"

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        self.listener.close()


def offline_hub(tmp_path: Path, hub: UnreachableHub, **more) -> dict:
    """An environment where the Hugging Face Hub is that unreachable one and the cache (HF_HOME) is tmp_path/hf-home."""
    return {**SUBPROCESS_ENV, "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": hub.endpoint, **more}


def test_gpt2_weights_offline_fail_at_once_unless_cached(byte_data, tmp_path, tiktoken_cache):
    """train.py and sample.py --init_from=gpt2 with no Hub and nothing cached: one error line after one try at the
    Hub (none with HF_HUB_OFFLINE=1), not huggingface_hub's half a minute of retries, that says how to work offline,
    and no out_dir left behind. Weights that the cache holds are used without asking the Hub."""
    transformers = pytest.importorskip("transformers")
    cached = tmp_path / "cached" / "hf-home" / "hub" / "models--gpt2"
    snapshot = cached / "snapshots" / ("0" * 40)  # the cache's layout: a snapshot by commit, refs/main names it
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(snapshot)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("0" * 40)
    out_dir = tmp_path / "run"
    sample = [sys.executable, "sample.py", "--init_from=gpt2", "--max_new_tokens=3", "--num_samples=1"]
    hubs = [UnreachableHub() for _ in range(3)]  # one per command: they run side by side
    commands = [
        (
            [sys.executable, "train.py", *cli(tiny(byte_data, out_dir, init_from="gpt2"))],
            offline_hub(tmp_path, hubs[0]),
        ),
        (sample, offline_hub(tmp_path, hubs[1], HF_HUB_OFFLINE="1")),
        (sample, offline_hub(tmp_path / "cached", hubs[2], TIKTOKEN_CACHE_DIR=str(tiktoken_cache))),
    ]
    try:
        (train, sample_offline, sample_cached) = run_all(*zip(*commands, strict=True))
    finally:
        for hub in hubs:
            hub.close()
    for returncode, _, errors in (train, sample_offline):
        assert returncode == 1 and errors.count("\n") == 1, errors
        assert errors.startswith("error: GPT-2 weights 'gpt2' are not in the Hugging Face cache (")
        assert str(tmp_path / "hf-home") in errors and "HF_HUB_OFFLINE=1" in errors, errors
    # train.py asks the Hub once (its HTTP client may try a dropped connection a second time); sample.py offline
    # and from the cache not at all
    assert 1 <= hubs[0].connections <= 2 and hubs[1].connections == hubs[2].connections == 0, hubs
    assert not out_dir.exists()
    assert sample_cached[0] == 0 and sample_cached[1].strip(), sample_cached[2][-3000:]


# ----------------------------------------------------------------------------- prepare_openwebtext.py


@pytest.fixture(scope="module")
def large_corpus(tmp_path_factory, owt_jsonl) -> Path:
    """The OpenWebText sample 8 times (19 MB): its gpt2 tokenization takes a second or two, time to signal it."""
    path = tmp_path_factory.mktemp("corpus") / "owt-x8.jsonl"
    path.write_text(owt_jsonl.read_text() * 8)
    return path


@pytest.mark.parametrize(
    ("when", "signals", "gap", "through_timeout"),
    [
        ("tokenizing", (signal.SIGTERM, signal.SIGTERM), 0.005, False),
        ("tokenizing", (signal.SIGINT, signal.SIGINT), 0.02, False),
        ("tokenizing", (signal.SIGINT, signal.SIGTERM), 0.05, False),
        ("tokenizing", (signal.SIGTERM,), 0, True),  # the group: timeout passes it on, a second one
        ("loading", (signal.SIGTERM, signal.SIGTERM), 0.01, False),
    ],
    ids=["two-sigterms-5ms", "two-sigints-20ms", "sigint-sigterm-50ms", "timeout-group", "while-loading"],
)
def test_prepare_stopped_by_signals_leaves_nothing_and_says_so_in_one_line(
    tmp_path, large_corpus, tiktoken_cache, when, signals, gap, through_timeout
):
    if through_timeout and not HAS_TIMEOUT:
        pytest.skip("needs coreutils' timeout")
    out_dir = tmp_path / "out"
    command = [sys.executable, "prepare_openwebtext.py", "--files", str(large_corpus), "--num_proc", "2",
               "--out_dir", str(out_dir), "--cache_dir", str(tmp_path / "hf-cache")]  # fmt: skip
    process = start(["timeout", "300", *command] if through_timeout else command)
    if when == "tokenizing":
        deadline = time.monotonic() + 60
        while not (out_dir / "train.bin.tmp").exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
            time.sleep(0.005)
        time.sleep(0.2)  # some tokens written
    else:
        for line in process.stderr:
            if line.startswith("Generating train split"):  # datasets is reading the files
                break
    for number, sig in enumerate(signals):
        time.sleep(gap if number else 0)
        if through_timeout:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
    _, errors = finish(process)
    assert process.returncode == 128 + signals[0], errors[-3000:]
    last_line = errors.replace("\r", "\n").strip().splitlines()[-1]
    assert last_line == f"interrupted by {signals[0].name}: temporary files removed, no new meta.json written"
    assert "Traceback" not in errors and "Error" not in errors, errors[-3000:]
    assert not out_dir.exists(), sorted(path.name for path in out_dir.iterdir())


# prepare_openwebtext.py's command line (its __main__ block), with one more at-fork hook that sends the process a
# SIGTERM from inside the hooks of its first fork, where a signal that arrives while datasets or the pool forks lands
SIGTERM_IN_FORK_HOOK = """
import os, runpy, signal, sys
sent = []
def sigterm_once():
    if not sent:
        sent.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
os.register_at_fork(after_in_parent=sigterm_once)
sys.argv[0] = "prepare_openwebtext.py"
runpy.run_path("prepare_openwebtext.py", run_name="__main__")
"""


def test_prepare_stopped_by_a_signal_that_lands_in_a_fork_hook_still_stops(tmp_path, owt_jsonl, tiktoken_cache):
    """Python drops an exception raised inside an at-fork hook ("Exception ignored"): the Stopped of a signal that
    lands there must be raised again, not lost with the run going on to write its outputs and exit 0."""
    out_dir = tmp_path / "out"
    command = [sys.executable, "-c", SIGTERM_IN_FORK_HOOK, "--files", str(owt_jsonl), "--num_proc", "2",
               "--out_dir", str(out_dir), "--cache_dir", str(tmp_path / "hf-cache")]  # fmt: skip
    process = start(command)
    _, errors = finish(process)
    assert process.returncode == 128 + signal.SIGTERM, errors[-3000:]
    last_line = errors.replace("\r", "\n").strip().splitlines()[-1]
    assert last_line == "interrupted by SIGTERM: temporary files removed, no new meta.json written", errors[-3000:]
    assert "Traceback" not in errors and "Exception ignored" not in errors, errors[-3000:]
    assert not out_dir.exists()


# prepare_openwebtext.py's command line, where the first close() of one progress bar (its desc starts with argv[1])
# sends the process a SIGTERM on entry: Python runs the handler there, before the bar is closed, as it does for a
# signal that arrives just then
SIGTERM_AS_A_BAR_CLOSES = """
import os, runpy, signal, sys
from tqdm import tqdm
prefix, close, sent = sys.argv.pop(1), tqdm.close, []
def close_after_sigterm(bar):
    if not sent and str(getattr(bar, "desc", "")).startswith(prefix):
        sent.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
    close(bar)
tqdm.close = close_after_sigterm
sys.argv[0] = "prepare_openwebtext.py"
runpy.run_path("prepare_openwebtext.py", run_name="__main__")
"""


@pytest.mark.parametrize("bar", ["Generating train split", "tokenizing train"])
def test_prepare_stopped_as_a_progress_bar_closes_still_ends_on_its_one_line(tmp_path, owt_jsonl, tiktoken_cache, bar):
    """A bar whose close() a stop cuts short is closed again when Python frees it, at exit, after the "interrupted"
    line, and would print its last state below it (seen with datasets' "Generating train split" bar): the line that
    says what happened must stay the last one."""
    out_dir = tmp_path / "out"
    command = [sys.executable, "-c", SIGTERM_AS_A_BAR_CLOSES, bar, "--files", str(owt_jsonl), "--num_proc", "2",
               "--out_dir", str(out_dir), "--cache_dir", str(tmp_path / "hf-cache")]  # fmt: skip
    process = start(command)
    _, errors = finish(process)
    assert process.returncode == 128 + signal.SIGTERM, errors[-3000:]  # 0 if no bar named so closed: no signal
    last_line = errors.replace("\r", "\n").strip().splitlines()[-1]
    assert last_line == "interrupted by SIGTERM: temporary files removed, no new meta.json written", errors[-3000:]
    assert "Traceback" not in errors, errors[-3000:]
    assert not out_dir.exists()


def test_prepare_on_a_full_disk_is_one_error_line(tmp_path, owt_jsonl):
    """Writes to train.bin.tmp fail with ENOSPC (it points at /dev/full): one error line, the file removed."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "train.bin.tmp").symlink_to("/dev/full")
    command = [sys.executable, "prepare_openwebtext.py", "--files", str(owt_jsonl), "--tokenizer", "byte",
               "--num_proc", "1", "--out_dir", str(out_dir), "--cache_dir", str(tmp_path / "hf-cache")]  # fmt: skip
    returncode, _, errors = run_to_end(command)
    assert returncode == 1 and "Traceback" not in errors, errors[-3000:]
    assert [line for line in errors.splitlines() if line.startswith("error:")] == [
        f"error: cannot write to out_dir {out_dir}: No space left on device; temporary files removed, existing "
        f"outputs left as they were"
    ]
    assert list(out_dir.iterdir()) == []
