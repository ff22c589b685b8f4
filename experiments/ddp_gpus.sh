#!/usr/bin/env bash
# DDP on two GPUs (torchrun, NCCL) against one GPU, with the README's commands.
#
#   bash experiments/ddp_gpus.sh parity    # loss parity, checkpoints (SIGTERM, resume on 2 GPUs and on 1), evaluation
#   bash experiments/ddp_gpus.sh scaling   # tokens/s on 2 GPUs over 2 x tokens/s on 1, small 16K and medium 8K
#   bash experiments/ddp_gpus.sh report    # results/ddp/summary.json and a table, from the logs in results/ddp
#
# Corpus: the Python sources of this Python's site-packages, gpt2 tokens (as in sla_ablation.sh). Logs go to
# $LOG_DEST (default results/ddp); scratch runs to $WORK. Needs 2 GPUs, datasets (prepare) and tiktoken's files.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repo root, from wherever the script is called
# NVLink multicast off: on shared hosts it can take the GPUs out of service (also for processes torchrun starts)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
LOG_DEST=${LOG_DEST:-results/ddp}
WORK=${WORK:-/tmp/ddp}
PYTHON=${PYTHON:-python3}
DATA=${DATA:-$WORK/pysrc}  # prepared here unless it holds a meta.json
EXTRA_ARGS=${EXTRA_ARGS:-}  # appended to every train.py call, e.g. a tiny CPU model to check this script
mkdir -p "$LOG_DEST" "$WORK"

prepare() {
    [ -f "$DATA/meta.json" ] && return
    local site
    site=$($PYTHON -c 'import site; print(site.getsitepackages()[0])')
    $PYTHON prepare_openwebtext.py --files "$site/**/*.py" --encoding_errors replace --val_fraction 0.025 \
        --out_dir "$DATA" --stats_json "$WORK/prepare-pysrc.json"
}

TWO="torchrun --standalone --nproc_per_node=2 train.py"
ONE="$PYTHON train.py"
# GPT-2 small with SLA at 16K, 2 windows (32,768 tokens) per optimizer step: 1 micro-step on each of 2 GPUs, or
# 2 micro-steps on one; 200 steps
PARITY="config/train_gpt2_small_16k.py --sla --data_dir=$DATA --batch_size=1 --gradient_accumulation_steps=2
    --max_iters=200 --warmup_iters=20 --lr_decay_iters=200 --eval_interval=100 --eval_iters=8 --log_interval=1
    $EXTRA_ARGS"

parity() {
    prepare
    rm -rf "$WORK"/{two,stop,stop-1gpu,one-a,one-b,one-seed1338}
    echo "== two GPUs, uninterrupted"
    $TWO $PARITY --out_dir="$WORK/two"
    echo "== two GPUs, SIGTERM to torchrun once iter 60 is logged"
    $TWO $PARITY --out_dir="$WORK/stop" > "$WORK/sigterm.txt" 2>&1 &
    local torchrun_pid=$! pid
    until grep -qs '"iter": 6[0-9], "tokens": [0-9]*, "train/loss"' "$WORK/stop/log.jsonl"; do
        kill -0 $torchrun_pid 2> /dev/null || { cat "$WORK/sigterm.txt"; echo "torchrun ended early"; exit 1; }
        sleep 0.5
    done
    kill -TERM $torchrun_pid
    local status=0
    wait $torchrun_pid || status=$?
    echo "torchrun exit status: $status" >> "$WORK/sigterm.txt"
    tail -n 30 "$WORK/sigterm.txt"
    cp -r "$WORK/stop" "$WORK/stop-1gpu"
    echo "== resume that checkpoint on two GPUs"
    $TWO $PARITY --out_dir="$WORK/stop" --init_from=resume
    echo "== resume it on one GPU (GPU 0), and at once a one-GPU run from scratch (GPU 1)"
    CUDA_VISIBLE_DEVICES=0 $ONE $PARITY --out_dir="$WORK/stop-1gpu" --init_from=resume > "$WORK/stop-1gpu.txt" 2>&1 &
    pid=$!
    CUDA_VISIBLE_DEVICES=1 $ONE $PARITY --out_dir="$WORK/one-a" > "$WORK/one-a.txt" 2>&1
    wait $pid
    echo "== one GPU again (GPU 0: the gap to one-a is nondeterministic kernels alone), and with another seed (GPU 1)"
    CUDA_VISIBLE_DEVICES=0 $ONE $PARITY --out_dir="$WORK/one-b" > "$WORK/one-b.txt" 2>&1 &
    pid=$!
    CUDA_VISIBLE_DEVICES=1 $ONE $PARITY --seed=1338 --out_dir="$WORK/one-seed1338" > "$WORK/one-seed1338.txt" 2>&1
    wait $pid
    echo "== evaluation of the two-GPU run's final checkpoint under DDP and on one GPU"
    $TWO $PARITY --out_dir="$WORK/two" --init_from=resume --eval_only --eval_iters=32 --eval_tag=eval-2gpu
    CUDA_VISIBLE_DEVICES=0 $ONE $PARITY --out_dir="$WORK/two" --init_from=resume --eval_only --eval_iters=32 \
        --eval_tag=eval-1gpu
    for run in two stop stop-1gpu one-a one-b one-seed1338; do cp "$WORK/$run/log.jsonl" "$LOG_DEST/parity-$run.jsonl"; done
    cp "$WORK/sigterm.txt" "$LOG_DEST/parity-sigterm.txt"
}

