# The 16K ablation: GPT-2 small at 16K, plain against SLA at three skip distances, several seeds each (run by
# experiments/sla_ablation.sh, one GPU per run). Every run: 4 windows of 16,384 tokens per step, no accumulation,
# 1,000 steps = 65.5M training tokens; runs of one seed see the same windows and start from the same weights.
n_layer = 12
n_head = 12
n_embd = 768
bias = False
block_size = 16384
sla_head_ratio = 0.75  # 9 of 12 heads skip; sla and sla_skip come from the command line (the arm)

batch_size = 4
gradient_accumulation_steps = 1
max_iters = 1000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 100
lr_decay_iters = 1000

# every 200 steps at 4K, 8K and 16K: 8 batches of 65,536 tokens per length (0.5M tokens, as in sla_vs_plain.py); at
# the end 64 batches (4.2M tokens per length), each 16K evaluation also by position (val/loss@16384/pos...)
eval_interval = 200
eval_iters = 8
final_eval_iters = 64
log_interval = 10
compile = True
attention = "sdpa"  # one kernel for every run of the campaign, whatever the default (auto) chooses
