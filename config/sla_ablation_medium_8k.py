# The medium ablation: GPT-2 medium at 8K, plain against SLA (12 of 16 heads) with sla_skip 9 and 15, several seeds
# (run by experiments/sla_ablation.sh medium-8k, one GPU per run). Every run: 8 windows of 8,192 tokens per step as
# 2 micro-steps of 4, the micro-batch of our medium configs (37 GB on an H200), so that every run of the campaign
# computes alike on 80 GB and 141 GB GPUs; 1,000 steps = 65.5M training tokens; runs of one seed see the same windows
# and start from the same weights. The corpus and schedule shape are the small 16K ablation's
# (config/sla_ablation_16k.py), so the two sizes compare.
n_layer = 24
n_head = 16
n_embd = 1024
bias = False
block_size = 8192
sla_head_ratio = 0.75  # 12 of 16 heads skip; sla and sla_skip come from the command line (the arm)

batch_size = 4
gradient_accumulation_steps = 2
max_iters = 1000
learning_rate = 3e-4  # the medium configs' peak
min_lr = 3e-5
warmup_iters = 100
lr_decay_iters = 1000

# every 200 steps at 4K and 8K: 16 batches of 32,768 tokens per length (0.5M tokens); at the end 128 batches
# (4.2M tokens per length), each 8K evaluation also by position (val/loss@8192/pos...)
eval_interval = 200
eval_iters = 16
final_eval_iters = 128
log_interval = 10
compile = True
attention = "sdpa"  # one kernel for every run of the campaign, whatever the default becomes
