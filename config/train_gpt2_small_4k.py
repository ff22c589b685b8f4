# GPT-2 small (124M) on OpenWebText at 4K context. Plain by default; add --sla for Skip-Layer Attention.
#   python train.py config/train_gpt2_small_4k.py --sla --out_dir=out/gpt2-small-4k-sla
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_small_4k.py
out_dir = "out/gpt2-small-4k"
data_dir = "data/openwebtext"
wandb_project = "sla-gpt"
wandb_run_name = "gpt2-small-4k"

n_layer = 12
n_head = 12
n_embd = 768
block_size = 4096

# 524,288 tokens per optimizer step = batch_size 16 x block_size 4096 x gradient_accumulation_steps 8.
# gradient_accumulation_steps is global: 8 micro-steps on 1 GPU, 1 on each of 8.
# A micro-batch of 16 x 4096 = 65536 tokens fits an 80 GB H100: 3-step runs of every config here with
# --sla fit on one (uncompiled, evaluation included).
batch_size = 16
gradient_accumulation_steps = 8

# Optimizer and schedule: TrainConfig's defaults, which are nanoGPT's for GPT-2 small (AdamW 6e-4 decaying to 6e-5,
# 2,000 warmup steps, cosine over 600,000, weight decay 0.1, betas 0.9/0.95, clipping at 1.0);
# the SLA paper gives no schedule that we could find.

# Validation at 4K, 8K and 16K (those <= block_size): eval_iters x 65536 tokens = 2.1M tokens per length, the
# same windows (512 at 4K, 256 at 8K, 128 at 16K) in every config here, so runs compare across sizes and contexts.
eval_interval = 500
eval_iters = 32
compile = True
