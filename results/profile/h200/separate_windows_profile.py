"""Ad-hoc: where does SLA's step lose time vs plain with FA4 at a shape? Traces + gap analysis + per-op micro timing."""
import json, os, sys, statistics, torch
sys.path.insert(0, os.getcwd())
import bench
from bench import BenchConfig, build_ours, parse_shape

shape_text = sys.argv[1]
mode = sys.argv[2] if len(sys.argv) > 2 else "default"
out = os.environ["OUT"]
config = BenchConfig(shapes=(shape_text,), compile=True, attention="fa4", compile_mode=mode, decode_tokens=0)
shape = parse_shape(shape_text)
device = "cuda:0"
torch.cuda.set_device(device)
torch.set_float32_matmul_precision("high")
autocast = bench.autocast_context(device, "bfloat16")
models = {}
for name, skip in (("plain", None), ("sla", 9)):
    model, step = build_ours(config, shape, skip, device, autocast)
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    models[name] = step

def timed(step, n=10):
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    ev[0].record()
    for i in range(n):
        step(); ev[i + 1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(ev, ev[1:])]

for r in range(3):
    for name, step in models.items():
        print(f"round {r} {name} median ms {statistics.median(timed(step)):.3f}", flush=True)

summary = {}
for name, step in models.items():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    path = f"{out}/trace-{shape_text.replace(':', '-')}-{mode}-{name}.json"
    prof.export_chrome_trace(path)
    os.system(f"gzip -f {path}")
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events)
    busy = 0.0; gaps = []; last_end = kernels[0][0]; last_name = ""
    for s, e, n in kernels:
        if s > last_end:
            gaps.append((s - last_end, last_name[:70], n[:70]))
        busy += max(0.0, e - max(s, last_end)); 
        if e > last_end: last_end, last_name = e, n
    span = kernels[-1][1] - kernels[0][0]
    gaps.sort(reverse=True)
    idle = sum(g[0] for g in gaps)
    print(f"== {name}: span {span/1000:.2f} ms for 3 steps, busy {busy/1000:.2f} ms, idle {idle/1000:.2f} ms, "
          f"kernels {len(kernels)}, gaps>5us {sum(1 for g in gaps if g[0] > 5)}")
    for g in gaps[:25]:
        print(f"   gap {g[0]:8.1f} us after {g[1]}  before {g[2]}")
    by_name = {}
    for s, e, n in kernels:
        by_name[n] = by_name.get(n, 0) + (e - s)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])
    summary[name] = {"span_us": span, "busy_us": busy, "idle_us": idle, "n_kernels": len(kernels),
                     "kernels_us": dict(top), "gaps": gaps[:200]}
json.dump(summary, open(f"{out}/trace-summary-{shape_text.replace(':', '-')}-{mode}.json", "w"))
# per kernel-name difference
p, s_ = summary["plain"]["kernels_us"], summary["sla"]["kernels_us"]
names = set(p) | set(s_)
diff = sorted(((s_.get(n, 0) - p.get(n, 0)), n) for n in names)
print("== kernel time sla - plain (us, 3 steps), largest both ways")
for d, n in diff[:15] + diff[-25:]:
    print(f"   {d:10.1f}  plain {p.get(n,0):10.1f}  sla {s_.get(n,0):10.1f}  {n[:110]}")
