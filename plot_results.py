"""
Plain vs SLA from training logs: a markdown table of final validation losses and a plot of validation loss
against tokens seen.

    python plot_results.py RUN [RUN ...] [--png val_loss.png] [--table table.md]
    python plot_results.py --ablation results/sla-ablation-16k [--png ablation.png] [--table table.md]

RUN is a train.py out_dir (its log.jsonl is read) or a log .jsonl file itself. Runs are paired by everything in
their config except the SLA settings, out_dir and wandb names, so a pair differs in SLA alone.

--ablation reads a folder of <arm>-seed<N>.jsonl logs (arm: plain, or an SLA setting such as sla-skip3) and
compares every SLA arm with plain over seeds: the final loss at the longest evaluated length, overall and by
position in the window, as mean ± standard deviation over seeds, and the SLA − plain difference paired by seed,
also at every evaluation during training (does SLA's effect grow, shrink or change sign as training goes on?).

    python plot_results.py --gap results/sla-ablation-16k results/sla-ablation-medium-8k [--png gap.png]

--gap puts that gap against training tokens for several ablations side by side.
"""

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

UNPAIRED_KEYS = {"sla", "sla_head_ratio", "sla_skip", "out_dir", "wandb_run_name", "init_from", "eval_only"}
# keys that train.py's config gained later, with the value that logs from before them ran with
ADDED_KEYS = {"attention": "sdpa"}


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
    model_args = next((r["model_args"] for r in records if "model_args" in r), None)
    gpus = sorted({r["provenance"]["device"] for r in records if r.get("provenance", {}).get("device")})
    return {"name": log.parent.name if log.name == "log.jsonl" else log.stem, "config": configs[0], "evals": evals,
            "final": final, "model_args": model_args, "gpus": gpus}  # fmt: skip


def pair_runs(runs: list[dict]) -> list[tuple[dict | None, dict | None]]:
    """(plain, sla) pairs of runs whose configs match apart from the SLA settings."""
    groups: dict[str, dict] = defaultdict(dict)
    for run in runs:
        config = {**ADDED_KEYS, **run["config"]}
        key = json.dumps({k: v for k, v in sorted(config.items()) if k not in UNPAIRED_KEYS})
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


def save_figure(fig, png: str):
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


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
    save_figure(fig, png)


# ---------------------------------------------------------------------------- the ablation over arms and seeds

ABLATION_SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "max_iters")  # what every run of an ablation shares
ABLATION_LOG = re.compile(r"(?P<arm>plain|sla-[a-z0-9.-]+?)-seed(?P<seed>\d+)\.jsonl")
# two-sided 95% critical values of Student's t by degrees of freedom (n - 1 paired seeds)
T_CRITICAL_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def read_ablation(folder: str, need_plain: bool = True) -> dict[str, dict[int, dict]]:
    """{arm: {seed: run}} from a folder of <arm>-seed<N>.jsonl logs."""
    arms: dict[str, dict[int, dict]] = defaultdict(dict)
    for log in sorted(Path(folder).glob("*.jsonl")):
        match = ABLATION_LOG.fullmatch(log.name)
        if match is None:
            raise SystemExit(f"error: {log} is not named <arm>-seed<N>.jsonl (arm: plain or sla-...)")
        arms[match["arm"]][int(match["seed"])] = read_run(str(log))
    # run names repeat across ablations (sla-skip9-seed3 is in both): a log of another one must stop, not mix in
    shapes = {run["name"]: {key: run["config"].get(key) for key in ABLATION_SHAPE}
              for by_seed in arms.values() for run in by_seed.values()}  # fmt: skip
    first, first_shape = next(iter(shapes.items()), (None, None))
    for name, shape in shapes.items():
        if shape != first_shape:
            raise SystemExit(f"error: {folder}: {name} trained {shape}, {first} {first_shape}; one folder (and one "
                             f"LOG_DEST) holds one ablation's logs")  # fmt: skip
    if need_plain and "plain" not in arms:
        raise SystemExit(f"error: {folder} holds no plain-seed<N>.jsonl: the SLA arms are compared with plain")
    return dict(arms)


def seed_gpus(arms: dict) -> list[tuple[int, str]]:
    """(seed, GPU model) for every GPU model that a seed's runs ran on, from the logs' provenance lines."""
    return sorted({(seed, gpu) for runs in arms.values() for seed, run in runs.items() for gpu in run["gpus"]})


