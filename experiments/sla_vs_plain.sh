#!/usr/bin/env bash
# Plain vs SLA GPT-2 small at 4K, 8K and 16K context on one GPU, same token budget, seed and data.
#
#   bash experiments/sla_vs_plain.sh              # every run not yet in results/sla-vs-plain/
#   bash experiments/sla_vs_plain.sh 16384-1338   # only the runs whose name contains this
#
# Corpus: the Python sources in this Python's site-packages (gpt2 tokens, validation split by file), and every
# final model is also scored on OpenWebText documents (OWT_JSONL). A run whose log already sits in
# results/sla-vs-plain/ is skipped, so the script resumes across calls on GPU machines (a run cut off before its
# log was copied there starts afresh: --overwrite=True); new logs go to $LOG_DEST (default results/sla-vs-plain).
# Needs datasets (prepare) and TIKTOKEN_CACHE_DIR offline.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repo root, from wherever the script is called
RESULTS=results/sla-vs-plain
LOG_DEST=${LOG_DEST:-$RESULTS}
WORK=${WORK:-/tmp/sla-vs-plain}
OWT_JSONL=${OWT_JSONL:-../shared/owt-sample/openwebtext-500.jsonl}
PYTHON=${PYTHON:-python3}
EXTRA_ARGS=${EXTRA_ARGS:-}  # appended to every train.py call, e.g. a tiny model for a quick check on a CPU
FILTER=${1:-}
mkdir -p "$LOG_DEST" "$WORK"

# name = context-seed-variant; plain and SLA runs of a seed see the same windows in the same order
RUNS="4096-1337-plain 4096-1337-sla 8192-1337-plain 8192-1337-sla 16384-1337-plain 16384-1337-sla 16384-1338-plain 16384-1338-sla"

prepare() {  # out_dir, then prepare_openwebtext.py arguments; skipped if already prepared
    [ -f "$1/meta.json" ] || $PYTHON prepare_openwebtext.py --out_dir "$@"
}
SITE=$($PYTHON -c 'import site; print(site.getsitepackages()[0])')

for run in $RUNS; do
    name="small-$run"
    [[ -n "$FILTER" && "$name" != *"$FILTER"* ]] && continue
    [ -f "$RESULTS/$name.jsonl" ] && { echo "== $name: already in $RESULTS, skipped"; continue; }
    IFS=- read -r context seed variant <<< "$run"
    prepare "$WORK/pysrc" --files "$SITE/**/*.py" --encoding_errors replace --val_fraction 0.01 \
        --stats_json "$LOG_DEST/prepare-pysrc.json"
    prepare "$WORK/owt" --files "$OWT_JSONL" --val_fraction 0.5
    echo "== $name"
    sla_flag=$([ "$variant" = sla ] && echo --sla || echo --sla=False)
    $PYTHON train.py config/sla_vs_plain.py --block_size="$context" --batch_size=$((16384 / context)) \
        --seed="$seed" "$sla_flag" --data_dir="$WORK/pysrc" --out_dir="$WORK/$name" --overwrite=True $EXTRA_ARGS
    # the final model on OpenWebText: same context lengths, logged as owt/loss@T in the same log
    $PYTHON train.py config/sla_vs_plain.py --block_size="$context" --batch_size=$((16384 / context)) \
        "$sla_flag" --out_dir="$WORK/$name" --init_from=resume --eval_only --eval_data_dir="$WORK/owt" --eval_tag=owt $EXTRA_ARGS
    cp "$WORK/$name/log.jsonl" "$LOG_DEST/$name.jsonl"
done
