"""experiments/sla_ablation.sh as the campaign runs it: call after call, each starting the runs not yet logged."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO, SUBPROCESS_ENV

TINY = (  # the 16K ablation's config with a model and a run small enough for a CPU
    "--device=cpu --dtype=float32 --compile=False --n_layer=10 --n_head=4 --n_embd=32 --block_size=64 --batch_size=2"
    " --max_iters=2 --eval_interval=2 --eval_iters=1 --final_eval_iters=1 --warmup_iters=1 --lr_decay_iters=2"
    " --log_interval=1"
)


def campaign_call(results: Path, log_dest: Path, work: Path, data: Path) -> str:
    env = {
        **SUBPROCESS_ENV,
        "RESULTS": str(results),
        "LOG_DEST": str(log_dest),
        "WORK": str(work),
        "DATA": str(data),
        "PYTHON": sys.executable,
        "EXTRA_ARGS": TINY,
        "CUDA_VISIBLE_DEVICES": "",
    }
    done = subprocess.run(
        ["bash", str(REPO / "experiments" / "sla_ablation.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def run_config(log: Path) -> dict:
    return json.loads(log.read_text().splitlines()[0])["config"]


def test_each_call_starts_the_next_runs_not_yet_logged(byte_data, tmp_path):
    results, device_logs, work = tmp_path / "results", tmp_path / "device-logs", tmp_path / "work"
    # the first call logs into the campaign's folder itself, and records the corpus it trained on
    assert "starting plain-seed1 on 1 GPU(s)" in campaign_call(results, results, work, byte_data)
    config = run_config(results / "plain-seed1.jsonl")
    assert (config["sla"], config["seed"], config["block_size"], config["max_iters"]) == (False, 1, 64, 2)
    recorded = json.loads((results / "prepare-pysrc.json").read_text())
    assert recorded["splits"] == json.loads((byte_data / "meta.json").read_text())["splits"]

    # later calls log elsewhere (a device's disk): a run logged there by an earlier call is not started again
    assert "starting sla-skip9-seed1 " in campaign_call(results, device_logs, work, byte_data)
    assert "starting sla-skip3-seed1 " in campaign_call(results, device_logs, work, byte_data)
    logged = sorted(p.name for p in device_logs.glob("*-seed*.jsonl"))
    assert logged == ["sla-skip3-seed1.jsonl", "sla-skip9-seed1.jsonl"]
    config = run_config(device_logs / "sla-skip3-seed1.jsonl")
    assert (config["sla"], config["sla_skip"], config["sla_head_ratio"], config["seed"]) == (True, 3, 0.75, 1)
