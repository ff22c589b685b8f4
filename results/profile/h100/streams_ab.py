"""Ad-hoc A/B: SLA's FA4 head groups on one stream vs two (fa4.TWO_STREAMS), plain alongside; steps interleaved
one by one in rotating order, synchronized, CUDA events; then a short profile of FA4 kernels and their streams.

Ran as `python streams_ab.py SECONDS small:4096:4@default small:16384:1@default small:16384:1@reduce-overhead` from
the repo root, on the experiment's working tree: there fa4.py had a module switch TWO_STREAMS (True: the second head
group on a side stream, as fa4._side_by_side now always does on a GPU; False: both on the current stream). The switch
is gone, so this script no longer runs as is. Output: ../../bench-logs-h100/streams-ab.log and .json."""
import json, os, sys, statistics, time, torch
sys.path.insert(0, os.getcwd())
import bench, fa4
from bench import BenchConfig, build_ours, parse_shape

out = os.environ["OUT"]
deadline = time.time() + float(sys.argv[1])
runs = [a.split("@") for a in sys.argv[2:]]  # shape@mode
torch.cuda.set_device(0)
torch.set_float32_matmul_precision("high")
autocast = bench.autocast_context("cuda:0", "bfloat16")
results = []
for shape_text, mode in runs:
    if time.time() > deadline - 90:
        print("out of time before", shape_text, mode, flush=True); break
    config = BenchConfig(shapes=(shape_text,), compile=True, attention="fa4", compile_mode=mode, decode_tokens=0,
                         compile_optimizer=mode != "default")
    shape = parse_shape(shape_text)
    steps, losses = {}, {}
    for name, skip, two in (("plain", None, True), ("sla_1stream", 9, False), ("sla_2streams", 9, True)):
        fa4.TWO_STREAMS = two
        t0 = time.time()
        model, step = build_ours(config, shape, skip, "cuda:0", autocast)
        for _ in range(5):
            loss = step()
        torch.cuda.synchronize()
        losses[name] = float(loss) if loss is not None else None
        steps[name] = (step, two)
        print(f"{shape_text} {mode} {name}: built+warm {time.time()-t0:.1f}s loss after 5 steps {losses[name]}", flush=True)
    names = list(steps)
    times = {n: [] for n in names}
    i = 0
    while i < 90 and time.time() < deadline - 30:
        order = names[i % 3:] + names[:i % 3]
        if i % 2: order = order[::-1]
        for name in order:
            step, two = steps[name]
            fa4.TWO_STREAMS = two
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); step(); b.record(); torch.cuda.synchronize()
            times[name].append(a.elapsed_time(b))
        i += 1
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"{shape_text} {mode}: {i} rotations, median ms " + ", ".join(f"{n} {m:.3f}" for n, m in med.items())
          + f"; sla_1stream/plain {med['sla_1stream']/med['plain']:.4f}, sla_2streams/plain {med['sla_2streams']/med['plain']:.4f}"
          + f", 2streams/1stream {med['sla_2streams']/med['sla_1stream']:.4f}", flush=True)
    # which streams the FA4 kernels ran on, and their time per step
    prof_info = {}
    if time.time() < deadline - 20:
        for name in ("sla_1stream", "sla_2streams"):
            step, two = steps[name]
            fa4.TWO_STREAMS = two
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "flash" in e.name]
            streams = sorted({getattr(e, "device_resource_id", None) for e in ev}, key=str)
            prof_info[name] = {"fa4_kernels": len(ev), "streams": [str(s) for s in streams],
                               "fa4_us_per_step": sum(e.time_range.elapsed_us() for e in ev) / 3}
            print(f"  {name}: FA4 kernels {len(ev)} on streams {streams}, FA4 kernel time {prof_info[name]['fa4_us_per_step']:.0f} us/step", flush=True)
    results.append({"shape": shape_text, "mode": mode, "rotations": i, "median_ms": med, "times": times,
                    "loss_after_warmup": losses, "profile": prof_info, "gpu": torch.cuda.get_device_name()})
    json.dump(results, open(f"{out}/streams_ab.json", "w"))
    del steps
    torch.cuda.empty_cache()
