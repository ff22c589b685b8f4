"""experiments/long_16k.sh rehearsed as it runs on a GPU machine, with torchrun (gloo on CPU) and a tiny model."""

import json
import subprocess
import sys

from conftest import REPO, SUBPROCESS_ENV

TINY = (  # the long run's schedule, shrunk: a model and a run small enough for two CPU processes
    "--device=cpu --dtype=float32 --compile=False --n_layer=10 --n_head=4 --n_embd=32 --block_size=64 --batch_size=2"
    " --gradient_accumulation_steps=2 --max_iters=4 --warmup_iters=1 --lr_decay_iters=4 --eval_interval=2"
    " --eval_iters=1 --final_eval_iters=2 --log_interval=1 --eval_block_sizes=16,64"
)


def test_both_arms_run_under_torchrun_and_log_world_size_and_positions(byte_data, tmp_path):
    env = {
        **SUBPROCESS_ENV,
        "RESULTS": str(tmp_path / "results"),
        "WORK": str(tmp_path / "work"),
        "DATA": str(byte_data),
        "PYTHON": sys.executable,
        "NPROC": "2",
        "EXTRA_ARGS": TINY,
    }
    script = str(REPO / "experiments" / "long_16k.sh")
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "starting plain on 2 GPUs" in done.stdout and "starting sla-skip9 on 2 GPUs" in done.stdout
    for arm, sla in (("plain", False), ("sla-skip9", True)):
        records = [json.loads(line) for line in (tmp_path / "results" / f"{arm}-seed1.jsonl").read_text().splitlines()]
        config = records[0]
        assert config["world_size"] == 2
        assert (config["config"]["sla"], config["config"]["seed"], config["config"]["max_iters"]) == (sla, 1, 4)
        final = [r for r in records if "val/loss@64" in r][-1]
        assert final["iter"] == 4 and final["tokens"] == 4 * 2 * 2 * 64
        assert any(key.startswith("val/loss@64/pos") for key in final)
    # a second call finds both logs and starts nothing
    again = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "both arms are in" in again.stdout
