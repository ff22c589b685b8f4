"""
Where does an SLA training step spend its time against plain's, with FlashAttention-4? Builds bench.py's plain and
SLA (skip 9) models at one shape, times 60 pairs of single synchronized steps in alternating order (so that the
GPU's clock drift favours neither), then profiles 8 more pairs and sums each step's kernel time by kind (FA4
forward/backward, matmuls, Triton, copies) and by kernel. Needs a CUDA GPU and the flash-attn-4 package.

    python tools/profile_sla_vs_plain.py small:16384:1 [default|reduce-overhead] [--out DIR]

Prints the tables; writes DIR/trace2-<shape>-<mode>.json (the per-step medians). An earlier version's output, with
SLA's two FA4 head groups on one stream: results/profile/h200/interleaved-trace2-*.
"""

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: bench.py and the modules it imports
from bench import BenchConfig, build_ours, parse_shape
from configurator import autocast_context


def category(name: str) -> str:
    if "flash_fwd" in name:
        return "fa4_fwd"
    if "FlashAttentionBackwardSm90" in name:
        return "fa4_bwd"
    if "flash_bwd" in name:
        return "fa4_bwd_pre_post"
    if "nvjet" in name or "gemm" in name.lower() or "cutlass" in name.lower():
        return "matmul"
    if name.startswith("triton"):
        return "triton"
    if "memset" in name.lower():
        return "memset"
    if "Memcpy" in name:
        return "memcpy"
    return "other"


def step_summary(kernels: list[tuple[float, float, str]]) -> dict:
    """Span, busy time (overlaps counted once), kernel count and time by category and by name, in us."""
    kernels = sorted(kernels)
    busy, last = 0.0, kernels[0][0]
    for start, end, _ in kernels:
        busy += max(0.0, end - max(start, last))
        last = max(last, end)
    cats, names = {}, {}
    for start, end, name in kernels:
        cats[category(name)] = cats.get(category(name), 0) + end - start
        key = re.sub(r"_\d+$", "", name[:100])
        names[key] = names.get(key, 0) + end - start
    return {"span": kernels[-1][1] - kernels[0][0], "busy": busy, "n": len(kernels), "cats": cats, "names": names}


def median_of(rows: list[dict], field: str) -> dict:
    keys = set().union(*(row[field] for row in rows))
    return {key: statistics.median(row[field].get(key, 0) for row in rows) for key in keys}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help="bench.py's model:block_size:batch_size, e.g. small:16384:1")
    parser.add_argument("mode", nargs="?", default="default", help="torch.compile mode (default, reduce-overhead)")
    parser.add_argument("--out", default=".", help="folder for the JSON summary")
    args = parser.parse_args(argv)

    config = BenchConfig(
        shapes=(args.shape,), compile=True, attention="fa4", compile_mode=args.mode, decode_tokens=0,
        compile_optimizer=args.mode != "default",
    )  # fmt: skip
    shape = parse_shape(args.shape)
    device = "cuda:0"
    torch.cuda.set_device(device)
    torch.set_float32_matmul_precision("high")
    autocast = autocast_context(device, "bfloat16")
    steps = {}
    for name, skip in (("plain", None), ("sla", 9)):
        _, step = build_ours(config, shape, skip, device, autocast)
        for _ in range(4):
            step()
        torch.cuda.synchronize()
        steps[name] = step

    # alternating single steps, each synchronized and timed by CUDA events
    times = {"plain": [], "sla": []}
    for i in range(60):
        for name in ("plain", "sla") if i % 2 == 0 else ("sla", "plain"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            steps[name]()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    plain_ms, sla_ms = statistics.median(times["plain"]), statistics.median(times["sla"])
    print(f"{args.shape} {args.mode}: alternating single steps (synced), median plain {plain_ms:.3f} "
          f"sla {sla_ms:.3f} ratio {sla_ms / plain_ms:.4f}")  # fmt: skip
    print("  plain first/last 10:", [round(x, 2) for x in times["plain"][:10]],
          [round(x, 2) for x in times["plain"][-10:]])  # fmt: skip

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(8):
            for name in ("plain", "sla") if i % 2 == 0 else ("sla", "plain"):
                with torch.profiler.record_function(f"STEP-{name}-{i}"):
                    steps[name]()
                    torch.cuda.synchronize()
    events = prof.events()
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    ranges = [(e.time_range.start, e.time_range.end, e.name) for e in events
              if e.name.startswith("STEP-") and e.device_type == cpu]  # fmt: skip
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == cuda]
    per = {"plain": [], "sla": []}
    for start, end, label in ranges:
        in_step = [k for k in kernels if start <= k[0] <= end]
        if in_step:
            per[label.split("-")[1]].append(step_summary(in_step))
    summary = {}
    for model, rows in per.items():
        summary[model] = {
            "span": statistics.median(r["span"] for r in rows), "busy": statistics.median(r["busy"] for r in rows),
            "n": rows[0]["n"], "cats": median_of(rows, "cats"), "names": median_of(rows, "names"),
        }  # fmt: skip
        print(f"  {model}: steps {len(rows)}, span {summary[model]['span'] / 1000:.3f} ms, "
              f"busy {summary[model]['busy'] / 1000:.3f} ms, kernels {summary[model]['n']}")  # fmt: skip
    plain, sla = summary["plain"], summary["sla"]
    for cat in sorted(set(plain["cats"]) | set(sla["cats"])):
        p, s = plain["cats"].get(cat, 0), sla["cats"].get(cat, 0)
        print(f"    {cat:18} plain {p:9.1f} us  sla {s:9.1f} us  diff {s - p:+8.1f}")
    names = set(plain["names"]) | set(sla["names"])
    diff = sorted((sla["names"].get(n, 0) - plain["names"].get(n, 0), n) for n in names)
    print("  per kernel name, sla - plain (us per step):")
    for d, n in diff[:12] + diff[-20:]:
        print(f"    {d:+9.1f}  plain {plain['names'].get(n, 0):9.1f} sla {sla['names'].get(n, 0):9.1f}  {n}")
    out = Path(args.out) / f"trace2-{args.shape.replace(':', '-')}-{args.mode}.json"
    out.write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
