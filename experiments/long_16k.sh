#!/usr/bin/env bash
# Does SLA's 16K gain last 15x longer? GPT-2 small at 16K as config/train_gpt2_small_16k.py ships it (524,288 tokens
# per step), 2,000 steps = 1.05B tokens, warmup 100 steps, cosine to the last step, seed 1: plain against SLA at the
# default setting (sla_skip 9, 9 of 12 heads), on 8 GPUs.
#
#   bash experiments/long_16k.sh                 # each arm not yet in results/long-16k/, one after the other, 8 GPUs
#   ARMS_AT_ONCE=1 bash experiments/long_16k.sh  # both arms at once, half the GPUs each
#   python plot_results.py --gap results/long-16k results/sla-ablation-16k --png results/long-16k/gap.png
#
# Corpus: every Python, C/C++/CUDA and documentation file on the machine that the site-packages and include folders
# hold (gpt2 tokens, whole files held out for validation, 2.5%), so that 1B tokens see each token about once; the
# prepared corpus's token counts go to results/long-16k/prepare.json, and the number of epochs a run made follows
# from them. Evaluation every 200 steps at 4K, 8K and 16K (0.5M tokens per length), at the end 64 batches of
# 4 x 16,384 per length (4.2M tokens), each 16K evaluation also by position. A run whose log sits in
# results/long-16k/ is done; new logs go to $LOG_DEST (keep it, and WORK, on the machine's disk where the output
# folder starts empty at each call, and copy the logs out). Needs datasets (prepare) and tiktoken's BPE files
# (TIKTOKEN_CACHE_DIR offline).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
RESULTS=${RESULTS:-results/long-16k}
LOG_DEST=${LOG_DEST:-$RESULTS}
WORK=${WORK:-/tmp/long-16k}
DATA=${DATA:-$WORK/corpus}  # prepared here unless it holds a meta.json
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-8}
ARMS_AT_ONCE=${ARMS_AT_ONCE:-0}
EXTRA_ARGS=${EXTRA_ARGS:-}  # appended to every train.py call, e.g. a tiny CPU model to rehearse this script
mkdir -p "$LOG_DEST" "$WORK"

if [ ! -f "$DATA/meta.json" ]; then
    # the source and text files of this machine's Python packages and system headers; a pattern matching nothing
    # is left out (prepare_openwebtext.py refuses one)
    mapfile -t patterns < <($PYTHON - <<'PY'
import glob, site, sysconfig
roots = [site.getsitepackages()[0], "/usr/include", "/usr/local/cuda/include"]
kinds = ["py", "pyi", "c", "cc", "cpp", "cu", "cuh", "h", "hpp", "md", "rst", "txt"]
for root in roots:
    for kind in kinds:
        pattern = f"{root}/**/*.{kind}"
        if next(glob.iglob(pattern, recursive=True), None):
            print(pattern)
PY
)
    $PYTHON prepare_openwebtext.py --files "${patterns[@]}" --encoding_errors replace --val_fraction 0.025 \
        --out_dir "$DATA" --stats_json "$WORK/prepare.json"
    cp "$WORK/prepare.json" "$LOG_DEST/prepare.json"
fi

train() {  # arm (plain or sla-skip9), first GPU, number of GPUs
    local arm=$1 gpus sla_flag=--sla=False
    [ "$arm" = sla-skip9 ] && sla_flag="--sla --sla_skip=9 --sla_head_ratio=0.75"
    gpus=$(seq -s, "$2" $(($2 + $3 - 1)))
    rm -rf "${WORK:?}/$arm"
    CUDA_VISIBLE_DEVICES=$gpus $PYTHON -m torch.distributed.run --standalone --nproc_per_node="$3" \
        --master_port=$((29500 + $2)) train.py config/train_gpt2_small_16k.py $sla_flag --seed=1 \
        --max_iters=2000 --warmup_iters=100 --lr_decay_iters=2000 --eval_interval=200 --eval_iters=8 \
        --final_eval_iters=64 --log_interval=10 --data_dir="$DATA" --out_dir="$WORK/$arm" \
        --wandb_run_name="long-16k-$arm" $EXTRA_ARGS > "$WORK/$arm.txt" 2>&1 \
        || { tail -n 30 "$WORK/$arm.txt"; echo "== $arm failed"; return 1; }
    cp "$WORK/$arm/log.jsonl" "$LOG_DEST/$arm-seed1.jsonl"
    echo "== $arm done: $(grep 'val/loss@' "$WORK/$arm.txt" | tail -n 1)"
}

arms=()
for arm in plain sla-skip9; do
    [ -f "$RESULTS/$arm-seed1.jsonl" ] || [ -f "$LOG_DEST/$arm-seed1.jsonl" ] || arms+=("$arm")
done
[ ${#arms[@]} -gt 0 ] || { echo "both arms are in $RESULTS"; exit 0; }
if [ "$ARMS_AT_ONCE" = 1 ] && [ ${#arms[@]} = 2 ]; then
    half=$((NPROC / 2))
    echo "starting plain and sla-skip9 at once, $half GPUs each"
    train plain 0 $half & first=$!
    train sla-skip9 $half $half & second=$!
    status=0
    wait $first || status=1
    wait $second || status=1
    exit $status
fi
for arm in "${arms[@]}"; do
    echo "starting $arm on $NPROC GPUs"
    train "$arm" 0 "$NPROC"
done
