# A tiny model (0.8M parameters) that trains on 2 CPU cores in about two minutes, for the demo and for trying things.
# Data: byte-level tokens (prepare_openwebtext.py --tokenizer byte) in data/stdlib-byte, which the demo prepares
# from the Python standard library's own sources.
#   python train.py config/tiny_cpu.py                                  # plain
#   python train.py config/tiny_cpu.py --sla --out_dir=out/tiny-sla     # layers 2, 3 read layers 0, 1 (3 of 4 heads)
out_dir = "out/tiny"
data_dir = "data/stdlib-byte"
device = "cpu"
dtype = "float32"

n_layer = 4
n_head = 4
n_embd = 128
block_size = 256
sla_skip = 2  # with 4 layers the default (9) would leave no layer to skip; sla_head_ratio 0.75 = 3 of 4 heads

batch_size = 16
gradient_accumulation_steps = 1  # 4,096 tokens per step
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
lr_decay_iters = 400
max_iters = 400

eval_interval = 100
eval_iters = 10
log_interval = 20
