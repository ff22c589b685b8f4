#!/usr/bin/env bash
# The speed train.py trains at, beside bench.py's figure for the same model and nanoGPT's (bench.py --peer), on one
# GPU: at bench's shapes (model:block_size:batch_size, the micro-batch: one micro-step per optimizer step), plain and
# SLA (skip 9), at the fastest settings and at the defaults. Rows go to $DEST/train-speed-<gpu>.jsonl. (The medium
# configs' skip 15 does the same work as skip 9 at 24 layers: the skip heads of layers 15-23 leave their K/V
# uncomputed in both, and every head attends over the same keys, so one skip distance times both.)
#
#   bash experiments/train_speed.sh                      # medium:8192:1, small:16384:1 and small:4096:4
#   bash experiments/train_speed.sh medium:8192:1        # one shape
#   SETTINGS=fastest bash experiments/train_speed.sh     # the fastest settings alone (about 60% of the time)
#
# Settings by settings (the fastest first) and, in each, shape by shape: one bench.py run of the shape (plain,
# nanoGPT and SLA, timed round-robin), then one train.py run per model, STEPS steps logged every LOG_INTERVAL, then
# the shape's two rows appended: a run cut short keeps the rows of every shape it finished. On an H100 a shape takes
# 3.5-4.5 minutes at the fastest settings (CUDA graphs compile slowly), 2-3 at the defaults. train_tokens_per_s is
# the median over the log's lines after step SKIP (compilation, CUDA-graph recording and the first evaluation come
# before). Both read the same corpus: random token ids, since a step's time depends on the shapes, not on the tokens
# (bench.py's synthetic batch is random too). Logs and bench rows: $WORK/logs/<shape>/. The fastest settings need
# flash-attn-4 (requirements-fa4.txt). PEER: the folder of nanoGPT's model.py.
# On a CPU, to check this script: DEVICE=cpu FASTEST=... DEFAULTS=... EXTRA_ARGS=... (tests/test_train_speed.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
SHAPES=${1:-medium:8192:1,small:16384:1,small:4096:4}  # the paper's headline shape first
PYTHON=${PYTHON:-python3}
PEER=${PEER:-../shared/peers/nanogpt}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/train-speed}  # corpus, checkpoints (deleted after each run), logs per shape
DEST=${DEST:-results}
STEPS=${STEPS:-40}
SKIP=${SKIP:-10}
LOG_INTERVAL=${LOG_INTERVAL:-5}
# the same keys in train.py and bench.py, so one string sets both
FASTEST=${FASTEST:---compile=True --compile_mode=reduce-overhead --compile_optimizer=True --attention=fa4}
DEFAULTS=${DEFAULTS:---compile=True}  # what the GPU configs set; attention auto, compile_mode default
SETTINGS=${SETTINGS:-fastest defaults}  # which of the two to measure, in this order
BENCH_ARGS=${BENCH_ARGS:---warmup_steps=3 --rounds=2 --block_steps=10}
EXTRA_ARGS=${EXTRA_ARGS:-}  # appended to every train.py and bench.py call, e.g. a tiny vocabulary on a CPU
VOCAB_SIZE=${VOCAB_SIZE:-50257}  # of the random corpus: GPT-2's
DATA=$WORK/data
started=$SECONDS
declare -A SETTINGS_ARGS=([fastest]=$FASTEST [defaults]=$DEFAULTS)
for name in $SETTINGS; do
    [[ -v SETTINGS_ARGS[$name] ]] \
        || { echo "error: SETTINGS=\"$SETTINGS\": each must be fastest or defaults" >&2; exit 1; }
done
mkdir -p "$DEST"

if [ ! -f "$DATA/meta.json" ]; then  # 16M random tokens, in prepare_openwebtext.py's format
    $PYTHON - "$DATA" "$VOCAB_SIZE" <<'EOF'
