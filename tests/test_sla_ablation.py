"""experiments/sla_ablation.sh as the campaign runs it (call after call, each starting the runs not yet logged), and
the README's table of its results recomputed from the logs committed under results/."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO, SUBPROCESS_ENV

import plot_results

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


def fake_log(path: Path, seed: int, final_loss: float, length: int, gpu: str | None = None):
    """A log with what the campaign's plan reads: its config (and the GPU it ran on) and evaluations at `length` (the
    final one last)."""
    provenance = {} if gpu is None else {"provenance": {"device": gpu}}
    records = [
        {"iter": 0, "tokens": 0, "config": {"seed": seed, "block_size": length}, **provenance},
        {"iter": 500, "tokens": 500, f"val/loss@{length}": final_loss + 0.5},
        {"iter": 1000, "tokens": 1000, f"val/loss@{length}": final_loss},
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def pending(ablation: str, results: Path, log_dest: Path | None = None, gpu: str = "", notes: list | None = None):
    """The runs the campaign would start next on a machine whose GPU is gpu ("": none); its notes on stderr go to
    notes."""
    env = {**SUBPROCESS_ENV, "RESULTS": str(results), "LOG_DEST": str(log_dest or results), "PYTHON": sys.executable,
           "GPU_MODEL": gpu}  # fmt: skip
    done = subprocess.run(["bash", str(REPO / "experiments" / "sla_ablation.sh"), ablation, "--pending"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    if notes is not None:
        notes += done.stderr.splitlines()
    return done.stdout.split()


def test_a_seeds_runs_stay_on_the_gpu_model_its_first_runs_had(tmp_path):
    """A seed whose logged runs name a GPU model is left to machines with that model, so that the paired differences
    do not mix cards; a seed without logged runs, or a machine without a GPU, takes any."""
    results = tmp_path / "results"
    results.mkdir()
    for arm in ("plain", "sla-skip9", "sla-skip15"):
        for seed in (1, 2):
            fake_log(results / f"{arm}-seed{seed}.jsonl", seed, 3.0, 8192, gpu="GPU A")
    fake_log(results / "plain-seed3.jsonl", 3, 3.0, 8192, gpu="GPU A")
    seeds_3_and_4 = ["sla-skip9-seed3", "sla-skip15-seed3", "plain-seed4", "sla-skip9-seed4", "sla-skip15-seed4"]
    assert pending("medium-8k", results, gpu="GPU A") == seeds_3_and_4
    assert pending("medium-8k", results, gpu="") == seeds_3_and_4
    notes = []
    assert pending("medium-8k", results, gpu="GPU B", notes=notes) == seeds_3_and_4[2:]
    assert notes == [
        f"skipping {run}: seed 3 ran on GPU A, this GPU is GPU B (name the run to run it here)"
        for run in seeds_3_and_4[:2]
    ]
    # once seed 4 has a run on GPU B, GPU A's machines leave it alone
    fake_log(results / "plain-seed4.jsonl", 4, 3.0, 8192, gpu="GPU B")
    assert pending("medium-8k", results, gpu="GPU A") == seeds_3_and_4[:2]


def test_medium_campaign_adds_seeds_5_and_6_only_if_the_best_gap_is_not_told_apart_at_seed_4(tmp_path):
    results, device_logs = tmp_path / "results", tmp_path / "device-logs"
    results.mkdir()
    device_logs.mkdir()
    arms = ["plain", "sla-skip9", "sla-skip15"]
    assert pending("medium-8k", results) == [f"{arm}-seed{seed}" for seed in (1, 2, 3, 4) for arm in arms]

    plain = {seed: 3.0 + 0.03 * seed for seed in (1, 2, 3, 4)}  # seeds differ more than the arms do
    steady = {1: -0.021, 2: -0.019, 3: -0.022, 4: -0.018}  # about -0.02 in every seed: told apart
    for seed in (1, 2, 3, 4):
        fake_log(results / f"plain-seed{seed}.jsonl", seed, plain[seed], 8192)
        fake_log(results / f"sla-skip15-seed{seed}.jsonl", seed, plain[seed] + 0.01, 8192)
    for seed in (1, 2, 3):
        fake_log(results / f"sla-skip9-seed{seed}.jsonl", seed, plain[seed] + steady[seed], 8192)
    assert pending("medium-8k", results) == ["sla-skip9-seed4"]
    # the last seed-4 log, written by an earlier call on this machine, completes seeds 1 to 4: sla-skip9 is told apart
    fake_log(device_logs / "sla-skip9-seed4.jsonl", 4, plain[4] + steady[4], 8192)
    assert pending("medium-8k", results, device_logs) == []

    noisy = {1: -0.04, 2: -0.01, 3: -0.05, 4: 0.0}  # lower on average, but not told apart from seed noise
    for seed in (1, 2, 3, 4):
        fake_log(results / f"sla-skip9-seed{seed}.jsonl", seed, plain[seed] + noisy[seed], 8192)
    assert pending("medium-8k", results) == ["plain-seed5", "sla-skip9-seed5", "plain-seed6", "sla-skip9-seed6"]

    # seed 5 lands and, over seeds 1 to 5, the gap is told apart: seed 6 still runs, since the decision was taken at
    # seed 4 (stopping at the first look that says yes would pass seed noise for an effect more often than 5%)
    fake_log(results / "plain-seed5.jsonl", 5, 3.15, 8192)
    fake_log(results / "sla-skip9-seed5.jsonl", 5, 3.15 - 0.035, 8192)
    assert plot_results.main(["--ablation", str(results), "--told_apart", "sla-skip9"]) == "yes"
    assert (
        plot_results.main(["--ablation", str(results), "--told_apart", "sla-skip9", "--seeds", "1", "2", "3", "4"])
        == "no"
    )
    assert pending("medium-8k", results) == ["plain-seed6", "sla-skip9-seed6"]


def test_head_ratio_runs_follow_the_skip_arms_and_extend_a_ratio_that_beats_0_75(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    plain = {seed: 3.0 + 0.03 * seed for seed in (1, 2, 3, 4)}
    for seed in (1, 2, 3, 4):
        fake_log(results / f"plain-seed{seed}.jsonl", seed, plain[seed], 16384)
        fake_log(results / f"sla-skip9-seed{seed}.jsonl", seed, plain[seed] - 0.02, 16384)
    for arm in ("sla-skip3", "sla-skip1"):
        for seed in (1, 2):
            fake_log(results / f"{arm}-seed{seed}.jsonl", seed, plain[seed] - 0.01, 16384)
    ratios = ["sla-skip9-ratio0.25", "sla-skip9-ratio0.5"]
    assert pending("small-16k", results) == [f"{arm}-seed{seed}" for seed in (1, 2) for arm in ratios]
    for seed in (1, 2):  # 0.25 above 0.75's mean, 0.5 below it
        fake_log(results / f"sla-skip9-ratio0.25-seed{seed}.jsonl", seed, plain[seed] - 0.01, 16384)
        fake_log(results / f"sla-skip9-ratio0.5-seed{seed}.jsonl", seed, plain[seed] - 0.03, 16384)
    assert pending("small-16k", results) == ["sla-skip9-ratio0.5-seed3", "sla-skip9-ratio0.5-seed4"]


def test_a_log_folder_holding_another_ablations_run_stops_the_campaign(tmp_path):
    """Run names repeat across the two ablations: a machine's LOG_DEST that still holds a medium-8k run must stop
    a small-16k call, not pass that run off as the small one of the same name and start nothing."""
    results, device_logs = tmp_path / "results", tmp_path / "device-logs"
    results.mkdir()
    device_logs.mkdir()
    for seed in (1, 2):
        for arm in ("plain", "sla-skip9", "sla-skip3", "sla-skip1"):
            fake_log(results / f"{arm}-seed{seed}.jsonl", seed, 3.0, 16384)
    assert pending("small-16k", results, device_logs)[:1] == ["plain-seed3"]
    fake_log(device_logs / "sla-skip9-seed2.jsonl", 2, 2.8, 8192)  # the medium campaign's, on the same machine
    env = {**SUBPROCESS_ENV, "RESULTS": str(results), "LOG_DEST": str(device_logs), "PYTHON": sys.executable,
           "GPU_MODEL": ""}  # fmt: skip
    done = subprocess.run(["bash", str(REPO / "experiments" / "sla_ablation.sh"), "small-16k", "--pending"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and done.stdout == "", done.stdout
    assert "sla-skip9-seed2 trained {'n_layer': None, 'n_head': None, 'n_embd': None, 'block_size': 8192" in done.stderr
    assert "one folder (and one LOG_DEST) holds one ablation's logs" in done.stderr


ACROSS_SIZES = {  # size: (results folder, training context, the campaign's name)
    "small, 16K": ("sla-ablation-16k", 16384, "small-16k"),
    "medium, 8K": ("sla-ablation-medium-8k", 8192, "medium-8k"),
}


def readme_rows_across_sizes() -> list[list[str]]:
    """The cells of the README's "SLA − plain across both sizes" table, one list per row."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("SLA − plain across both sizes"))
    rows = []
    for line in lines[start:]:
        if line.startswith("| ") and not line.startswith("| size") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows and not line.startswith("|"):
            break
    return rows


