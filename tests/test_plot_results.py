"""plot_results.py on the logs of real tiny plain and SLA runs: pairing, the table's numbers, the plot."""

import json

import pytest
from conftest import tiny_settings

import plot_results
from train import TrainConfig, main


@pytest.fixture(scope="module")
def run_dirs(byte_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    dirs = {}
    for variant in ("plain", "sla"):
        dirs[variant] = out / variant
        settings = tiny_settings(
            byte_data, dirs[variant], n_layer=3, n_head=4, gradient_accumulation_steps=1, max_iters=6,
            eval_interval=3, eval_iters=2, log_interval=3, eval_block_sizes=(32, 64), sla=variant == "sla", sla_skip=1,
        )  # fmt: skip
        main(TrainConfig(**settings))
    return dirs


def final_loss(run_dir, key):
    return [r[key] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if key in r][-1]


def test_table_pairs_plain_with_sla_and_reports_the_difference(run_dirs, tmp_path):
    png, table_path = tmp_path / "plot.png", tmp_path / "table.md"
    table = plot_results.main(
        [str(run_dirs["sla"]), str(run_dirs["plain"]), "--png", str(png), "--table", str(table_path)]
    )
    rows = [line for line in table.splitlines() if line.startswith("| 64 ")]
    assert len(rows) == 2  # val @ 32 and val @ 64, one pair
    for row, T in zip(rows, (32, 64), strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        plain, sla = final_loss(run_dirs["plain"], f"val/loss@{T}"), final_loss(run_dirs["sla"], f"val/loss@{T}")
        assert cells[2] == f"val @ {T}"
        assert float(cells[3]) == pytest.approx(plain, abs=1e-4) and float(cells[4]) == pytest.approx(sla, abs=1e-4)
        assert float(cells[5]) == pytest.approx(sla - plain, abs=2e-4)
    assert table_path.read_text().strip() == table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_logs_from_before_the_attention_key_pair_as_sdpa(run_dirs, tmp_path):
    """train.py's config gained `attention` later; a log without it ran SDPA, and pairs with an sdpa run only."""

    def log_with_config(variant, name, **changes):
        records = [json.loads(line) for line in (run_dirs[variant] / "log.jsonl").read_text().splitlines()]
        for record in records:
            if "config" in record:
                record["config"] = {key: value for key, value in record["config"].items() if key != "attention"}
                record["config"].update(changes)
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
        return plot_results.read_run(str(path))

    old_plain = log_with_config("plain", "old-plain")
    assert "attention" not in old_plain["config"]
    for attention, paired in (("sdpa", True), ("fa4", False)):
        sla = log_with_config("sla", f"sla-{attention}", attention=attention)
        pairs = plot_results.pair_runs([old_plain, sla])
        assert pairs == ([(old_plain, sla)] if paired else [(old_plain, None), (None, sla)])


def test_two_runs_of_the_same_variant_are_refused(run_dirs):
    with pytest.raises(SystemExit, match="both are plain"):
        plot_results.main([str(run_dirs["plain"]), str(run_dirs["plain"] / "log.jsonl")])


def test_a_folder_without_a_log_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no training log"):
        plot_results.main([str(tmp_path)])


@pytest.fixture(scope="module")
def ablation_dir(byte_data, tmp_path_factory):
    """Logs of real tiny runs named as sla_ablation.sh names them: plain and two SLA arms, two seeds each."""
    out = tmp_path_factory.mktemp("ablation")
    settings = dict(
        n_layer=3, n_head=4, gradient_accumulation_steps=1, max_iters=4, eval_interval=2, eval_iters=2,
        final_eval_iters=3, log_interval=2, eval_block_sizes=(16, 64),
    )  # fmt: skip
    for arm, sla in (
        ("plain", {}),
        ("sla-skip1", {"sla": True, "sla_skip": 1}),
        ("sla-skip2", {"sla": True, "sla_skip": 2}),
    ):
        for seed in (1, 2):
            run = out / "runs" / f"{arm}-{seed}"
            main(TrainConfig(**tiny_settings(byte_data, run, **settings, **sla, seed=seed)))
            (out / f"{arm}-seed{seed}.jsonl").write_text((run / "log.jsonl").read_text())
    return out


def last_eval(log, key):
    return [r for r in map(json.loads, log.read_text().splitlines()) if key in r][-1]


def test_ablation_table_recomputed_from_the_logs(ablation_dir, tmp_path):
    png, table_path = tmp_path / "ablation.png", tmp_path / "table.md"
    table = plot_results.main(["--ablation", str(ablation_dir), "--png", str(png), "--table", str(table_path)])
    summary_table = table.split("By position")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in summary_table.splitlines() if line.startswith(("| plain", "| sla-"))}  # fmt: skip
    final = {
        (arm, seed): last_eval(ablation_dir / f"{arm}-seed{seed}.jsonl", "val/loss@64")
        for arm in ("plain", "sla-skip1", "sla-skip2")
        for seed in (1, 2)
    }
    plain = [final["plain", s]["val/loss@64"] for s in (1, 2)]
    mean, sd = plot_results.mean_sd(plain)
    assert rows["plain"][1] == "1, 2" and rows["plain"][2] == f"{mean:.4f} ± {sd:.4f}"
    for arm in ("sla-skip1", "sla-skip2"):
        differences = [final[arm, s]["val/loss@64"] - final["plain", s]["val/loss@64"] for s in (1, 2)]
        mean = sum(differences) / 2
        sd = abs(differences[0] - differences[1]) / 2**0.5  # the sample standard deviation of two values
        assert rows[arm][3] == f"{mean:+.4f} ± {sd:.4f}"
        assert rows[arm][4] == ", ".join(f"{d:+.4f}" for d in differences)
        t = mean / (sd / 2**0.5)  # paired t statistic, 1 degree of freedom: told apart beyond 12.706
        verdict = "no" if abs(t) <= 12.706 else "yes, SLA lower" if mean < 0 else "yes, SLA higher"
        assert rows[arm][5] == f"{verdict} (t = {t:+.2f}, bound ±12.71)"
        # by position: the late bucket's paired difference
        late = [final[arm, s]["val/loss@64/pos16-64"] - final["plain", s]["val/loss@64/pos16-64"] for s in (1, 2)]
        position_row = next(line for line in table.splitlines() if line.startswith(f"| {arm} − plain"))
        assert position_row.split("|")[3].strip().startswith(f"{sum(late) / 2:+.4f} ± ")
    means = {arm: sum(final[arm, s]["val/loss@64"] for s in (1, 2)) / 2 for arm in ("sla-skip1", "sla-skip2")}
    assert plot_results.main(["--ablation", str(ablation_dir), "--best_sla_arm"]) == min(means, key=means.get)
    assert table_path.read_text().strip() == table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_best_sla_arm_ranks_on_the_seeds_every_sla_arm_has(ablation_dir, tmp_path):
    # the campaign's seed-3 and -4 runs go to the best arm only: its extra seeds must not decide the next ranking
    for log in ablation_dir.glob("*.jsonl"):
        (tmp_path / log.name).write_text(log.read_text())
    best = plot_results.main(["--ablation", str(tmp_path), "--best_sla_arm"])
    other = ({"sla-skip1", "sla-skip2"} - {best}).pop()
    easy_seed = []  # a third seed far easier than seeds 1 and 2: on a mean over all its seeds, `other` would win
    for line in (tmp_path / f"{other}-seed1.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in record:
            if key.startswith("val/loss@"):
                record[key] -= 1.0
        easy_seed.append(json.dumps(record))
    (tmp_path / f"{other}-seed3.jsonl").write_text("\n".join(easy_seed) + "\n")
    assert plot_results.main(["--ablation", str(tmp_path), "--best_sla_arm"]) == best
    (tmp_path / f"{best}-seed2.jsonl").unlink()
    (tmp_path / f"{other}-seed1.jsonl").unlink()
    with pytest.raises(SystemExit, match="share no seed"):
        plot_results.main(["--ablation", str(tmp_path), "--best_sla_arm"])


def test_ablation_folder_errors(ablation_dir, tmp_path):
    (tmp_path / "plain-1.jsonl").write_text((ablation_dir / "plain-seed1.jsonl").read_text())
    with pytest.raises(SystemExit, match=r"plain-1.jsonl is not named <arm>-seed<N>.jsonl"):
        plot_results.main(["--ablation", str(tmp_path)])
    (tmp_path / "plain-1.jsonl").rename(tmp_path / "sla-skip1-seed1.jsonl")
    with pytest.raises(SystemExit, match=r"no plain-seed<N>\.jsonl"):
        plot_results.main(["--ablation", str(tmp_path)])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gap", "DIR", "--seeds", "1", "2"], "--seeds works with --ablation DIR only"),
        (["--gap", "DIR", "--length", "64"], "--length works with --ablation DIR only"),
        (["RUN", "--told_apart", "sla-skip1"], "--told_apart works with --ablation DIR only"),
        (["--ablation", "DIR", "--among", "sla-skip1"], "--among ranks arms for --best_sla_arm only"),
    ],
)
def test_a_flag_the_mode_does_not_read_is_refused(ablation_dir, flags, message, capsys):
    """--seeds with --gap used to be dropped without a word: the gap table then silently read every seed."""
    paths = {"DIR": str(ablation_dir), "RUN": str(ablation_dir / "plain-seed1.jsonl")}
    with pytest.raises(SystemExit):
        plot_results.main([paths.get(flag, flag) for flag in flags])
    assert message in capsys.readouterr().err


