# NCCL DDP smoke test of train.py's teardown (close_process_group drops the DDP wrapper, then destroys the group):
# 2 GPUs, torchrun, tiny models on a byte corpus; every run must end with exit 0, no abort, within its timeout.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv > $OUT/gpus.txt
python3 - <<'P'
import json, numpy as np, pathlib
docs = [json.loads(l)["text"] for l in open(".carry/owt-sample/openwebtext-500.jsonl")]
out = pathlib.Path("/tmp/bytedata"); out.mkdir(exist_ok=True)
n_val = len(docs) // 25
meta = {"tokenizer": "byte", "vocab_size": 257, "eot_token": 256, "dtype": "uint16", "splits": {}}
for split, d in (("train", docs[:-n_val]), ("val", docs[-n_val:])):
    t = np.array([x for doc in d for x in [*doc.encode("utf-8"), 256]], dtype=np.uint16); t.tofile(out / f"{split}.bin")
    meta["splits"][split] = {"documents": len(d), "tokens": len(t)}
(out / "meta.json").write_text(json.dumps(meta))
P
T="--data_dir=/tmp/bytedata --n_layer=4 --n_head=4 --n_embd=256 --block_size=512 --batch_size=8 --gradient_accumulation_steps=2 --max_iters=30 --eval_interval=15 --eval_iters=4 --log_interval=5 --warmup_iters=5 --lr_decay_iters=30"
i=0
for extra in "" "--sla --sla_skip=1" "--sla --sla_skip=2 --compile" "" "--sla --sla_skip=1"; do
  i=$((i+1))
  start=$SECONDS
  timeout 240 torchrun --standalone --nproc_per_node=2 train.py $T $extra --out_dir=/tmp/smoke$i > $OUT/run$i.log 2>&1
  rc=$?
  echo "run $i ($extra): rc=$rc in $((SECONDS-start)) s; aborts: $(grep -c 'terminate called' $OUT/run$i.log); last: $(grep -o '"iter": [0-9]*' /tmp/smoke$i/log.jsonl | tail -1)" | tee -a $OUT/summary.txt
  cp /tmp/smoke$i/log.jsonl $OUT/run$i.jsonl 2>/dev/null
done
