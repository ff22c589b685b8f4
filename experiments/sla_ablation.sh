#!/usr/bin/env bash
# Does SLA lower validation loss, and with which setting? Plain against SLA arms over several seeds, 65.5M training
# tokens per run, one GPU each, on one fixed corpus. Two ablations:
#   small-16k  GPT-2 small at 16K (config/sla_ablation_16k.py): sla_skip 9, 3 and 1 at 9 of 12 heads, then the
#              head ratio: sla_skip 9 with 3 and with 6 of 12 heads (arms sla-skip9-ratio0.25, -ratio0.5)
#   medium-8k  GPT-2 medium at 8K (config/sla_ablation_medium_8k.py): sla_skip 9 and 15 at 12 of 16 heads
#
#   bash experiments/sla_ablation.sh [small-16k|medium-8k]      # the next runs not yet logged, one per GPU
#   bash experiments/sla_ablation.sh medium-8k sla-skip15-seed2 # this run only (names: <arm>-seed<N>)
#   bash experiments/sla_ablation.sh medium-8k --pending        # list the runs still to do here, in order, and exit
#   python plot_results.py --ablation results/sla-ablation-medium-8k --png results/sla-ablation-medium-8k/ablation.png
#
# The campaign spans many GPU calls: a run whose log sits in results/sla-ablation-<ablation>/ is done, and each call
# starts the next ones in the campaign's order, which follows from the logs so far:
#   small-16k: seeds 1 and 2 of every arm, then seeds 3 and 4 of plain and of the SLA arm with the lowest mean final
#              loss; then seeds 1 and 2 of each head ratio, and its seeds 3 and 4 if its mean over seeds 1 and 2
#              is below ratio 0.75's (sla-skip9) over the same seeds.
#   medium-8k: seeds 1 to 4 of every arm, then seeds 5 and 6 of plain and the best SLA arm if its paired difference
#              over seeds 1 to 4 is not told apart from seed noise (plot_results.py's paired t-test).
# Each decision reads only the seeds it is taken at, so the seeds that follow cannot undo it.
# As many runs start at once as there are GPUs (MAX_RUNS to change). Corpus: the Python sources of this Python's
# site-packages, gpt2 tokens, files in sorted path order (a package's files next to each other), 2.5% of the files
# held out; results/.../prepare-pysrc.json records its token counts, and a machine whose corpus differs stops. New
# logs go to $LOG_DEST. On a machine whose output folder starts empty at each call, keep LOG_DEST (and WORK, the
# prepared corpus) on the machine's own disk and copy the logs out after each call: the next call on the same
# machine then starts the runs after them. Each ablation needs its own LOG_DEST: run names repeat across the two,
# and a folder that mixes them stops the script. Needs datasets (prepare) and tiktoken's BPE files (TIKTOKEN_CACHE_DIR
# offline).
set -euo pipefail
shopt -s inherit_errexit  # a failed plot_results.py call inside $(...) stops the script too
cd "$(dirname "$0")/.."  # the repo root, from wherever the script is called
export PYTHONUNBUFFERED=1
ABLATION=small-16k
case ${1:-} in small-16k|medium-8k) ABLATION=$1; shift ;; esac
case $ABLATION in
    small-16k)  # sla_skip 9, 3 and 1 at 9 of 12 heads; then sla_skip 9 with 3 and with 6 of 12 heads
        CONFIG=config/sla_ablation_16k.py SLA_ARMS="sla-skip9 sla-skip3 sla-skip1"
        RATIO_ARMS="sla-skip9-ratio0.25 sla-skip9-ratio0.5" ;;
    medium-8k)  # sla_skip 9 (15 layers with skip heads) and 15 (9 layers) at 12 of 16 heads
        CONFIG=config/sla_ablation_medium_8k.py SLA_ARMS="sla-skip9 sla-skip15" RATIO_ARMS="" ;;
