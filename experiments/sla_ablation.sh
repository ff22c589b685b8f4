#!/usr/bin/env bash
# Does SLA lower validation loss at 16K, and under which reading of "skip layers"? GPT-2 small at 16K,
# plain against SLA (9 of 12 heads) with sla_skip 9, 3 and 1, several seeds; 65.5M tokens per run, one GPU each.
#
#   bash experiments/sla_ablation.sh                    # the next runs not yet in results/sla-ablation-16k/
#   bash experiments/sla_ablation.sh sla-skip3-seed2    # this run only (names: <arm>-seed<N>)
#   python plot_results.py --ablation results/sla-ablation-16k --png results/sla-ablation-16k/ablation.png
#
# The campaign spans several GPU calls: a run whose log already sits in results/sla-ablation-16k/ is done, so each call
# starts the next ones in this order: seed 1 of every arm, then seed 2, then seeds 3 and 4 of plain and of the SLA
# arm with the lowest mean final val/loss@16384 over seeds 1 and 2 (at the seed spread of seeds 1 and 2, the
# paired t-test needs about 4 seeds to tell a gap of 0.02; RESULTS.md). As many runs start at once as there are GPUs
# (MAX_RUNS to change). Corpus: the Python sources of this Python's site-packages, gpt2 tokens, files in sorted
# path order (a package's files next to each other), 2.5% of the files held out; the first call records its
# token counts, and a later call whose corpus differs stops. New logs go to $LOG_DEST. On a device whose output
# folder starts empty at each call, keep LOG_DEST (and WORK, the prepared corpus) on the machine's own disk and copy
# the logs out after each call: the next call on the same machine then starts the runs after them. Needs datasets
# (prepare) and tiktoken's BPE files (TIKTOKEN_CACHE_DIR offline).
set -euo pipefail
cd "$(dirname "$0")/.."  # the repo root, from wherever the script is called
export PYTHONUNBUFFERED=1
ABLATION=small-16k
case ${1:-} in small-16k|medium-8k) ABLATION=$1; shift ;; esac
case $ABLATION in
    small-16k) CONFIG=config/sla_ablation_16k.py; ARMS="plain sla-skip9 sla-skip3 sla-skip1" ;;
    medium-8k) CONFIG=config/sla_ablation_medium_8k.py; ARMS="plain sla-skip9 sla-skip15" ;;
esac
RESULTS=${RESULTS:-results/sla-ablation-${ABLATION#small-}}  # the campaign's logs: a run logged here is done
LOG_DEST=${LOG_DEST:-$RESULTS}
WORK=${WORK:-/tmp/sla-ablation}
DATA=${DATA:-$WORK/pysrc}  # prepared here unless it holds a meta.json
PYTHON=${PYTHON:-python3}
EXTRA_ARGS=${EXTRA_ARGS:-}  # appended to every train.py call, e.g. a tiny CPU model to check this script
mkdir -p "$LOG_DEST" "$WORK"

if [ ! -f "$DATA/meta.json" ]; then
    SITE=$($PYTHON -c 'import site; print(site.getsitepackages()[0])')
    $PYTHON prepare_openwebtext.py --files "$SITE/**/*.py" --encoding_errors replace --val_fraction 0.025 \
        --out_dir "$DATA" --stats_json "$WORK/prepare-pysrc.json"
fi
# every run of the campaign must see the same corpus: compare token counts with the first call's
$PYTHON - "$DATA/meta.json" "$RESULTS/prepare-pysrc.json" "$LOG_DEST/prepare-pysrc.json" <<'EOF'
import json, os, shutil, sys
meta_path, recorded_path, dest = sys.argv[1:]
counts = lambda meta: {split: meta["splits"][split]["tokens"] for split in ("train", "val")}
meta = json.load(open(meta_path))
if os.path.exists(recorded_path):
    recorded = json.load(open(recorded_path))
    if counts(meta) != counts(recorded):
        sys.exit(f"error: this corpus has {counts(meta)} tokens, the campaign's ({recorded_path}) {counts(recorded)}: "
                 f"runs on it would not compare; prepare the campaign's corpus or start a new results folder")
elif not os.path.exists(dest):
    stats = os.path.join(os.path.dirname(meta_path), "..", "prepare-pysrc.json")
    shutil.copy(stats if os.path.exists(stats) else meta_path, dest)
EOF

best_sla_arm() {  # the SLA arm with the lowest mean final val/loss@16384 over the seeds every SLA arm has
    $PYTHON plot_results.py --ablation "$RESULTS" --best_sla_arm
}

pending() {
    local seed arm order=""
    if [ $ABLATION = medium-8k ]; then
        for seed in 1 2 3 4; do
            for arm in $ARMS; do order="$order $arm-seed$seed"; done
        done
        for run in $order; do
            [ -f "$RESULTS/$run.jsonl" ] || [ -f "$LOG_DEST/$run.jsonl" ] || echo "$run"
        done
        return
    fi
    for seed in 1 2; do
        for arm in $ARMS; do order="$order $arm-seed$seed"; done
    done
    local all_seed2_done=1 best=""
    for arm in $ARMS; do [ -f "$RESULTS/$arm-seed2.jsonl" ] || all_seed2_done=0; done
    [ $all_seed2_done = 1 ] && best=$(best_sla_arm)
    for seed in 3 4; do
        order="$order plain-seed$seed"
        [ -n "$best" ] && order="$order $best-seed$seed"
    done
    for run in $order; do  # done: logged in the campaign's folder, or by an earlier call into the same LOG_DEST
        [ -f "$RESULTS/$run.jsonl" ] || [ -f "$LOG_DEST/$run.jsonl" ] || echo "$run"
    done
}

train() {  # run name, GPU index
    local run=$1 arm=${1%-seed*} seed=${1##*-seed} sla_flags="--sla=False"
    if [ "$arm" != plain ]; then  # sla-skip<N>[-ratio<R>]
        local skip=${arm#sla-skip}
        sla_flags="--sla --sla_skip=${skip%%-*}"
        [[ $arm == *-ratio* ]] && sla_flags="$sla_flags --sla_head_ratio=${arm##*-ratio}"
    fi
    rm -rf "${WORK:?}/$run"
    CUDA_VISIBLE_DEVICES=$2 $PYTHON train.py $CONFIG $sla_flags --seed="$seed" \
        --data_dir="$DATA" --out_dir="$WORK/$run" $EXTRA_ARGS > "$WORK/$run.txt" 2>&1 \
        || { tail -n 30 "$WORK/$run.txt"; echo "== $run failed (GPU $2)"; return 1; }
    cp "$WORK/$run/log.jsonl" "$LOG_DEST/$run.jsonl"
    echo "== $run done (GPU $2): $(grep 'val/loss@' "$WORK/$run.txt" | tail -n 1)"
}

if [ $# -gt 0 ]; then
    runs=("$@")
else
    mapfile -t runs < <(pending)
fi
GPUS=$($PYTHON -c 'import torch; print(max(1, torch.cuda.device_count()))')
MAX_RUNS=${MAX_RUNS:-$GPUS}
runs=("${runs[@]:0:$MAX_RUNS}")
[ ${#runs[@]} -gt 0 ] || { echo "every run of the campaign is in $RESULTS"; exit 0; }
echo "starting ${runs[*]} on $GPUS GPU(s)"
pids=()
for i in "${!runs[@]}"; do
    train "${runs[$i]}" $((i % GPUS)) &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