import json, os, sys
import numpy as np
folder, vocab_size = sys.argv[1], int(sys.argv[2])
os.makedirs(folder, exist_ok=True)
rng, meta = np.random.default_rng(0), {"tokenizer": "gpt2", "vocab_size": vocab_size, "dtype": "uint16", "splits": {}}
for split, n in (("train", 1 << 24), ("val", 1 << 20)):
    rng.integers(0, vocab_size, size=n, dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
    meta["splits"][split] = {"tokens": n}
with open(os.path.join(folder, "meta.json"), "w") as f:
    json.dump(meta, f)
EOF
fi

if [[ " $SETTINGS " = *" fastest "* && $FASTEST = *attention=fa4* ]]; then
    $PYTHON -c 'import flash_attn.cute' \
        || { echo "error: the fastest settings run FA4: install requirements-fa4.txt first" >&2; exit 1; }
fi

# each shape's model size as train.py keys, from bench.MODELS, in one python call; a wrong shape stops the script
# here, before the first shape's minutes on the GPU, not when its turn comes
sizes=$($PYTHON -c "
import bench, sys
try:
    shapes = [bench.parse_shape(text) for text in sys.argv[1].split(',')]
except ValueError as err:
    sys.exit(f'error: {err}')
for size in dict.fromkeys(shape.size for shape in shapes):
    print(size, ' '.join(f'--{k}={v}' for k, v in bench.MODELS[size].items()))" "$SHAPES")
declare -A MODEL_ARGS
while read -r size args; do MODEL_ARGS[$size]=$args; done <<< "$sizes"

measure() {  # settings name, its arguments, shape: bench.py, then train.py plain and SLA, then the shape's rows
    local name=$1 settings=$2 shape=$3 logs=$WORK/logs/${3//:/-} size block batch sla run
    IFS=: read -r size block batch <<< "$shape"
    mkdir -p "$logs"
    rm -f "$logs/bench-$name.jsonl"  # bench appends
    echo "== $name $shape: bench.py ($(( SECONDS - started )) s so far)"
    $PYTHON bench.py --shapes="$shape" --sla_skips=9 --peer="$PEER" --data="$DATA" --decode_tokens=0 \
        --device="$DEVICE" $BENCH_ARGS $settings $EXTRA_ARGS --out="$logs/bench-$name.jsonl" \
        > "$logs/bench-$name.txt" 2>&1 || { tail -n 30 "$logs/bench-$name.txt"; exit 1; }
    for sla in False True; do
        run="$name-$size-$block-$batch-$([ $sla = True ] && echo sla || echo plain)"
        echo "== $run: train.py ($(( SECONDS - started )) s so far)"
        $PYTHON train.py ${MODEL_ARGS[$size]} --block_size="$block" --batch_size="$batch" \
            --gradient_accumulation_steps=1 --bias=False --sla="$sla" --sla_skip=9 --data_dir="$DATA" \
            --out_dir="$WORK/runs/$run" --overwrite=True --device="$DEVICE" --max_iters="$STEPS" \
            --log_interval="$LOG_INTERVAL" --eval_interval="$STEPS" --eval_iters=1 --eval_block_sizes="$block" \
            $settings $EXTRA_ARGS > "$logs/$run.txt" 2>&1 || { tail -n 30 "$logs/$run.txt"; exit 1; }
        cp "$WORK/runs/$run/log.jsonl" "$logs/$run.jsonl"
        rm -rf "${WORK:?}/runs/$run"  # its checkpoint: medium's is 4 GB
    done
    append_rows "$name" "$shape" "$logs"
}

append_rows() {  # settings name, shape, its logs folder: plain's and SLA's rows appended to $DEST and printed
    $PYTHON - "$DEST" "$SKIP" "$LOG_INTERVAL" "$@" <<'EOF'
import json, re, statistics, sys
dest, skip, log_interval, name, shape, logs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
bench = {row["model"]: row for row in map(json.loads, open(f"{logs}/bench-{name}.jsonl"))}  # this shape's alone
size, block, batch = shape.split(":")
rows = []
for model in ("plain", "sla"):
    log = [json.loads(line) for line in open(f"{logs}/{name}-{size}-{block}-{batch}-{model}.jsonl")]
    config = log[0]["config"]  # attention: the kernel that ran
    steady = [line["ms_per_step"] for line in log if "train/loss" in line and line["iter"] > skip]
    train_tokens_per_s = int(block) * int(batch) / (statistics.median(steady) / 1000)
    ours, nanogpt = bench[model], bench["nanogpt"]
    rows.append({
        "shape": shape, "sla": model == "sla", "attention": config["attention"],
        "compile_mode": config["compile_mode"] if config["compile"] else None,
        "compile_optimizer": config["compile_optimizer"], "train_tokens_per_s": train_tokens_per_s,
        "bench_tokens_per_s": ours["tokens_per_s"], "nanogpt_tokens_per_s": nanogpt["tokens_per_s"],
        "gpu": ours["gpu"], "torch": ours["torch"], "settings": name,
        "train_vs_nanogpt": train_tokens_per_s / nanogpt["tokens_per_s"],
        "train_vs_bench": train_tokens_per_s / ours["tokens_per_s"],
        "bench_attention": ours["attention"], "train_steps_timed": len(steady) * log_interval,
        "provenance": log[0]["provenance"],
    })
plain, sla = rows  # train.py's SLA step time over plain's
sla["sla_vs_plain_step_time"] = plain["train_tokens_per_s"] / sla["train_tokens_per_s"]
found = re.search(r"\b([A-Z]+\d{2,3}[A-Z]?)\b", plain["gpu"])
gpu = found.group(1).lower() if found else re.sub(r"[^a-z0-9]+", "-", plain["gpu"].lower())
path = f"{dest}/train-speed-{gpu}.jsonl"
with open(path, "a") as f:
    for row in rows:
        f.write(json.dumps(row) + "\n")
print(f"{'settings':9} {'shape':14} {'model':5} {'attention':9} {'train tok/s':>11} {'bench':>9} {'nanoGPT':>9} "
      f"{'x nanoGPT':>9} {'/bench':>7} {'SLA/plain':>9}")
for row in rows:
    sla_vs_plain = f"{row['sla_vs_plain_step_time']:9.3f}" if row["sla"] else ""
    print(f"{row['settings']:9} {row['shape']:14} {'sla' if row['sla'] else 'plain':5} {row['attention']:9} "
          f"{row['train_tokens_per_s']:11,.0f} {row['bench_tokens_per_s']:9,.0f} {row['nanogpt_tokens_per_s']:9,.0f} "
          f"{row['train_vs_nanogpt']:9.3f} {row['train_vs_bench']:7.3f} {sla_vs_plain}")
print(f"appended {len(rows)} rows to {path}")
EOF
}

for name in $SETTINGS; do
    for shape in ${SHAPES//,/ }; do
        measure "$name" "${SETTINGS_ARGS[$name]}" "$shape"
    done
done
echo "== done in $(( SECONDS - started )) s"