esac
RESULTS=${RESULTS:-results/sla-ablation-${ABLATION#small-}}  # the campaign's logs: a run logged here is done
LOG_DEST=${LOG_DEST:-$RESULTS}
WORK=${WORK:-/tmp/sla-ablation}
DATA=${DATA:-$WORK/pysrc}  # prepared here unless it holds a meta.json
PYTHON=${PYTHON:-python3}
EXTRA_ARGS=${EXTRA_ARGS:-}  # appended to every train.py call, e.g. a tiny CPU model to check this script

logged() {  # has this run a log: in the campaign's folder, or from an earlier call into the same LOG_DEST
    [ -f "$RESULTS/$1.jsonl" ] || [ -f "$LOG_DEST/$1.jsonl" ]
}

all_logged() {
    local run
    for run in "$@"; do logged "$run" || return 1; done
}

runs() {  # seeds, then arms: <arm>-seed<N> for each
    local seeds=$1 seed arm
    shift
    for seed in $seeds; do
        for arm in "$@"; do echo "$arm-seed$seed"; done
    done
}

ask_logs() {  # plot_results.py --ablation over every log so far (the campaign's and LOG_DEST's), with these flags
    local logs log status=0
    logs=$(mktemp -d)
    for log in "$RESULTS"/*-seed*.jsonl "$LOG_DEST"/*-seed*.jsonl; do [ -f "$log" ] && ln -sf "$(realpath "$log")" "$logs/"; done
    $PYTHON plot_results.py --ablation "$logs" "$@" || status=$?
    rm -rf "$logs"
    return $status
}

plan() {  # every run the campaign wants by now, in the order to run them
    local best arm
    if [ "$ABLATION" = medium-8k ]; then
        # seeds 1 to 4 of every arm, then seeds 5 and 6 of plain and the best SLA arm if its gap is not told apart,
        # decided on seeds 1 to 4 alone: a seed 5 that lands told apart must not cancel seed 6 (stopping at the first
        # look that says yes would make "told apart" likelier than the test's 5%)
        runs "1 2 3 4" plain $SLA_ARMS
        if all_logged $(runs 4 plain $SLA_ARMS); then
            best=$(ask_logs --best_sla_arm --among $SLA_ARMS --seeds 1 2 3 4)
            [ "$(ask_logs --told_apart "$best" --seeds 1 2 3 4)" = no ] && runs "5 6" plain "$best"
        fi
        return 0
    fi
    # seeds 1 and 2 of every arm, then seeds 3 and 4 of plain and the best SLA arm
    runs "1 2" plain $SLA_ARMS
    if all_logged $(runs 2 plain $SLA_ARMS); then
        best=$(ask_logs --best_sla_arm --among $SLA_ARMS --seeds 1 2)
        runs "3 4" plain "$best"
    fi
    # the head ratios: seeds 1 and 2 (paired with plain's), then 3 and 4 of a ratio whose mean beats 0.75's
    runs "1 2" $RATIO_ARMS
    for arm in $RATIO_ARMS; do
        if all_logged $(runs "1 2" "$arm" sla-skip9) \
            && [ "$(ask_logs --best_sla_arm --among sla-skip9 "$arm" --seeds 1 2)" = "$arm" ]; then
            runs "3 4" "$arm"
        fi
    done
}

pending() {  # the runs of the plan not yet logged
    local planned run
    planned=$(plan)  # a plain assignment: a failure in plan stops the script (a for loop's $(...) would hide it)
    for run in $planned; do logged "$run" || echo "$run"; done
}

# A seed's runs share one GPU model, so that a card cannot pass for SLA's effect in the paired differences: the runs
# this script picks skip a seed whose logged runs (their provenance lines) ran on another model than GPU_MODEL, this
# machine's GPU 0 by default. Empty (no GPU) picks any seed; a run named on the command line runs regardless.
gpus_here() {  # this machine's GPU count (1 without CUDA: runs go one at a time), then GPU 0's model ("": none)
    $PYTHON -c 'import torch
print(max(1, torch.cuda.device_count()), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
}
GPUS=""  # asked of torch once, with GPU_MODEL if that is not given
if [ -z "${GPU_MODEL+set}" ]; then
    found=$(gpus_here)  # a plain assignment, not read < <(...): a failure in it stops the script
    read -r GPUS GPU_MODEL <<< "$found"
fi

for_this_gpu() {  # those of the runs given whose seed has no logged run on another GPU model
    local run seed other gpus
    if [ -z "$GPU_MODEL" ]; then
        [ $# -eq 0 ] || printf '%s\n' "$@"
        return 0
    fi
    gpus=$(ask_logs --seed_gpus)
    for run in "$@"; do
        seed=${run##*-seed}
        other=$(awk -F'\t' -v seed="$seed" -v gpu="$GPU_MODEL" '$1 == seed && $2 != gpu {print $2; exit}' <<< "$gpus")
        if [ -z "$other" ]; then
            echo "$run"
        else
            echo "skipping $run: seed $seed ran on $other, this GPU is $GPU_MODEL (name the run to run it here)" >&2
        fi
    done
}

if [ "${1:-}" = --pending ]; then
    pending_runs=$(pending)  # not a process substitution: a failure in it must stop the script
    for_this_gpu $pending_runs
    exit 0
fi

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

mkdir -p "$LOG_DEST" "$WORK"

if [ ! -f "$DATA/meta.json" ]; then
    SITE=$($PYTHON -c 'import site; print(site.getsitepackages()[0])')
    $PYTHON prepare_openwebtext.py --files "$SITE/**/*.py" --encoding_errors replace --val_fraction 0.025 \
        --out_dir "$DATA" --stats_json "$WORK/prepare-pysrc.json"
fi
# every run of the campaign must see the same corpus: compare its token counts with the recorded ones
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

if [ $# -gt 0 ]; then
    runs=("$@")
else
    pending_runs=$(pending)  # not a process substitution: a failure in it must stop the script
    pending_runs=$(for_this_gpu $pending_runs)
    runs=($pending_runs)  # run names hold no spaces
fi
if [ -z "$GPUS" ]; then
    found=$(gpus_here)
    read -r GPUS _ <<< "$found"
fi
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
