# GPT-2 medium (350M) on OpenWebText at 4K context. Plain by default; add --sla for Skip-Layer Attention.
#   python train.py config/train_gpt2_medium_4k.py --sla --out_dir=out/gpt2-medium-4k-sla
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_medium_4k.py
out_dir = "out/gpt2-medium-4k"
data_dir = "data/openwebtext"
wandb_project = "sla-gpt"
wandb_run_name = "gpt2-medium-4k"

n_layer = 24
n_head = 16
n_embd = 1024
block_size = 4096

# With --sla, 12 of 16 heads of layers 15-23 read the K/V of layers 0-8: the skip distance measured best for
# GPT-2 medium at 8K (why: config/train_gpt2_medium_8k.py); same depth here, not measured at this context.
sla_skip = 15

# 524,288 tokens per optimizer step = batch_size 8 x block_size 4096 x gradient_accumulation_steps 16.
# gradient_accumulation_steps is global: 16 micro-steps on 1 GPU, 2 on each of 8.
# A micro-batch of 8 x 4096 = 32768 tokens fits an 80 GB H100: 3-step runs of every config here with
# --sla fit on one (uncompiled, evaluation included).
batch_size = 8
gradient_accumulation_steps = 16

# Optimizer and schedule: TrainConfig's defaults (nanoGPT's: 2,000 warmup steps, cosine over 600,000, weight decay
# 0.1, betas 0.9/0.95, clipping at 1.0) with the GPT-3 paper's peak learning rate for 350M;
# the SLA paper gives no schedule that we could find.
learning_rate = 3e-4
min_lr = 3e-5

# Validation at 4K, 8K and 16K (those <= block_size): eval_iters x 32768 tokens = 2.1M tokens per length, the
# same windows (512 at 4K, 256 at 8K, 128 at 16K) in every config here, so runs compare across sizes and contexts.
eval_interval = 500
eval_iters = 64
compile = True
