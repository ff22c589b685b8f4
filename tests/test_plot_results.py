"""plot_results.py on the logs of real tiny plain and SLA runs: pairing, the table's numbers, the plot."""

import json

import pytest

import plot_results
from train import TrainConfig, main


@pytest.fixture(scope="module")
def run_dirs(byte_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    settings = dict(
        data_dir=str(byte_data), device="cpu", dtype="float32", n_layer=3, n_head=4, n_embd=32, block_size=64,
        batch_size=4, gradient_accumulation_steps=1, max_iters=6, eval_interval=3, eval_iters=2, log_interval=3,
        eval_block_sizes=(32, 64), sla_skip=1,
    )  # fmt: skip
    dirs = {}
    for variant in ("plain", "sla"):
        dirs[variant] = out / variant
        main(TrainConfig(**settings, out_dir=str(dirs[variant]), sla=variant == "sla"))
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


def test_two_runs_of_the_same_variant_are_refused(run_dirs):
    with pytest.raises(SystemExit, match="both are plain"):
        plot_results.main([str(run_dirs["plain"]), str(run_dirs["plain"] / "log.jsonl")])


def test_a_folder_without_a_log_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no training log"):
        plot_results.main([str(tmp_path)])