# Scaling: the README's configs (global batch 0.5M tokens), the same per-GPU micro-batch (4 windows) on 1 and
# 2 GPUs; 2 GPUs run half the micro-steps each. 8 steps; the first 3 (compilation, warm-up) are not counted.
# The two one-GPU baselines run at once, one per GPU: two such runs side by side each ran at the speed of one
# alone (results/ddp/concurrent-1gpu-*.jsonl).
scaling() {
    prepare
    local config pid
    for config in small_16k medium_8k; do
        rm -rf "${WORK:?}/scaling-$config-"{1,2}gpu
    done
    scaling_run small_16k 1 0 &
    pid=$!
    scaling_run medium_8k 1 1
    wait $pid
    scaling_run small_16k 2 0,1
    scaling_run medium_8k 2 0,1
}

scaling_run() {  # config, number of GPUs, CUDA_VISIBLE_DEVICES
    local name="scaling-$1-${2}gpu" launch="$ONE"
    [ "$2" = 2 ] && launch="$TWO"
    echo "== $name"
    CUDA_VISIBLE_DEVICES=$3 $launch "config/train_gpt2_$1.py" --sla --data_dir="$DATA" --out_dir="$WORK/$name" \
        --max_iters=8 --log_interval=1 --eval_iters=1 --eval_interval=1000 --eval_block_sizes=4096 $EXTRA_ARGS \
        > "$WORK/$name.txt" 2>&1 || { cat "$WORK/$name.txt"; return 1; }
    grep "tokens/s" "$WORK/$name.txt" | tail -n 3
    cp "$WORK/$name/log.jsonl" "$LOG_DEST/$name.jsonl"
}

report() {
    $PYTHON - "$LOG_DEST" <<'EOF'
import json, statistics, sys
from pathlib import Path

dest = Path(sys.argv[1])
def lines(name):
    path = dest / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else None
def losses(log, key="train/loss"):
    return {line["iter"]: line[key] for line in log if key in line}
def gaps(a, b, since=0):  # |a - b| at each iteration after `since` that both log
    return [abs(a[it] - b[it]) for it in a if it in b and it > since]
def max_gap(a, b, since=0):
    found = gaps(a, b, since)
    return max(found) if found else None, len(found)
def mean_gap(a, b, since=0):
    found = gaps(a, b, since)
    return statistics.mean(found) if found else None

summary = {}
two, one_a = lines("parity-two"), lines("parity-one-a")
if two and one_a:
    parity = {}
    ref = losses(one_a)
    for name in ("two", "one-b", "one-seed1338"):
        log = lines(f"parity-{name}")
        if log:
            gap, n = max_gap(losses(log), ref)
            parity[f"{name} vs one-a: max train-loss gap"] = gap
            parity[f"{name} vs one-a: mean train-loss gap"] = mean_gap(losses(log), ref)
            parity[f"{name} vs one-a: steps compared"] = n
            for key in sorted({k for line in log for k in line if k.startswith("val/loss@") and "/pos" not in k}):
                parity[f"{name} vs one-a: max {key} gap"] = max_gap(losses(log, key), losses(one_a, key))[0]
    summary["parity"] = parity
    resumed_from = None
    ref2 = losses(two)
    checks = {}
    for name in ("stop", "stop-1gpu"):
        log = lines(f"parity-{name}")
        if log:
            configs = [line for line in log if "config" in line]
            resumed_from = configs[-1]["iter"]
            gap, n = max_gap(losses(log), ref2, since=resumed_from)
            checks[f"{name}: resumed at iter"] = resumed_from
            checks[f"{name} vs two after resume: max train-loss gap"] = gap
            checks[f"{name} vs two after resume: mean train-loss gap"] = mean_gap(losses(log), ref2, since=resumed_from)
            checks[f"{name} vs two after resume: steps compared"] = n
            final = max(losses(log))
            for key in sorted({k for k in two[-1] if k.startswith("val/loss@") and "/pos" not in k}):
                checks[f"{name} vs two: iter {final} {key} gap"] = abs(losses(log, key)[final] - losses(two, key)[final])
    summary["resume"] = checks
    evals = {}
    for line in two:
        for key, value in line.items():
            if key.startswith(("eval-1gpu/", "eval-2gpu/")) and "/pos" not in key:
                evals[key] = value
    summary["eval"] = evals
    summary["eval"]["max |2gpu - 1gpu|"] = max(
        abs(evals[k] - evals[k.replace("eval-2gpu", "eval-1gpu")]) for k in evals if k.startswith("eval-2gpu")
    ) if evals else None
scaling = {}
# scaling-split-graph-*: before train.py kept torch.compile from splitting the graph at DDP's buckets
for prefix, config in [(p, c) for p in ("scaling", "scaling-split-graph") for c in ("small_16k", "medium_8k")]:
    rates = {}
    for gpus in (1, 2):
        log = lines(f"{prefix}-{config}-{gpus}gpu")
        if log:
            steps = [line for line in log if "tokens_per_s" in line and line["iter"] > 3]
            rates[gpus] = statistics.median(line["tokens_per_s"] for line in steps)
            scaling[f"{prefix} {config} {gpus} GPU tokens/s (median, steps 4-8)"] = rates[gpus]
    if len(rates) == 2:
        scaling[f"{prefix} {config} efficiency = tokens/s(2) / (2 x tokens/s(1))"] = rates[2] / (2 * rates[1])
summary["scaling"] = scaling
(dest / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
for section, rows in summary.items():
    print(f"-- {section}")
    for key, value in rows.items():
        print(f"  {key}: {value:.6g}" if isinstance(value, float) else f"  {key}: {value}")
EOF
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(parity scaling report)
for step in "${steps[@]}"; do
    $step
done
