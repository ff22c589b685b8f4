"""Generation with the static KV cache: the same tokens as recomputing every step without a cache, SLA's smaller
cache, and a decode step that compiles once for every prompt length."""

import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig, KVCache, multinomial_noise, sample_next_token


def tiny_model(seed=0, **overrides) -> GPT:
    args = dict(block_size=24, vocab_size=61, n_layer=4, n_head=4, n_embd=32, bias=True)
    args.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # random biases and LayerNorm parameters, so that none hides behind zeros and ones
                param.add_(torch.randn_like(param) * 0.1)
            else:  # sharp attention and logits: the initial 0.02 gives near-uniform ones, which hide wrong K/V
                param.mul_(10)
    return model.eval()


@torch.no_grad()
def generate_without_cache(model: GPT, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """The reference: a full forward pass over the last block_size tokens for every new token, sampled as
    generate has always sampled (the same random draws for the same seed)."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size :])
        logits = logits[:, -1, :].float()
        if temperature == 0:
            idx_next = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def seed(value):
    return torch.Generator().manual_seed(value)


MODELS = [
    dict(sla=False),
    dict(sla=True, sla_skip=1),
    dict(sla=True, sla_skip=2),
    dict(sla=True, sla_skip=3),  # layer 3 reads layer 0; layers 1 and 2 are read by nobody's skip heads
    dict(sla=True, sla_skip=1, sla_head_ratio=1.0),  # every head of layers 1.. skips
    dict(sla=True, sla_skip=4, n_layer=6, sla_head_ratio=0.5),
]
SAMPLING = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=5)]


@pytest.mark.parametrize("model_args", MODELS, ids=lambda args: "-".join(f"{k}={v}" for k, v in args.items()))
def test_generate_matches_recomputation_without_cache(model_args):
    model = tiny_model(**model_args)
    block_size = model.config.block_size
    # 30 new tokens: every prompt outgrows block_size (24), after which each step prefills the last 24 anew
    for prompt_len in (1, 7, block_size - 1, block_size, block_size + 6):
        prompt = torch.randint(0, 61, (2, prompt_len), generator=seed(prompt_len))
        for sampling in SAMPLING:
            cached = model.generate(prompt, 30, **sampling, generator=seed(3))
            expected = generate_without_cache(model, prompt, 30, **sampling, generator=seed(3))
            assert torch.equal(cached, expected), (prompt_len, sampling)
    assert model.kv_cache is not None and model.kv_cache.keys[0].shape[:2] == (2, block_size)


def test_same_seed_same_tokens_and_no_new_tokens():
    model = tiny_model(sla=True, sla_skip=1)
    prompt = torch.zeros((1, 3), dtype=torch.long)
    first = model.generate(prompt, 12, temperature=1.0, top_k=5, generator=seed(7))
    assert torch.equal(model.generate(prompt, 12, temperature=1.0, top_k=5, generator=seed(7)), first)
    assert not torch.equal(model.generate(prompt, 12, temperature=1.0, top_k=5, generator=seed(8)), first)
    assert torch.equal(model.generate(prompt, 0), prompt)


def heads_read(config: GPTConfig) -> int:
    """(layer, head) pairs of own K/V that some layer reads, counted from the definition of SLA."""
    read = set()
    for layer in range(config.n_layer):
        source = config.skip_source(layer)
        for head in range(config.n_head):
            borrowed = source is not None and head < config.n_skip_heads
            read.add((source, head) if borrowed else (layer, head))
    return len(read)


@pytest.mark.parametrize(
    "args",
    [
        dict(),
        dict(sla=True),
        dict(sla=True, sla_skip=1),
        dict(sla=True, sla_skip=4),
        dict(sla=True, sla_skip=6),
        dict(sla=True, sla_skip=11, sla_head_ratio=0.5),
        dict(sla=True, sla_skip=12),  # no layer skips: as plain
        dict(sla=True, sla_head_ratio=1.0, sla_skip=3),
        dict(sla=True, n_layer=24, n_head=16, n_embd=1024),
    ],
)
def test_kv_cache_bytes_per_token_counts_the_heads_some_layer_reads(args):
    config = GPTConfig(**args)
    head_bytes = 2 * (config.n_embd // config.n_head) * 2  # K and V of one head and token, in bfloat16
    assert config.kv_cache_bytes_per_token(torch.bfloat16) == heads_read(config) * head_bytes
    assert config.kv_cache_bytes_per_token(torch.float32) == 2 * config.kv_cache_bytes_per_token(torch.bfloat16)


def test_sla_defaults_cache_117_of_144_head_caches():
    plain, sla = GPTConfig(), GPTConfig(sla=True)
    assert plain.kv_cache_bytes_per_token(torch.bfloat16) == 12 * 2 * 768 * 2  # 36,864 bytes: GPT-2 small
    assert sla.kv_cache_bytes_per_token(torch.bfloat16) / plain.kv_cache_bytes_per_token(torch.bfloat16) == 117 / 144
    # layers 9-11 skip to layers 0-2; their own K/V of heads 0-8 would be read by layers 18-20, which do not exist
    assert [sla.first_cached_head(layer) for layer in range(12)] == [0] * 9 + [9] * 3
    assert [GPTConfig(sla=True, sla_skip=1).first_cached_head(layer) for layer in range(12)] == [0] * 11 + [9]


@pytest.mark.parametrize("args", [dict(), dict(sla=True, sla_skip=1), dict(sla=True, sla_skip=3)])
def test_cache_buffers_hold_what_the_config_reports(args):
    model = tiny_model(**args)
    model.generate(torch.zeros((1, 2), dtype=torch.long), 3)
    cache = model.kv_cache
    assert cache.bytes_per_token() == model.config.kv_cache_bytes_per_token(torch.float32)
    allocated = sum(buffer.nbytes for buffer in cache.keys + cache.values)
    assert allocated == model.config.block_size * model.config.kv_cache_bytes_per_token(torch.float32)
    bf16 = KVCache(model.config, batch_size=1, device="cpu", dtype=torch.bfloat16)
    assert bf16.bytes_per_token() == model.config.kv_cache_bytes_per_token(torch.bfloat16)


def test_cache_is_kept_for_the_same_batch_and_remade_for_another():
    model = tiny_model(sla=True, sla_skip=1)
    model.generate(torch.zeros((1, 5), dtype=torch.long), 4)
    cache = model.kv_cache
    model.generate(torch.zeros((1, 11), dtype=torch.long), 4)
    assert model.kv_cache is cache  # a new prompt length: the same buffers
    model.generate(torch.zeros((3, 5), dtype=torch.long), 4)
    assert model.kv_cache is not cache and model.kv_cache.keys[0].size(0) == 3


def test_cache_takes_autocast_dtype():
    model = tiny_model(sla=True, sla_skip=1)
    prompt = torch.randint(0, 61, (1, 6), generator=seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.generate(prompt, 5, temperature=0)
        expected = generate_without_cache(model, prompt, 1, temperature=0)
    assert all(buffer.dtype == torch.bfloat16 for buffer in model.kv_cache.keys + model.kv_cache.values)
    assert torch.equal(tokens[:, :7], expected)  # the first new token comes from the prefill: the forward pass's


def test_compiled_decode_step_is_one_graph_per_sampling_for_every_prompt_and_gives_the_same_tokens():
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    model = tiny_model(sla=True, sla_skip=2)
    prompts = {n: torch.arange(n).view(1, n) % 61 for n in (1, 5, 13, 24)}
    greedy = {n: model.generate(prompt, 30, temperature=0) for n, prompt in prompts.items()}
    model.compile_decode_step(backend=counting_backend)  # fullgraph: a graph break would raise
    for n, prompt in prompts.items():  # prompt lengths, and sequences that outgrow block_size
        assert torch.equal(model.generate(prompt, 30, temperature=0), greedy[n])
    assert torch.equal(model.generate(prompts[5], 30, temperature=0.0), greedy[5])  # 0.0 is 0: the same graph
    assert len(graphs) == 1
    for n, prompt in prompts.items():  # sampling runs inside the graph; the random numbers come from outside
        for sampling in SAMPLING[1:]:
            sampled = model.generate(prompt, 30, **sampling, generator=seed(n))
            assert torch.equal(sampled, generate_without_cache(model, prompt, 30, **sampling, generator=seed(n)))
    assert len(graphs) == 3  # one per sampling setting: temperature and top_k are constants of the graph
    torch._dynamo.reset()


@pytest.mark.parametrize("model_args", [dict(sla=True, sla_skip=1), dict(sla=True, sla_skip=2, sla_head_ratio=0.5)])
def test_decoding_without_the_unread_kv_gives_the_same_tokens_with_less_work(model_args):
    """Prefill and decode steps leave out the K/V nobody reads (GPTConfig.skip_unread_kv): the same greedy
    tokens as computing them, eager and compiled, and a decode step with that much less matmul work."""
    from torch.utils.flop_counter import FlopCounterMode

    prompt = torch.randint(0, 61, (2, 5), generator=seed(0))
    tokens, step_flops = {}, {}
    for skip_unread_kv in (False, True):
        model = tiny_model(**model_args, skip_unread_kv=skip_unread_kv)  # the same weights: the seed's
        tokens[skip_unread_kv] = model.generate(prompt, 25, temperature=0)  # past block_size (24): prefills again
        with FlopCounterMode(display=False) as counter:
            model.decode_step(tokens[skip_unread_kv][:, -1:], torch.tensor([10]), model.kv_cache)
        step_flops[skip_unread_kv] = counter.get_total_flops()
    assert torch.equal(tokens[True], tokens[False])
    cfg = model.config
    unread_kv_columns = sum(2 * cfg.first_cached_head(layer) * 8 for layer in range(cfg.n_layer))  # heads of 8
    assert unread_kv_columns > 0 and step_flops[False] - step_flops[True] == 2 * 2 * 32 * unread_kv_columns
    torch._dynamo.reset()
    model.compile_decode_step(backend="eager")  # fullgraph: a graph break would raise
    assert torch.equal(model.generate(prompt, 25, temperature=0), tokens[True])
    torch._dynamo.reset()


def test_compiled_decode_step_with_inductor_matches_eager():
    """What sample.py --compile runs on a CPU (C++ code generation; on CUDA the same with CUDA graphs)."""
    torch._dynamo.reset()
    model = tiny_model(sla=True, sla_skip=1)
    prompt = torch.randint(0, 61, (1, 4), generator=seed(0))
    expected = model.generate(prompt, 8, temperature=0)
    expected_sampled = model.generate(prompt, 8, temperature=0.8, top_k=5, generator=seed(1))
    model.compile_decode_step()
    assert torch.equal(model.generate(prompt, 8, temperature=0), expected)
    assert torch.equal(model.generate(prompt, 8, temperature=0.8, top_k=5, generator=seed(1)), expected_sampled)
    torch._dynamo.reset()


def test_frozen_decode_step_gives_the_same_tokens_and_keeps_the_weights_it_compiled_with():
    """freeze_weights under bf16 autocast, as sample.py and bench.py decode on a GPU: the weights and their bf16
    casts become constants of the compiled step, the tokens stay those of the unfrozen step, and a later change to
    the weights reaches only a step that is not frozen."""
    with pytest.raises(ValueError, match="freeze_weights: needs the inductor backend"):
        tiny_model().compile_decode_step(backend="eager", freeze_weights=True)
    prompt = torch.randint(0, 61, (1, 4), generator=seed(0))
    runs = {}
    for freeze_weights in (False, True):
        torch._dynamo.reset()
        model = tiny_model(sla=True, sla_skip=1)
        model.compile_decode_step(freeze_weights=freeze_weights)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            greedy = model.generate(prompt, 12, temperature=0)
            sampled = model.generate(prompt, 12, temperature=0.8, top_k=5, generator=seed(1))
        with torch.no_grad():  # outside autocast, whose cache of cast weights ends with its context
            for block in model.transformer.h:
                block.mlp.c_fc.weight.mul_(-3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            changed = model.generate(prompt, 12, temperature=0)
        runs[freeze_weights] = greedy, sampled, changed
    assert torch.equal(runs[True][0], runs[False][0]) and torch.equal(runs[True][1], runs[False][1])
    assert not torch.equal(runs[False][2], runs[False][0])  # the unfrozen step decodes with the changed weights
    assert not torch.equal(runs[True][2], runs[False][2])  # the frozen one with those it compiled with
    torch._dynamo.reset()


@pytest.mark.parametrize("vocab_size", [7, 61, 50304])
@pytest.mark.parametrize(
    "sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=5), dict(temperature=2.0, top_k=1)]
)
def test_sampling_draws_what_multinomial_draws_from_the_same_generator(vocab_size, sampling):
    """generate's sampler against torch.multinomial, the way tokens were drawn before: the same token for the same
    seed, and the generator left in the same state (so the next draws agree too)."""
    logits = torch.randn((3, vocab_size), generator=seed(vocab_size)) * 3
    ours, theirs = seed(11), seed(11)
    for _ in range(50):
        noise = multinomial_noise(3, vocab_size, "cpu", ours)
        token = sample_next_token(logits, **sampling, noise=noise)
        scaled = logits / sampling["temperature"]
        if sampling.get("top_k"):
            kth = torch.topk(scaled, min(sampling["top_k"], vocab_size)).values[:, [-1]]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        assert torch.equal(token, torch.multinomial(F.softmax(scaled, dim=-1), num_samples=1, generator=theirs))
    assert torch.equal(ours.get_state(), theirs.get_state())
    if sampling.get("top_k") == 1:  # top_k 1 is the argmax whatever the noise
        assert torch.equal(token, logits.argmax(dim=-1, keepdim=True))


def test_generate_writes_tokens_once_into_one_tensor_and_never_waits_for_the_device(monkeypatch):
    """The tokens go into one tensor allocated up front (no torch.cat per token), and nothing in the loop reads a
    value back from the device (.item(), .tolist(), bool(tensor)): each would stall the host once per token."""
    model = tiny_model(sla=True, sla_skip=1)
    prompt = torch.randint(0, 61, (2, 5), generator=seed(0))
    expected = generate_without_cache(model, prompt, 12, temperature=0.8, top_k=5, generator=seed(2))

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"generate called {name}")

        return fail

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    concatenate = torch.cat

    def cat_of_floats_only(tensors, *args, **kwargs):  # SLA concatenates K/V heads; token ids are never concatenated
        if not tensors[0].is_floating_point():
            raise AssertionError("generate concatenated token ids")
        return concatenate(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", cat_of_floats_only)
    monkeypatch.setattr(torch, "multinomial", forbidden("torch.multinomial"))
    tokens = model.generate(prompt, 12, temperature=0.8, top_k=5, generator=seed(2))
    monkeypatch.undo()
    assert torch.equal(tokens, expected)


def test_prompts_leave_out_cudnn_attention_but_keep_a_forced_backend():
    """cuDNN builds an attention plan per new sequence length: prompts run on the other enabled backends."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import model as model_module

    backends = torch.backends.cuda
    with model_module._sdpa_without_cudnn():
        assert not backends.cudnn_sdp_enabled() and backends.flash_sdp_enabled() and backends.math_sdp_enabled()
    with sdpa_kernel(SDPBackend.MATH), model_module._sdpa_without_cudnn():  # what the user forced stays forced
        assert backends.math_sdp_enabled() and not backends.flash_sdp_enabled() and not backends.cudnn_sdp_enabled()
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), model_module._sdpa_without_cudnn():  # cuDNN alone: cuDNN it is
        assert backends.cudnn_sdp_enabled() and not backends.math_sdp_enabled()
