#!/usr/bin/env bash
# NCCL DDP smoke test of train.py's teardown (close_process_group drops the DDP wrapper, then destroys the group):
# 2 GPUs, torchrun, tiny models on a byte corpus; every run must end with exit 0, no abort, within its timeout.
#
#   OUT=results/ddp/teardown-smoke-h200 bash experiments/ddp_smoke.sh
#
# OUT (default /tmp/ddp-smoke) receives gpus.txt, summary.txt and each run's console log and log.jsonl; WORK holds
# the byte corpus and the runs. The corpus: the 500 OpenWebText documents of OWT_JSONL as UTF-8 bytes.
set -u
cd "$(dirname "$0")/.."  # the repo root, from wherever the script is called
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ddp-smoke}
WORK=${WORK:-/tmp}
OWT_JSONL=${OWT_JSONL:-../shared/owt-sample/openwebtext-500.jsonl}
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name --format=csv > $OUT/gpus.txt
python3 - "$OWT_JSONL" "$WORK/bytedata" <<'P'
import json, numpy as np, pathlib, sys
docs = [json.loads(l)["text"] for l in open(sys.argv[1])]
out = pathlib.Path(sys.argv[2]); out.mkdir(exist_ok=True)
n_val = len(docs) // 25
meta = {"tokenizer": "byte", "vocab_size": 257, "eot_token": 256, "dtype": "uint16", "splits": {}}
for split, d in (("train", docs[:-n_val]), ("val", docs[-n_val:])):
    t = np.array([x for doc in d for x in [*doc.encode("utf-8"), 256]], dtype=np.uint16); t.tofile(out / f"{split}.bin")
    meta["splits"][split] = {"documents": len(d), "tokens": len(t)}
(out / "meta.json").write_text(json.dumps(meta))
P
T="--data_dir=$WORK/bytedata --n_layer=4 --n_head=4 --n_embd=256 --block_size=512 --batch_size=8 --gradient_accumulation_steps=2 --max_iters=30 --eval_interval=15 --eval_iters=4 --log_interval=5 --warmup_iters=5 --lr_decay_iters=30"
i=0
for extra in "" "--sla --sla_skip=1" "--sla --sla_skip=2 --compile" "" "--sla --sla_skip=1"; do
  i=$((i+1))
  start=$SECONDS
  timeout 240 torchrun --standalone --nproc_per_node=2 train.py $T $extra --out_dir=$WORK/smoke$i --overwrite=True > $OUT/run$i.log 2>&1
  rc=$?
  echo "run $i ($extra): rc=$rc in $((SECONDS-start)) s; aborts: $(grep -c 'terminate called' $OUT/run$i.log); last: $(grep -o '"iter": [0-9]*' $WORK/smoke$i/log.jsonl | tail -1)" | tee -a $OUT/summary.txt
  cp $WORK/smoke$i/log.jsonl $OUT/run$i.jsonl 2>/dev/null
done