def arm_name(cell: str) -> str:
    """The campaign's arm name for a README arm cell: `sla_skip=9` is sla-skip9, `sla_skip=9, sla_head_ratio=0.5`
    is sla-skip9-ratio0.5 (a remark in parentheses after the code is not part of it)."""
    settings = dict(pair.split("=") for pair in cell.split("`")[1].split(", "))
    ratio = settings.get("sla_head_ratio")
    return f"sla-skip{settings['sla_skip']}" + (f"-ratio{ratio}" if ratio else "")


def test_readme_table_across_sizes_is_recomputed_from_the_committed_logs():
    """Every row of the README's table equals what plot_results.py computes from results/ today, and every SLA arm
    logged under the two ablations has a row: a new seed that lands without the README being updated fails here. A
    verdict on fewer seeds than its campaign still plans for that arm says it is interim."""
    logs = {
        size: plot_results.read_ablation(str(REPO / "results" / folder)) for size, (folder, *_) in ACROSS_SIZES.items()
    }
    summaries = {
        size: plot_results.ablation_summary(logs[size], length) for size, (_, length, _) in ACROSS_SIZES.items()
    }
    planned = {  # arm names of the runs each campaign still plans
        size: {run.rsplit("-seed", 1)[0] for run in pending(campaign, REPO / "results" / folder)}
        for size, (folder, _, campaign) in ACROSS_SIZES.items()
    }
    rows, seen = readme_rows_across_sizes(), set()
    for size, arm_cell, layers_cell, heads_cell, seeds_cell, gap_cell, verdict_cell in rows:
        arms, summary = logs[size], summaries[size]
        arm = arm_name(arm_cell)
        seen.add((size, arm))
        model = next(iter(arms[arm].values()))["model_args"]
        assert layers_cell == f"{model['n_layer'] - model['sla_skip']} of {model['n_layer']}", (size, arm, model)
        assert heads_cell == f"{round(model['sla_head_ratio'] * model['n_head'])} of {model['n_head']}", (size, arm)
        seeds = sorted(summary[arm]["differences"])
        assert seeds == list(range(seeds[0], seeds[-1] + 1)), (size, arm, seeds)
        assert seeds_cell == (f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"), (size, arm)
        differences = [summary[arm]["differences"][seed]["all"] for seed in seeds]
        mean, sd = plot_results.mean_sd(differences)
        gap = f"{mean:.3f}" if sd is None else f"{mean:.3f} ± {sd:.3f}"
        assert gap_cell == gap.replace("-", "−"), (size, arm, mean, sd)
        verdict = plot_results.told_apart(differences)
        if len(seeds) == 1:
            assert verdict_cell == "one seed", (size, arm)
        else:
            answer = "yes" if verdict.startswith("yes, SLA lower") else "no"
            assert verdict_cell == (f"{answer} (interim: more seeds to come)" if arm in planned[size] else answer), (
                size, arm, verdict, planned[size])  # fmt: skip
    for size, arms in logs.items():
        logged = {arm for arm in arms if arm != "plain"}
        assert {arm for row_size, arm in seen if row_size == size} == logged, size
