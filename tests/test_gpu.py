"""GPU-only checks (skipped without CUDA): SLA through the flash kernel in bf16 agrees with the float32 math path,
forward and backward; static-cache decoding agrees with recomputation, and its step compiles to one CUDA graph;
where flash-attn-4 is installed (Hopper or Blackwell), FA4 attention (fa4.py) agrees with SDPA's flash kernel and
train.py trains with it; train.py at its fastest settings (CUDA graphs, a compiled optimizer step) evaluates and
resumes exactly; a training step returns before the device has done its work."""

import json
import math

import pytest
import torch
from conftest import REPO, tiny_settings, write_byte_data
from torch.nn.attention import SDPBackend, sdpa_kernel

import train
from fa4 import fa4_causal_attention
from model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_sla_model(**overrides) -> GPT:
    torch.manual_seed(0)
    args = dict(block_size=2048, n_layer=12, n_head=12, n_embd=768, bias=False, sla=True, sla_skip=9)
    args.update(overrides)
    return GPT(GPTConfig(**args)).cuda().eval()


@pytest.mark.parametrize("sla_skip", [9, 1])
def test_flash_bf16_matches_float32_math(sla_skip):
    model = small_sla_model(sla_skip=sla_skip)
    idx = torch.randint(0, 50257, (2, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH):
            reference, _ = model(idx, idx)
        # only the flash backend is allowed here: if it could not run these inputs, SDPA would raise
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
            flash, _ = model(idx, idx)
    relative_error = ((flash.float() - reference).norm() / reference.norm()).item()
    print(f"sla_skip={sla_skip}: flash bf16 vs float32 math, relative error {relative_error:.2e}")
    assert relative_error < 1e-2


@pytest.mark.parametrize("sla_skip", [9, 1])
def test_flash_bf16_gradients_match_float32_math(sla_skip):
    """Training goes through the recomputed mixed K/V (selective checkpointing) and the flash backward."""
    idx = torch.randint(0, 50257, (2, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    grads = []
    for backend, dtype in ((SDPBackend.MATH, torch.float32), (SDPBackend.FLASH_ATTENTION, torch.bfloat16)):
        model = small_sla_model(sla_skip=sla_skip).train()
        with sdpa_kernel(backend), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(idx, idx, return_logits=False)
            loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    relative_error = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    print(f"sla_skip={sla_skip}: flash bf16 vs float32 math gradients, relative error {relative_error:.2e}")
    assert relative_error < 5e-2


def test_chunked_loss_matches_full_logits_in_bf16():
    """The memory-lean loss against the whole-logits loss in bf16, forward and backward: 4096 rows in chunks of
    1000 (a ragged last one of 96), ignored targets, weights trained a few steps away from the uniform
    initialisation, and an upstream gradient other than 1."""
    model = small_sla_model().train()
    idx = torch.randint(0, 50257, (2, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    targets = idx.roll(-1, dims=1)
    targets[:, -100:] = -1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.loss_chunk = 1000
    losses, grads = [], []
    for return_logits in (True, False):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, targets, return_logits=return_logits)
        (2.5 * loss).backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    relative_error = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    print(f"bf16 loss: full {losses[0]:.5f}, chunked {losses[1]:.5f}; gradients relative error {relative_error:.2e}")
    assert losses[0] < 10.0  # trained: no longer ln(50304) = 10.8
    assert abs(losses[1] - losses[0]) < 1e-3 * losses[0]
    assert relative_error < 2e-2


def test_compiled_sla_trains_without_graph_breaks():
    import torch._dynamo

    model = small_sla_model(block_size=1024).train()
    idx = torch.randint(0, 50257, (2, 1024), device="cuda")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(idx, idx, return_logits=False)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = compiled(idx, idx, return_logits=False)
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad is not None


@torch.no_grad()
def teacher_forced_decode_logits(model: GPT, tokens, prompt_len: int):
    """The logits predicting tokens[:, prompt_len:] one by one: the prefill, then one decode step per token."""
    cache = model.kv_cache_for(tokens)
    steps = [model.prefill(tokens[:, :prompt_len], cache)]
    for position in range(prompt_len, tokens.size(1) - 1):
        # a token of generate's strides (other strides would compile the step anew) at its position
        token = tokens[:, position : position + 1].clone(memory_format=torch.contiguous_format)
        input_pos = torch.tensor([position], device=tokens.device)
        # generate's per-token function (compiled by compile_decode_step), greedy; clone: a CUDA graph's output is
        # overwritten by its next replay
        steps.append(model.decode_token(token, input_pos, cache, 0.0)[1].clone())
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("sla_skip", [None, 9, 1])
def test_static_cache_decode_matches_recomputation_in_bf16(sla_skip):
    model = small_sla_model(block_size=1024, sla=sla_skip is not None, sla_skip=sla_skip or 9)
    tokens = torch.randint(0, 50257, (1, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        stepped = teacher_forced_decode_logits(model, tokens, prompt_len=37)
        full, _ = model(tokens, tokens)  # every position's logits, without a cache
    reference = full[:, 36:63].float()
    relative_error = ((stepped - reference).norm() / reference.norm()).item()
    print(f"sla_skip={sla_skip}: static-cache decode vs recomputation, bf16, relative error {relative_error:.2e}")
    assert relative_error < 1e-2

    # greedy decoding picks, at each of its first tokens, the recomputation's argmax (or a tie within bf16 noise)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        generated = model.generate(tokens[:, :37], 8, temperature=0)
        recomputed, _ = model(generated[:, :-1], generated[:, 1:])
    recomputed = recomputed[0, 36:].float()
    picked = recomputed.gather(1, generated[0, 37:, None]).squeeze(1)
    assert (recomputed.max(dim=1).values - picked <= 0.02 * recomputed.std()).all()


def test_sampling_draws_what_multinomial_draws_on_cuda():
    """generate's sampler against torch.multinomial with a CUDA generator: the same tokens and generator state."""
    from model import multinomial_noise, sample_next_token

    logits = torch.randn((2, 50304), device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 3
    ours, theirs = torch.Generator("cuda").manual_seed(5), torch.Generator("cuda").manual_seed(5)
    for _ in range(100):
        token = sample_next_token(logits, 0.8, 200, multinomial_noise(2, 50304, "cuda", ours))
        scaled = logits / 0.8
        kth = torch.topk(scaled, 200).values[:, [-1]]
        probs = torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), dim=-1)
        assert torch.equal(token, torch.multinomial(probs, num_samples=1, generator=theirs))
    assert torch.equal(ours.get_state(), theirs.get_state())


def test_decode_step_compiles_once_to_a_cuda_graph_and_matches_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = small_sla_model(block_size=1024)
    tokens = torch.randint(0, 50257, (1, 80), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = teacher_forced_decode_logits(model, tokens, prompt_len=37)
        model.compile_decode_step()
        compiled = teacher_forced_decode_logits(model, tokens, prompt_len=37)
        compiled_again = teacher_forced_decode_logits(model, tokens[:, 20:], prompt_len=41)  # a new prompt length
        model.generate(tokens[:, :53], 16, temperature=0)
    relative_error = ((compiled - eager).norm() / eager.norm()).item()
    print(f"compiled vs eager decode step, bf16, relative error {relative_error:.2e}")
    assert relative_error < 1e-2 and compiled_again.isfinite().all()
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every prompt length
    assert counters["inductor"]["cudagraph_skips"] == 0  # it runs as a CUDA graph, cache writes included
    torch._dynamo.reset()


def test_bench_peak_memory_counts_the_cuda_graph_pool():
    """Under reduce-overhead a replayed step allocates nothing: the row's peak must still hold its activations."""
    import bench

    shape = dict(shapes=("small:1024:4",), sla_skips=(), warmup_steps=3, rounds=1, block_steps=3, decode_tokens=0)
    modes = ("default", "reduce-overhead")
    default, graphs = (bench.main(bench.BenchConfig(**shape, compile=True, compile_mode=mode))[0] for mode in modes)
    print(f"peak GiB: default {default['peak_mem_gib']:.2f}, reduce-overhead {graphs['peak_mem_gib']:.2f}")
    assert default["step_mem_gib"] > 1.0  # 4 windows of 1024 tokens: GiBs of activations and logits
    assert graphs["step_mem_gib"] > 0.5 * default["step_mem_gib"]
    torch._dynamo.reset()


def fa4_or_skip():
    """FA4's kernels, or a skip: they need the flash-attn-4 package and a Hopper or Blackwell GPU."""
    pytest.importorskip("flash_attn.cute", reason="needs the flash-attn-4 package")
    if torch.cuda.get_device_capability()[0] not in (9, 10, 11):
        pytest.skip("FA4 is tested on Hopper and Blackwell GPUs")


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("sla", [False, True])
def test_fa4_attention_matches_flash_sdpa_in_bf16(sla, compiled):
    """attention="fa4" (FlashAttention-4's kernels as custom operators) against SDPA's flash kernel, plain and SLA
    skip 9, bf16, forward and backward, eager and compiled."""
    fa4_or_skip()
    idx = torch.randint(0, 50257, (2, 2049), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses, grads = [], []
    for attention in ("sdpa", "fa4"):
        model = small_sla_model(sla=sla, attention=attention).train()
        forward = torch.compile(model) if compiled else model
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = forward(idx[:, :-1], idx[:, 1:], return_logits=False)
            loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    relative_error = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    print(
        f"fa4 vs flash SDPA, bf16, sla={sla}, compiled={compiled}: losses {losses}, gradients' relative error "
        f"{relative_error:.2e}"
    )
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    assert relative_error < 5e-2


def bf16_training_step(model, idx):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx[:, :-1], idx[:, 1:], return_logits=False)
    loss.backward()
    torch.cuda.synchronize()


def test_fa4_runs_an_sla_layers_two_head_groups_on_two_streams():
    """An SLA model's FA4 kernels, forward and backward, run on two CUDA streams (fa4._side_by_side), a plain model's
    on one: FA4 launches on PyTorch's current stream, which fa4.py's stream order (tested on the CPU) relies on."""
    fa4_or_skip()
    idx = torch.randint(0, 50257, (1, 1025), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    streams = {}
    for sla in (False, True):
        model = small_sla_model(sla=sla, attention="fa4").train()
        bf16_training_step(model, idx)  # FA4 compiles its kernels
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            bf16_training_step(model, idx)
        kernels = [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
        streams[sla] = {event.device_resource_id for event in kernels if "flash" in event.name}
    print(f"streams of FA4's kernels: plain {streams[False]}, SLA {streams[True]}")
    assert len(streams[False]) == 1 and len(streams[True]) == 2


@pytest.mark.parametrize("compiled", [False, True])
def test_train_py_trains_with_fa4(tmp_path, monkeypatch, compiled):
    """train.py --attention=fa4 on a tiny SLA model (head_dim 64, bf16): its model is routed through FA4, and its
    training and validation losses follow an SDPA run of the same settings."""
    fa4_or_skip()
    # byte-level text that every checkout has: the repository's own sources
    data_dir = write_byte_data(tmp_path / "data", [path.read_text() for path in sorted(REPO.glob("*.py"))])
    built, build_model = [], train.build_model  # the models train.py builds

    def recording_build_model(*args, **kwargs):
        built.append(build_model(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train, "build_model", recording_build_model)
    summaries = {}
    for attention in ("sdpa", "fa4"):
        settings = tiny_settings(
            data_dir, tmp_path / attention, device="cuda", dtype="bfloat16", n_head=2, n_embd=128, sla=True,
            sla_skip=1, compile=compiled, attention=attention,
        )  # fmt: skip
        summaries[attention] = train.main(train.TrainConfig(**settings))
    sdpa_model, fa4_model = built
    assert all(block.attn.causal_attention is None for block in sdpa_model.transformer.h)
    assert all(block.attn.causal_attention is fa4_causal_attention for block in fa4_model.transformer.h)
    sdpa, fa4 = summaries["sdpa"], summaries["fa4"]
    print(f"compiled={compiled}: val losses sdpa {sdpa['val_losses']}, fa4 {fa4['val_losses']}")
    assert fa4["iter_num"] == sdpa["iter_num"] == settings["max_iters"]
    assert fa4["train_loss"] == pytest.approx(sdpa["train_loss"], rel=1e-2)
    assert fa4["val_losses"][64] == pytest.approx(sdpa["val_losses"][64], rel=1e-2)
    assert fa4["val_losses"][64] < math.log(257)  # it learnt: below a uniform guess over the byte vocabulary


def read_losses(out_dir) -> dict:
    lines = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {(line["iter"], key): value for line in lines for key, value in line.items() if "loss" in key}


def test_train_py_with_cuda_graphs_and_a_compiled_optimizer_evaluates_and_resumes(tmp_path):
    """train.py at its fastest settings (compile_mode=reduce-overhead, compile_optimizer, attention=auto: FA4 where
    installed): it evaluates between CUDA-graph steps, and a run stopped at a checkpoint and resumed (the graphs
    recorded anew, the compiled optimizer step given the saved state) logs the uninterrupted run's losses."""
    data_dir = write_byte_data(tmp_path / "data", [path.read_text() for path in sorted(REPO.glob("*.py"))])
    fastest = tiny_settings(
        data_dir, tmp_path / "reference", device="cuda", dtype="bfloat16", n_head=2, n_embd=128, sla=True, sla_skip=1,
        gradient_accumulation_steps=1, batch_size=8, max_iters=6, eval_interval=3, compile=True,
        compile_mode="reduce-overhead", compile_optimizer=True,
    )  # fmt: skip
    train.main(train.TrainConfig(**fastest))
    torch._dynamo.reset()
    interrupted = {**fastest, "out_dir": str(tmp_path / "resumed"), "max_iters": 3}
    train.main(train.TrainConfig(**interrupted))
    torch._dynamo.reset()
    train.main(train.TrainConfig(**{**interrupted, "init_from": "resume", "max_iters": 6}))
    torch._dynamo.reset()
    reference, resumed = read_losses(tmp_path / "reference"), read_losses(tmp_path / "resumed")
    print(f"reference {reference}\nresumed {resumed}")
    assert resumed.keys() == reference.keys() and (6, "val/loss@64") in reference
    for key, value in reference.items():
        assert math.isfinite(value) and resumed[key] == pytest.approx(value, rel=2e-3), key
    assert reference[(6, "val/loss@64")] < math.log(257)  # it learnt


@pytest.mark.parametrize("compile_optimizer", [False, True])
def test_a_training_step_returns_while_the_device_is_still_busy(compile_optimizer):
    """make_train_step's step queues its forward, backward and optimizer step and returns without waiting for the
    device (only for the step before's loss): a blocking copy or a read of a device value inside it would hold the host
    until the queued work is done, leaving the device idle while the host launches the rest. A one-second kernel
    queued ahead of the step must still be running when the step returns."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64, sla=True, sla_skip=1)).cuda()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda", for_compile=compile_optimizer)
    batch = torch.randint(0, 256, (4, 65), device="cuda")
    batches = iter(lambda: (batch[:, :-1], batch[:, 1:]), None)
    step = train.make_train_step(
        model, lambda x, y: model(x, y, return_logits=False)[1], optimizer, batches, grad_clip=1.0,
        autocast=torch.autocast("cuda", dtype=torch.bfloat16), compile_optimizer=compile_optimizer,
    )  # fmt: skip
    for _ in range(3):  # compilation and the first steps' allocations
        step()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of one busy kernel: its clock cycles at 1.5-2 GHz
    outcome = step(stop_requested=True)
    still_busy = not torch.cuda.current_stream().query()
    assert still_busy, "the training step waited for the device"
    assert outcome.wait().stop is True and math.isfinite(outcome.loss)
