# A small-scale comparison of plain and SLA GPT-2 small (run by experiments/sla_vs_plain.sh, one GPU).
# Every run: 16,384 tokens per optimizer step (4 x 4096, 2 x 8192 or 1 x 16384 via --block_size/--batch_size),
# 1,000 steps = 16.4M training tokens, the same seed and so the same windows for a plain run and its SLA twin.
n_layer = 12
n_head = 12
n_embd = 768
bias = False  # as in bench.py's measurements
sla_head_ratio = 0.75  # 9 of 12 heads skip
sla_skip = 9  # the default: layers 9, 10, 11 read layers 0, 1, 2

gradient_accumulation_steps = 1
max_iters = 1000
# nanoGPT's peak and floor, with the warmup and decay shortened to the run
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 100
lr_decay_iters = 1000

# every 200 steps, at 4K, 8K and 16K (those <= block_size): 32 batches of 16,384 tokens per length, the same
# windows in every run
eval_interval = 200
eval_iters = 32
log_interval = 50
compile = True
