"""
Plain vs SLA from training logs: a markdown table of final validation losses and a plot of validation loss
against tokens seen.

    python plot_results.py RUN [RUN ...] [--png val_loss.png] [--table table.md]

RUN is a train.py out_dir (its log.jsonl is read) or a log .jsonl file itself. Runs are paired by everything in
their config except the SLA settings, out_dir and wandb names, so a pair differs in SLA alone.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

UNPAIRED_KEYS = {"sla", "sla_head_ratio", "sla_skip", "out_dir", "wandb_run_name", "init_from", "eval_only"}


def read_run(path: str) -> dict:
    log = Path(path) / "log.jsonl" if Path(path).is_dir() else Path(path)
    if not log.is_file():
        raise SystemExit(f"error: no training log at {log}: pass a train.py out_dir or its log.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    # one config record per invocation: the first is the training run's, later ones resumes or eval-only passes
    configs = [r["config"] for r in records if "config" in r]
    if not configs:
        raise SystemExit(f"error: {log} has no config record; was it written by train.py?")
    evals = [r for r in records if any(key.startswith("val/") for key in r)]
    # an eval-only pass on another corpus logs under its own prefix (e.g. "owt/loss@4096")
    final = {}
    for record in records:
        final.update(
            {k: v for k, v in record.items() if "/loss@" in k and "/pos" not in k and not k.startswith("train/")}
        )
    return {"name": log.parent.name if log.name == "log.jsonl" else log.stem, "config": configs[0], "evals": evals,
            "final": final}  # fmt: skip


def pair_runs(runs: list[dict]) -> list[tuple[dict | None, dict | None]]:
    """(plain, sla) pairs of runs whose configs match apart from the SLA settings."""
    groups: dict[str, dict] = defaultdict(dict)
    for run in runs:
        key = json.dumps({k: v for k, v in sorted(run["config"].items()) if k not in UNPAIRED_KEYS})
        variant = "sla" if run["config"].get("sla") else "plain"
        if variant in groups[key]:
            raise SystemExit(f"error: runs {groups[key][variant]['name']} and {run['name']} both are {variant}")
        groups[key][variant] = run
    pairs = [(group.get("plain"), group.get("sla")) for group in groups.values()]
    return sorted(pairs, key=lambda p: tuple((p[0] or p[1])["config"].get(k, 0) for k in ("block_size", "seed")))


def markdown_table(pairs) -> str:
    lines = [
        "| train context | seed | evaluated on | plain | SLA | SLA − plain |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for plain, sla in pairs:
        config = (plain or sla)["config"]
        metrics = sorted(
            set((plain or {}).get("final", {})) | set((sla or {}).get("final", {})),
            key=lambda m: (m.split("/")[0] != "val", m.split("/")[0], int(m.rsplit("@", 1)[1])),
        )
        for metric in metrics:
            a = (plain or {}).get("final", {}).get(metric)
            b = (sla or {}).get("final", {}).get(metric)
            delta = f"{b - a:+.4f}" if a is not None and b is not None else "–"
            corpus, context = metric.split("/")[0], metric.rsplit("@", 1)[1]
            lines.append(
                f"| {config['block_size']} | {config.get('seed', '')} | {corpus} @ {context} | "
                f"{'–' if a is None else f'{a:.4f}'} | {'–' if b is None else f'{b:.4f}'} | {delta} |"
            )
    return "\n".join(lines)


def plot(pairs, png: str):
    """Per training context: both curves (top; the first evaluation, at ~10.8 nats, is left out so the
    differences show) and SLA − plain at each evaluation (bottom; below zero means SLA is better)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    contexts = sorted({(p or s)["config"]["block_size"] for p, s in pairs})
    fig, axes = plt.subplots(2, len(contexts), figsize=(5 * len(contexts), 7), squeeze=False, sharex="col")
    for column, context in enumerate(contexts):
        metric, curves, deltas = f"val/loss@{context}", axes[0][column], axes[1][column]
        for plain, sla in pairs:
            seed = (plain or sla)["config"].get("seed", "")
            if (plain or sla)["config"]["block_size"] != context:
                continue
            points = {}
            for run, style, label in ((plain, "-", "plain"), (sla, "--", "SLA")):
                if run is not None:
                    points[label] = {r["tokens"] / 1e6: r[metric] for r in run["evals"] if metric in r and r["iter"]}
                    curves.plot(
                        *zip(*points[label].items(), strict=True), style, marker=".", label=f"{label}, seed {seed}"
                    )
            if len(points) == 2:
                shared = sorted(points["plain"].keys() & points["SLA"].keys())
                deltas.plot(shared, [points["SLA"][t] - points["plain"][t] for t in shared], marker="o",
                            label=f"seed {seed}")  # fmt: skip
        curves.set_title(f"trained and evaluated at {context} tokens")
        curves.set_ylabel("validation loss (nats/token)")
        deltas.axhline(0, color="gray", linewidth=0.8)
        deltas.set_ylabel("SLA − plain (nats/token)")
        deltas.set_xlabel("training tokens (M)")
        for ax in (curves, deltas):
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="train.py out_dirs or log .jsonl files")
    parser.add_argument("--png", help="write the loss-vs-tokens plot here (needs matplotlib)")
    parser.add_argument("--table", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    pairs = pair_runs([read_run(path) for path in args.runs])
    table = markdown_table(pairs)
    print(table)
    if args.table:
        Path(args.table).write_text(table + "\n")
    if args.png:
        plot(pairs, args.png)
    return table


if __name__ == "__main__":
    main()