def test_gap_against_tokens_recomputed_from_the_logs(ablation_dir, tmp_path):
    png, table_path = tmp_path / "gap.png", tmp_path / "gap.md"
    table = plot_results.main(
        ["--gap", str(ablation_dir), str(ablation_dir), "--png", str(png), "--table", str(table_path)]
    )
    evals = {
        (arm, seed): {r["tokens"]: r["val/loss@64"] for r in map(json.loads, (ablation_dir / f"{arm}-seed{seed}.jsonl")
                      .read_text().splitlines()) if "val/loss@64" in r and r["iter"] > 0}
        for arm in ("plain", "sla-skip1", "sla-skip2")
        for seed in (1, 2)
    }  # fmt: skip
    tokens = sorted(evals["plain", 1])
    assert len(tokens) == 2  # evaluations at steps 2 and 4
    header = next(line for line in table.splitlines() if line.startswith("| arm | seeds |"))
    assert header.split("|")[3:5] == [f" {t / 1e6:.1f}M tokens " for t in tokens]
    for arm in ("sla-skip1", "sla-skip2"):
        rows = [line for line in table.splitlines() if line.startswith(f"| {arm} |")]
        assert len(rows) == 2  # the folder, given twice, gives two tables
        cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
        assert cells[1] == "1, 2"
        for cell, t in zip(cells[2:], tokens, strict=True):
            gaps = [evals[arm, seed][t] - evals["plain", seed][t] for seed in (1, 2)]
            assert cell == f"{sum(gaps) / 2:+.4f} ± {abs(gaps[0] - gaps[1]) / 2**0.5:.4f}"
    assert table_path.read_text().strip() == table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the ablation's own table ends with the same gap table
    ablation_table = plot_results.main(["--ablation", str(ablation_dir)])
    first_gap_table = [line for line in table.splitlines() if line.startswith("|")][:4]  # header, rule, two arms
    assert ablation_table.endswith("\n".join(first_gap_table))


