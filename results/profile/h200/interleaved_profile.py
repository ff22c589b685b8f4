"""Ad-hoc: plain vs SLA (FA4), steps interleaved one by one, each profiled step synchronized, kernels per step."""
import json, os, sys, statistics, re, torch
sys.path.insert(0, os.getcwd())
import bench
from bench import BenchConfig, build_ours, parse_shape

shape_text = sys.argv[1]
mode = sys.argv[2] if len(sys.argv) > 2 else "default"
out = os.environ["OUT"]
config = BenchConfig(shapes=(shape_text,), compile=True, attention="fa4", compile_mode=mode, decode_tokens=0,
                     compile_optimizer=mode != "default")
shape = parse_shape(shape_text)
device = "cuda:0"
torch.cuda.set_device(device)
torch.set_float32_matmul_precision("high")
autocast = bench.autocast_context(device, "bfloat16")
steps = {}
for name, skip in (("plain", None), ("sla", 9)):
    model, step = build_ours(config, shape, skip, device, autocast)
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    steps[name] = step

# alternating single steps, CUDA events
times = {"plain": [], "sla": []}
for i in range(60):
    for name in (("plain", "sla") if i % 2 == 0 else ("sla", "plain")):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); steps[name](); b.record(); torch.cuda.synchronize()
        times[name].append(a.elapsed_time(b))
pm, sm = statistics.median(times["plain"]), statistics.median(times["sla"])
print(f"{shape_text} {mode}: alternating single steps (synced), median plain {pm:.3f} sla {sm:.3f} ratio {sm/pm:.4f}")
print("  plain pairs first/last 10:", [round(x, 2) for x in times["plain"][:10]], [round(x, 2) for x in times["plain"][-10:]])

with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for i in range(8):
        for name in (("plain", "sla") if i % 2 == 0 else ("sla", "plain")):
            with torch.profiler.record_function(f"STEP-{name}-{i}"):
                steps[name]()
                torch.cuda.synchronize()
events = prof.events()
ranges = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.name.startswith("STEP-") and e.device_type == torch.autograd.DeviceType.CPU]
kernels = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
def category(n):
    if "flash_fwd" in n: return "fa4_fwd"
    if "FlashAttentionBackwardSm90" in n: return "fa4_bwd"
    if "flash_bwd" in n: return "fa4_bwd_pre_post"
    if "nvjet" in n or "gemm" in n.lower() or "cutlass" in n.lower(): return "matmul"
    if n.startswith("triton"): return "triton"
    if "Memset" in n or "memset" in n.lower(): return "memset"
    if "Memcpy" in n: return "memcpy"
    return "other"
per = {"plain": [], "sla": []}
for s0, e0, rname in ranges:
    model = rname.split("-")[1]
    ks = sorted(k for k in kernels if s0 <= k[0] <= e0)
    if not ks: continue
    span = ks[-1][1] - ks[0][0]
    busy = 0.0; last = ks[0][0]
    for s, e, n in ks:
        busy += max(0.0, e - max(s, last)); last = max(last, e)
    cats = {}; names = {}
    for s, e, n in ks:
        c = category(n); cats[c] = cats.get(c, 0) + e - s
        key = re.sub(r"_\d+$", "", n[:100]); names[key] = names.get(key, 0) + e - s
    per[model].append({"span": span, "busy": busy, "n": len(ks), "cats": cats, "names": names})
summary = {}
for model, rows in per.items():
    summary[model] = {"span": statistics.median(r["span"] for r in rows), "busy": statistics.median(r["busy"] for r in rows),
                      "n": rows[0]["n"], "cats": {c: statistics.median(r["cats"].get(c, 0) for r in rows) for c in set().union(*(r["cats"] for r in rows))},
                      "names": {c: statistics.median(r["names"].get(c, 0) for r in rows) for c in set().union(*(r["names"] for r in rows))}}
    print(f"  {model}: steps {len(rows)}, span {summary[model]['span']/1000:.3f} ms, busy {summary[model]['busy']/1000:.3f} ms, kernels {summary[model]['n']}")
for c in sorted(set(summary["plain"]["cats"]) | set(summary["sla"]["cats"])):
    p, s_ = summary["plain"]["cats"].get(c, 0), summary["sla"]["cats"].get(c, 0)
    print(f"    {c:18} plain {p:9.1f} us  sla {s_:9.1f} us  diff {s_-p:+8.1f}")
names = set(summary["plain"]["names"]) | set(summary["sla"]["names"])
diff = sorted(((summary["sla"]["names"].get(n, 0) - summary["plain"]["names"].get(n, 0)), n) for n in names)
print("  per kernel name, sla - plain (us per step):")
for d, n in diff[:12] + diff[-20:]:
    print(f"    {d:+9.1f}  plain {summary['plain']['names'].get(n,0):9.1f} sla {summary['sla']['names'].get(n,0):9.1f}  {n}")
json.dump(summary, open(f"{out}/trace2-{shape_text.replace(':','-')}-{mode}.json", "w"))