def final_metrics(run: dict, length: int) -> dict[str, float]:
    """The last evaluation's loss at `length` ("all") and by position bucket ("pos<lo>-<hi>")."""
    prefix = f"val/loss@{length}"
    last = [record for record in run["evals"] if prefix in record][-1]
    metrics = {"all": last[prefix]}
    metrics.update({key[len(prefix) + 1 :]: value for key, value in last.items() if key.startswith(prefix + "/pos")})
    return metrics


def seeds_label(seeds: list[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of {len(seeds)} seeds"


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def told_apart(differences: list[float]) -> str:
    """Is the mean paired difference told apart from seed noise? A two-sided paired t-test at 5%: the mean must
    exceed t(0.975, n-1) standard errors of the differences between seeds. The verdict quotes t and that bound."""
    if len(differences) < 2:
        return "needs 2 seeds"
    mean, sd = mean_sd(differences)
    critical = T_CRITICAL_95.get(len(differences) - 1, 1.96)
    if sd == 0:
        return "yes, SLA lower (no spread)" if mean < 0 else "yes, SLA higher (no spread)"
    t = mean / (sd / math.sqrt(len(differences)))
    verdict = "no" if abs(t) <= critical else "yes, SLA lower" if mean < 0 else "yes, SLA higher"
    return f"{verdict} (t = {t:+.2f}, bound ±{critical:.2f})"


def ablation_summary(arms: dict, length: int) -> dict:
    """Per arm: seeds, final metrics per seed, and (SLA arms) the SLA − plain differences of seeds both have."""
    summary = {}
    for arm, runs in sorted(arms.items(), key=lambda item: (item[0] != "plain", item[0])):
        finals = {seed: final_metrics(run, length) for seed, run in sorted(runs.items())}
        entry = {"seeds": sorted(finals), "final": finals}
        if arm != "plain":
            paired = sorted(set(finals) & set(arms["plain"]))
            plain = {seed: final_metrics(arms["plain"][seed], length) for seed in paired}
            entry["differences"] = {
                seed: {key: finals[seed][key] - plain[seed][key] for key in finals[seed] if key in plain[seed]}
                for seed in paired
            }
        summary[arm] = entry
    return summary


def best_sla_arm(summary: dict, among: list[str] | None = None) -> str:
    """
    The SLA arm (of `among`, default all) with the lowest mean final loss over the seeds that each of them has:
    seeds differ in how hard they are (plain's differ by 0.04), so an arm's extra seeds must not move the ranking.
    """
    sla_arms = {arm: entry for arm, entry in summary.items() if arm != "plain" and (among is None or arm in among)}
    if among is not None and len(sla_arms) < len(set(among)):
        raise SystemExit(f"error: no log yet of {sorted(set(among) - set(sla_arms))}")
    if not sla_arms:
        raise SystemExit("error: no SLA arm has a log yet")
    common_seeds = set.intersection(*(set(entry["final"]) for entry in sla_arms.values()))
    if not common_seeds:
        raise SystemExit(f"error: the SLA arms {sorted(sla_arms)} share no seed: no fair ranking yet")
    return min(sla_arms, key=lambda arm: statistics.mean(sla_arms[arm]["final"][seed]["all"] for seed in common_seeds))


def _bucket_order(key: str) -> tuple[int, int]:
    return (-1, 0) if key == "all" else tuple(int(n) for n in key.removeprefix("pos").split("-"))  # type: ignore[return-value]


def _pm(values: list[float], signed: bool = False) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:{'+' if signed else ''}.4f}" + ("" if sd is None else f" ± {sd:.4f}")


def ablation_table(summary: dict, length: int) -> str:
    lines = [
        f"Final val/loss@{length}: mean ± standard deviation over seeds; SLA − plain paired by seed. Told apart:"
        " a two-sided paired t-test at 5% over the seeds.",
        "",
        f"| arm | seeds | val/loss@{length} | SLA − plain | per seed | told apart from seed noise |",
        "|---|---|---:|---:|---|---|",
    ]
    for arm, entry in summary.items():
        finals = [entry["final"][seed]["all"] for seed in entry["seeds"]]
        row = f"| {arm} | {', '.join(map(str, entry['seeds']))} | {_pm(finals)} |"
        if arm == "plain":
            lines.append(row + " | | |")
            continue
        differences = {seed: d["all"] for seed, d in entry["differences"].items()}
        per_seed = ", ".join(f"{d:+.4f}" for d in differences.values())
        lines.append(
            f"{row} {_pm(list(differences.values()), signed=True) if differences else '–'} | {per_seed} | "
            f"{told_apart(list(differences.values()))} |"
        )
    buckets = sorted({key for e in summary.values() for f in e["final"].values() for key in f}, key=_bucket_order)
    buckets = [key for key in buckets if key != "all"]
    if buckets:
        lines += [
            "",
            f"By position in the {length}-token window: plain's loss, and each SLA arm's SLA − plain (paired).",
            "",
            "| arm | " + " | ".join(f"positions {key.removeprefix('pos')}" for key in buckets) + " |",
            "|---|" + "---:|" * len(buckets),
        ]
        for arm, entry in summary.items():
            cells = []
            for key in buckets:
                if arm == "plain":
                    values = [f[key] for f in entry["final"].values() if key in f]
                else:
                    values = [d[key] for d in entry["differences"].values() if key in d]
                cells.append(_pm(values, signed=arm != "plain") if values else "–")
            lines.append(f"| {arm}{'' if arm == 'plain' else ' − plain'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_against_plain(model_args: dict) -> tuple[int, float, float]:
    """
    Skip heads per SLA layer, and the KV cache and training FLOPs per token over those of the same model without SLA.
    SLA layers neither cache nor compute (c_attn leaves out their rows) the K/V of skip heads that no later layer
    reads; a lower skip-head ratio saves less of both.
    """
    import dataclasses

    import torch

    from model import GPT, GPTConfig

    known = {field.name for field in dataclasses.fields(GPTConfig)}
    sla = GPTConfig(**{key: value for key, value in model_args.items() if key in known})
    plain = dataclasses.replace(sla, sla=False)
    kv = sla.kv_cache_bytes_per_token(torch.bfloat16) / plain.kv_cache_bytes_per_token(torch.bfloat16)
    with torch.device("meta"):  # the parameter count without allocating the weights
        flops = GPT(plain).flops_per_token()
    head_dim = sla.n_embd // sla.n_head
    unread_kv_rows = sum(2 * sla.first_cached_head(layer) * head_dim for layer in range(sla.n_layer))
    return sla.n_skip_heads, kv, (flops - 6 * unread_kv_rows * sla.n_embd) / flops


def cost_table(arms: dict) -> str:
    """Per SLA arm: what it saves per token against plain (from its first seed's model configuration)."""
    lines = [
        "Cost per token against plain: KV cache while decoding, training FLOPs (6 per parameter plus attention).",
        "",
        "| arm | skip heads | KV cache | training FLOPs |",
        "|---|---:|---:|---:|",
    ]
    for arm in sorted(a for a in arms if a != "plain"):
        model_args = arms[arm][min(arms[arm])]["model_args"]
        if model_args is None:
            lines.append(f"| {arm} | – | – | – |")
            continue
        skip_heads, kv, flops = cost_against_plain(model_args)
        lines.append(f"| {arm} | {skip_heads} of {model_args['n_head']} | {kv:.4f}× | {flops:.4f}× |")
    return "\n".join(lines)


def paired_gaps(arms: dict, arm: str, metric: str) -> dict[int, dict[int, float]]:
    """{seed: {training tokens: SLA − plain}} at every evaluation (after the first) that both runs of a seed logged."""
    curve = lambda run: {r["tokens"]: r[metric] for r in run["evals"] if metric in r and r["iter"]}  # noqa: E731
    gaps = {}
    for seed in sorted(set(arms[arm]) & set(arms["plain"])):
        sla, plain = curve(arms[arm][seed]), curve(arms["plain"][seed])
        gaps[seed] = {tokens: sla[tokens] - plain[tokens] for tokens in sorted(sla.keys() & plain.keys())}
    return gaps


def gap_table(arms: dict, length: int) -> str:
    """SLA − plain at `length` at every evaluation: mean ± sd over the seeds that reached it, per SLA arm."""
    metric = f"val/loss@{length}"
    sla_arms = sorted(arm for arm in arms if arm != "plain")
    gaps = {arm: paired_gaps(arms, arm, metric) for arm in sla_arms}
    tokens = sorted({t for arm in sla_arms for g in gaps[arm].values() for t in g})
    if not tokens:
        return f"SLA − plain at every evaluation ({metric}): no SLA arm paired with plain yet."
    lines = [
        f"SLA − plain, {metric}, at every evaluation during training: mean ± sd over seeds (paired by seed; the last"
        " evaluation is the final one, on more validation tokens).",
        "",
        "| arm | seeds | " + " | ".join(f"{t / 1e6:.1f}M tokens" for t in tokens) + " |",
        "|---|---|" + "---:|" * len(tokens),
    ]
    for arm in sla_arms:
        cells = [[g[t] for g in gaps[arm].values() if t in g] for t in tokens]
        lines.append(
            f"| {arm} | {', '.join(map(str, gaps[arm]))} | "
            + " | ".join(_pm(values, signed=True) if values else "–" for values in cells)
            + " |"
        )
    return "\n".join(lines)


def plot_gaps(folders: list[str], png: str):
    """One panel per ablation folder: SLA − plain at its longest length against training tokens, the mean over
    seeds (line) and ± one sd (band), per SLA arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(folders), figsize=(6.5 * len(folders), 4.8), squeeze=False, sharey=True)
    for ax, folder in zip(axes[0], folders, strict=True):
        arms = read_ablation(folder)
        length = longest_length(arms)
        for arm in sorted(a for a in arms if a != "plain"):
            gaps = paired_gaps(arms, arm, f"val/loss@{length}")
            tokens = sorted(set.intersection(*(set(g) for g in gaps.values()))) if gaps else []
            if not tokens:
                continue
            means = [statistics.mean(g[t] for g in gaps.values()) for t in tokens]
            spreads = [statistics.stdev(g[t] for g in gaps.values()) if len(gaps) > 1 else 0.0 for t in tokens]
            millions = [t / 1e6 for t in tokens]
            line = ax.plot(millions, means, marker="o", label=f"{arm} ({len(gaps)} seeds)")[0]
            low = [mean - spread for mean, spread in zip(means, spreads, strict=True)]
            high = [mean + spread for mean, spread in zip(means, spreads, strict=True)]
            ax.fill_between(millions, low, high, color=line.get_color(), alpha=0.15)
        if not ax.lines:
            ax.text(0.5, 0.5, "no SLA arm paired with plain yet", ha="center", transform=ax.transAxes)
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_title(f"{Path(folder).name}: val/loss@{length}")
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("SLA − plain (nats/token; below 0: SLA better)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    save_figure(fig, png)


def longest_length(arms: dict) -> int:
    """The longest context length that plain's first seed was evaluated at."""
    return max(
        int(key.rsplit("@", 1)[1]) for key in arms["plain"][min(arms["plain"])]["final"] if key.startswith("val/")
    )


def plot_ablation(arms: dict, summary: dict, length: int, png: str):
    """Left: SLA − plain at `length` against training tokens, every seed (thin) and the mean (thick), per arm.
    Right: the final SLA − plain by position bucket, mean and spread over seeds, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = f"val/loss@{length}"
    fig, (over_tokens, by_position) = plt.subplots(1, 2, figsize=(13, 5))
    curve = lambda run: {r["tokens"] / 1e6: r[metric] for r in run["evals"] if metric in r and r["iter"]}  # noqa: E731
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sla_arms = [arm for arm in summary if arm != "plain"]
    for color, arm in zip(colors, sla_arms, strict=False):
        seeds = sorted(summary[arm]["differences"])
        gaps = []
        for seed in seeds:
            sla, plain = curve(arms[arm][seed]), curve(arms["plain"][seed])
            tokens = sorted(sla.keys() & plain.keys())
            gaps.append({t: sla[t] - plain[t] for t in tokens})
            over_tokens.plot(tokens, [gaps[-1][t] for t in tokens], color=color, alpha=0.35, linewidth=1)
        shared = sorted(set.intersection(*(set(g) for g in gaps))) if gaps else []
        if shared:
            over_tokens.plot(shared, [statistics.mean(g[t] for g in gaps) for t in shared], color=color,
                             linewidth=2.5, marker="o", label=f"{arm} ({seeds_label(seeds)})")  # fmt: skip
        buckets = sorted({k for d in summary[arm]["differences"].values() for k in d if k != "all"}, key=_bucket_order)
        if buckets:
            values = [[d[k] for d in summary[arm]["differences"].values() if k in d] for k in buckets]
            means = [statistics.mean(v) for v in values]
            spreads = [statistics.stdev(v) if len(v) > 1 else 0 for v in values]
            offset = (sla_arms.index(arm) - (len(sla_arms) - 1) / 2) * 0.15
            by_position.errorbar([i + offset for i in range(len(buckets))], means, yerr=spreads, color=color,
                                 marker="o", capsize=3, linestyle="none", label=arm)  # fmt: skip
            by_position.set_xticks(range(len(buckets)), [k.removeprefix("pos") for k in buckets])
    over_tokens.set_title(f"SLA − plain, {metric}, over training (thin: one seed)")
    over_tokens.set_xlabel("training tokens (M)")
    by_position.set_title("final SLA − plain by position in the window (mean ± sd over seeds)")
    by_position.set_xlabel("positions")
    for ax in (over_tokens, by_position):
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_ylabel("SLA − plain (nats/token; below 0: SLA better)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    save_figure(fig, png)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="train.py out_dirs or log .jsonl files")
    parser.add_argument("--ablation", metavar="DIR", help="a folder of <arm>-seed<N>.jsonl logs: compare the arms")
    parser.add_argument("--length", type=int, help="--ablation: the evaluated length compared (default: longest)")
    parser.add_argument("--best_sla_arm", action="store_true", help="--ablation: print the SLA arm of lowest mean")
    parser.add_argument("--among", nargs="+", metavar="ARM", help="--best_sla_arm: rank only these arms")
    parser.add_argument("--told_apart", metavar="ARM", help="--ablation: print yes or no: is ARM − plain told apart")
    parser.add_argument("--seed_gpus", action="store_true", help="--ablation: print 'seed<TAB>GPU model' lines")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="N",
        help="--ablation: read only these seeds' logs (a decision taken at seed 4 stays when 5 lands)",
    )
    parser.add_argument("--gap", nargs="+", metavar="DIR", help="ablation folders: SLA − plain against tokens")
    parser.add_argument("--png", help="write the plot here (needs matplotlib)")
    parser.add_argument("--table", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.runs, args.ablation, args.gap))) != 1:
        parser.error("give one of RUN ..., --ablation DIR or --gap DIR ...")
    # A flag that the chosen mode does not read would be dropped without a word: refuse it instead.
    ablation_only = {"length": args.length, "best_sla_arm": args.best_sla_arm, "among": args.among,
                     "told_apart": args.told_apart, "seed_gpus": args.seed_gpus, "seeds": args.seeds}  # fmt: skip
    for flag, value in ablation_only.items():
        if value and not args.ablation:
            parser.error(f"--{flag} works with --ablation DIR only; drop it or compare an ablation folder")
    if args.among and not args.best_sla_arm:
        parser.error("--among ranks arms for --best_sla_arm only; add --best_sla_arm or drop --among")
    if args.gap:
        table = "\n\n".join(f"{folder}\n\n" + gap_table(arms, longest_length(arms))
                              for folder, arms in ((folder, read_ablation(folder)) for folder in args.gap))  # fmt: skip
        print(table)
        if args.table:
            Path(args.table).write_text(table + "\n")
        if args.png:
            plot_gaps(args.gap, args.png)
        return table
    if args.ablation and args.seed_gpus:
        lines = "".join(f"{seed}\t{gpu}\n" for seed, gpu in seed_gpus(read_ablation(args.ablation, need_plain=False)))
        print(lines, end="")
        return lines
    if args.ablation:
        arms = read_ablation(args.ablation)
        if args.seeds:
            arms = {arm: {seed: run for seed, run in runs.items() if seed in args.seeds} for arm, runs in arms.items()}
            arms = {arm: runs for arm, runs in arms.items() if runs}
        length = args.length or longest_length(arms)
        summary = ablation_summary(arms, length)
        if args.best_sla_arm:
            best = best_sla_arm(summary, args.among)
            print(best)
            return best
        if args.told_apart:
            if args.told_apart not in summary or args.told_apart == "plain":
                raise SystemExit(f"error: --told_apart {args.told_apart}: no SLA arm of that name in {args.ablation}")
            differences = [d["all"] for d in summary[args.told_apart]["differences"].values()]
            verdict = "yes" if told_apart(differences).startswith("yes") else "no"
            print(verdict)
            return verdict
        table = "\n\n".join((ablation_table(summary, length), cost_table(arms), gap_table(arms, length)))
        print(table)
        if args.table:
            Path(args.table).write_text(table + "\n")
        if args.png:
            plot_ablation(arms, summary, length, args.png)
        return table
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