def test_told_apart_and_best_among_arms(ablation_dir):
    for arm in ("sla-skip1", "sla-skip2"):
        differences = [
            last_eval(ablation_dir / f"{arm}-seed{s}.jsonl", "val/loss@64")["val/loss@64"]
            - last_eval(ablation_dir / f"plain-seed{s}.jsonl", "val/loss@64")["val/loss@64"]
            for s in (1, 2)
        ]
        t = (sum(differences) / 2) / (abs(differences[0] - differences[1]) / 2**0.5 / 2**0.5)
        expected = "yes" if abs(t) > 12.706 else "no"
        assert plot_results.main(["--ablation", str(ablation_dir), "--told_apart", arm]) == expected
        assert plot_results.main(["--ablation", str(ablation_dir), "--best_sla_arm", "--among", arm]) == arm
    with pytest.raises(SystemExit, match="--told_apart plain: no SLA arm"):
        plot_results.main(["--ablation", str(ablation_dir), "--told_apart", "plain"])
    with pytest.raises(SystemExit, match=r"no log yet of \['sla-skip7'\]"):
        plot_results.main(["--ablation", str(ablation_dir), "--best_sla_arm", "--among", "sla-skip1", "sla-skip7"])


def test_cost_table_counts_the_unread_kv_of_each_arm(ablation_dir):
    """3 layers of 4 heads, 3 skip heads: the skip heads' own K/V of the last layer are read by no one (sla_skip 1:
    layer 2's; sla_skip 2: layer 2's, its only SLA layer), so 9 of 12 heads' K/V are cached and computed."""
    import torch

    from model import GPT, GPTConfig

    table = plot_results.main(["--ablation", str(ablation_dir)])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in table.split("Cost per token")[1].split("SLA − plain, ")[0].splitlines()
            if line.startswith("| sla-")}  # fmt: skip
    plain_args = json.loads((ablation_dir / "plain-seed1.jsonl").read_text().splitlines()[0])["model_args"]
    flops = GPT(GPTConfig(**plain_args)).flops_per_token()
    n_embd = plain_args["n_embd"]
    unread = 6 * 2 * 3 * (n_embd // 4) * n_embd  # K and V rows of 3 heads, forward and backward
    for arm in ("sla-skip1", "sla-skip2"):
        assert rows[arm][1:] == ["3 of 4", "0.7500×", f"{(flops - unread) / flops:.4f}×"]
    assert torch.tensor(0).device.type == "cpu"  # the meta-device count left the default device alone
