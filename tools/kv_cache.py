"""
KV-cache bytes per token of GPT-2 small and medium, plain and with SLA, per skip distance and skip-head ratio, as
model.GPTConfig.kv_cache_bytes_per_token computes them (what generation allocates): a Markdown table.

    python tools/kv_cache.py [--dtype bfloat16] > results/decode/kv-cache.md
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root
from model import GPTConfig

SIZES = {"small": {"n_layer": 12, "n_head": 12, "n_embd": 768}, "medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024}}
SKIPS = (1, 3, 9, 15)
RATIOS = (0.25, 0.5, 0.75)


def table(dtype: torch.dtype) -> str:
    lines = [
        f"KV-cache bytes per token of one sequence in {str(dtype).removeprefix('torch.')}, "
        "and the ratio to plain's (model.GPTConfig.kv_cache_bytes_per_token).",
        "",
        "| size | sla_skip | sla_head_ratio | skip heads | bytes per token | × plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for size, shape in SIZES.items():
        plain = GPTConfig(**shape).kv_cache_bytes_per_token(dtype)
        lines.append(f"| {size} | plain | | 0 | {plain:,} | 1 |")
        for skip in SKIPS:
            if skip >= shape["n_layer"]:
                continue
            for ratio in RATIOS:
                config = GPTConfig(**shape, sla=True, sla_skip=skip, sla_head_ratio=ratio)
                sla = config.kv_cache_bytes_per_token(dtype)
                lines.append(
                    f"| {size} | {skip} | {ratio} | {config.n_skip_heads} of {shape['n_head']} | {sla:,} | "
                    f"{sla / plain:.4f} |"
                )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", help="the cache's dtype (generation's autocast dtype)")
    args = parser.parse_args(argv)
    print(table(getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
