"""
A/B of SLA's two FA4 head groups on one CUDA stream against two (fa4._side_by_side, what the code does), with plain
beside them: bench.py's models at each shape, single synchronized steps in a rotating order (90 rotations or until
the time is up), CUDA events; then a short profile of which streams SLA's FA4 kernels ran on. Needs a CUDA GPU and
the flash-attn-4 package.

    python tools/fa4_streams_ab.py SECONDS small:4096:4@default small:16384:1@default \
        small:16384:1@reduce-overhead [--out DIR]

Each argument is a bench.py shape and a torch.compile mode. Prints the medians and ratios; writes DIR/streams_ab.json.
Its output on an H100: results/speed/streams-ab.log and .json. The one-stream arm runs the two head groups' kernels
one after the other, as fa4.py did before the side stream.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: bench.py and the modules it imports
import fa4
from bench import BenchConfig, build_ours, parse_shape
from configurator import autocast_context

TWO_STREAMS = fa4._side_by_side


def one_stream(kernel_calls: list, device: torch.device):
    for call in kernel_calls:
        call()


def use_streams(two: bool):
    """fa4's custom operators look _side_by_side up at each call; CUDA graphs keep what ran at their capture."""
    fa4._side_by_side = TWO_STREAMS if two else one_stream


def measure(shape_text: str, mode: str, deadline: float) -> dict:
    config = BenchConfig(
        shapes=(shape_text,), compile=True, attention="fa4", compile_mode=mode, decode_tokens=0,
        compile_optimizer=mode != "default",
    )  # fmt: skip
    shape = parse_shape(shape_text)
    autocast = autocast_context("cuda:0", "bfloat16")
    steps, losses = {}, {}
    for name, skip, two in (("plain", None, True), ("sla_1stream", 9, False), ("sla_2streams", 9, True)):
        use_streams(two)
        started = time.time()
        _, step = build_ours(config, shape, skip, "cuda:0", autocast)
        for _ in range(5):
            loss = step()
        torch.cuda.synchronize()
        losses[name] = float(loss) if loss is not None else None
        steps[name] = (step, two)
        print(f"{shape_text} {mode} {name}: built+warm {time.time() - started:.1f}s "
              f"loss after 5 steps {losses[name]}", flush=True)  # fmt: skip
    names = list(steps)
    times = {n: [] for n in names}
    rotation = 0
    while rotation < 90 and time.time() < deadline - 30:
        order = names[rotation % 3 :] + names[: rotation % 3]
        if rotation % 2:
            order = order[::-1]
        for name in order:
            step, two = steps[name]
            use_streams(two)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
        rotation += 1
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"{shape_text} {mode}: {rotation} rotations, median ms " + ", ".join(f"{n} {m:.3f}" for n, m in med.items())
          + f"; sla_1stream/plain {med['sla_1stream'] / med['plain']:.4f}, "
          f"sla_2streams/plain {med['sla_2streams'] / med['plain']:.4f}, "
          f"2streams/1stream {med['sla_2streams'] / med['sla_1stream']:.4f}", flush=True)  # fmt: skip
    profile = {}  # which streams the FA4 kernels ran on, and their time per step
    if time.time() < deadline - 20:
        for name in ("sla_1stream", "sla_2streams"):
            step, two = steps[name]
            use_streams(two)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            kernels = [e for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA and "flash" in e.name]  # fmt: skip
            streams = sorted({getattr(e, "device_resource_id", None) for e in kernels}, key=str)
            profile[name] = {
                "fa4_kernels": len(kernels), "streams": [str(s) for s in streams],
                "fa4_us_per_step": sum(e.time_range.elapsed_us() for e in kernels) / 3,
            }  # fmt: skip
            print(f"  {name}: FA4 kernels {len(kernels)} on streams {streams}, "
                  f"FA4 kernel time {profile[name]['fa4_us_per_step']:.0f} us/step", flush=True)  # fmt: skip
    use_streams(True)
    return {"shape": shape_text, "mode": mode, "rotations": rotation, "median_ms": med, "times": times,
            "loss_after_warmup": losses, "profile": profile, "gpu": torch.cuda.get_device_name()}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seconds", type=float, help="time budget: shapes that would not finish in it are left out")
    parser.add_argument("runs", nargs="+", help="shape@mode, e.g. small:16384:1@reduce-overhead")
    parser.add_argument("--out", default=".", help="folder for streams_ab.json")
    args = parser.parse_args(argv)
    deadline = time.time() + args.seconds
    torch.cuda.set_device(0)
    torch.set_float32_matmul_precision("high")
    results = []
    for run in args.runs:
        shape_text, mode = run.split("@")
        if time.time() > deadline - 90:
            print("out of time before", shape_text, mode, flush=True)
            break
        results.append(measure(shape_text, mode, deadline))
        (Path(args.out) / "streams_ab.json").write_text(json.dumps(results))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
