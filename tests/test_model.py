"""model.py against an independent float64 reference, plus causality, gradients, caching, loading, and config checks."""

import gc
import math

import pytest
import torch
from conftest import random_hf_gpt2
from torch.nn import functional as F

from model import GPT, GPTConfig, KVCache


def tiny_config(**overrides) -> GPTConfig:
    args = dict(block_size=24, vocab_size=61, n_layer=4, n_head=4, n_embd=32, dropout=0.0, bias=True)
    args.update(overrides)
    return GPTConfig(**args)


def make_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides))
    # random biases and LayerNorm gains too, so that a misplaced one cannot hide behind zeros and ones
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.normal_(mean=1.0 if name.endswith("ln_1.weight") else 0.0, std=0.1)
    return model.eval()


def reference_logits(model: GPT, idx: torch.Tensor, sla: bool, head_ratio: float, skip: int) -> torch.Tensor:
    """The SLA definition written out naively in float64: explicit loops over layers, heads and positions."""
    cfg = model.config
    w = {name: p.double() for name, p in model.named_parameters()}  # differentiable: gradients are checked too
    n_head, head_dim, C = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_embd
    n_skip = round(head_ratio * n_head) if sla else 0

    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * w[prefix + ".weight"] + w[prefix + ".bias"]

    def linear(x, prefix):
        return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    T = idx.size(1)
    x = w["transformer.wte.weight"][idx] + w["transformer.wpe.weight"][:T]
    own_keys, own_values = [], []
    for layer in range(cfg.n_layer):
        p = f"transformer.h.{layer}."
        qkv = linear(layer_norm(x, p + "ln_1"), p + "attn.c_attn")
        q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
        own_keys.append(k)
        own_values.append(v)
        heads = []
        for h in range(n_head):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            source = layer - skip if (h < n_skip and layer >= skip) else layer
            q_h, k_h, v_h = q[..., cols], own_keys[source][..., cols], own_values[source][..., cols]
            out = torch.zeros_like(q_h)
            for t in range(T):  # position t attends to positions 0..t
                scores = (k_h[:, : t + 1] @ q_h[:, t].unsqueeze(-1)).squeeze(-1) / math.sqrt(head_dim)
                out[:, t] = (torch.softmax(scores, dim=-1).unsqueeze(-1) * v_h[:, : t + 1]).sum(1)
            heads.append(out)
        x = x + linear(torch.cat(heads, dim=-1), p + "attn.c_proj")
        x = x + linear(gelu_tanh(linear(layer_norm(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return layer_norm(x, "transformer.ln_f") @ w["transformer.wte.weight"].T


@pytest.mark.parametrize(
    "sla, head_ratio, skip",
    [
        (False, 0.75, 1),
        (True, 0.75, 1),
        (True, 0.5, 2),
        (True, 0.25, 3),
        (True, 1.0, 1),
        (True, 0.0, 1),  # no skip heads: plain GPT-2
        (True, 0.75, 4),  # skip >= n_layer: plain GPT-2
        (True, 0.6, 2),  # round(0.6 * 4) = 2 skip heads
    ],
)
def test_logits_match_naive_float64_reference(sla, head_ratio, skip):
    model = make_model(sla=sla, sla_head_ratio=head_ratio, sla_skip=skip).double()
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    logits, _ = model(idx, targets)
    expected = reference_logits(model, idx, sla, head_ratio, skip)
    assert (logits - expected).norm() / expected.norm() < 1e-7
    last_logits, loss = model(idx)
    assert loss is None and torch.allclose(last_logits[:, 0], expected[:, -1], rtol=0, atol=1e-9)


def test_no_skip_settings_equal_plain_model():
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    plain, _ = make_model(sla=False)(idx, idx)
    for overrides in (dict(sla_head_ratio=0.0), dict(sla_skip=4), dict(sla_skip=9)):
        logits, _ = make_model(sla=True, **overrides)(idx, idx)
        assert torch.equal(logits, plain)


def test_sla_changes_outputs_on_the_same_weights():
    plain = make_model(sla=False)
    sla = make_model(sla=True, sla_head_ratio=0.75, sla_skip=2)
    sla.load_state_dict(plain.state_dict())  # same parameter names and shapes
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    logits_plain, _ = plain(idx, idx)
    logits_sla, _ = sla(idx, idx)
    assert (logits_plain - logits_sla).abs().max() > 1e-3


@pytest.mark.parametrize("sla", [False, True])
def test_causal(sla):
    model = make_model(sla=sla, sla_skip=1)
    idx = torch.randint(0, 61, (1, 24), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 61
    before, _ = model(idx, idx)
    after, _ = model(changed, idx)
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:], atol=1e-3)


def test_skip_head_gradient_reaches_source_layer_key_value_weights():
    model = make_model(sla=True, sla_head_ratio=0.5, sla_skip=2).train()
    cfg = model.config
    C, head_dim, n_skip = cfg.n_embd, cfg.n_embd // cfg.n_head, cfg.n_skip_heads
    source, reader = model.transformer.h[0].attn, model.transformer.h[2].attn
    _, source_kv = source(torch.randn(2, 16, C, generator=torch.Generator().manual_seed(0)))
    # what each head wrote, before c_proj mixes heads: c_proj's input
    captured = {}
    handle = reader.c_proj.register_forward_hook(lambda module, inputs, output: captured.setdefault("y", inputs[0]))
    reader(torch.randn(2, 16, C, generator=torch.Generator().manual_seed(1)), skip_kv=source_kv)
    handle.remove()
    captured["y"][..., : n_skip * head_dim].square().sum().backward()  # the skip heads' outputs only

    def rows_grad(weight_grad, part, heads):  # part 0/1/2 = q/k/v rows of c_attn, heads a slice
        return weight_grad[part * C + heads.start * head_dim : part * C + heads.stop * head_dim]

    skip_heads, own_heads = slice(0, n_skip), slice(n_skip, cfg.n_head)
    src_grad, reader_grad = source.c_attn.weight.grad, reader.c_attn.weight.grad
    assert rows_grad(src_grad, 1, skip_heads).abs().sum() > 0  # source keys of the skip heads
    assert rows_grad(src_grad, 2, skip_heads).abs().sum() > 0  # source values of the skip heads
    assert rows_grad(src_grad, 0, skip_heads).abs().sum() == 0  # source queries are not used by the reader
    assert rows_grad(reader_grad, 0, skip_heads).abs().sum() > 0  # the reader's own queries
    assert rows_grad(reader_grad, 1, skip_heads).abs().sum() == 0  # the reader's own K/V of skip heads: unused
    assert rows_grad(reader_grad, 2, skip_heads).abs().sum() == 0
    assert rows_grad(reader_grad, 1, own_heads).abs().sum() == 0  # other heads' outputs were not in the loss


def test_borrowed_kv_is_never_passed_on():
    """Layer 4 reads layer 2's own K/V, not the K/V that layer 2 borrowed from layer 0."""
    cfg = tiny_config(n_layer=6, sla=True, sla_head_ratio=0.5, sla_skip=2)
    torch.manual_seed(0)
    model = GPT(cfg).double().eval()
    idx = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(0))
    logits, _ = model(idx, idx)
    expected = reference_logits(model, idx, True, 0.5, 2)
    assert (logits - expected).norm() / expected.norm() < 1e-7


@pytest.mark.parametrize("skip", [1, 2])
def test_gradients_match_naive_float64_reference(skip):
    """SLA layers rebuild their mixed K/V in backward instead of keeping them; every gradient must stay exact."""
    model = make_model(sla=True, sla_skip=skip).double().train()
    idx = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)
    _, loss = model(idx, targets)
    loss.backward()
    params = dict(model.named_parameters())
    expected_loss = F.cross_entropy(reference_logits(model, idx, True, 0.75, skip).flatten(0, 1), targets.flatten())
    expected = torch.autograd.grad(expected_loss, list(params.values()))
    for (name, param), grad in zip(params.items(), expected, strict=True):
        assert (param.grad - grad).norm() <= 1e-6 * grad.norm() + 1e-12, name


def storage_bytes_alive_after_forward(model: GPT, idx: torch.Tensor, compiled: bool) -> int:
    """Bytes of the tensors that the forward pass leaves alive for backward (unique storages)."""
    held = {}
    if compiled:
        # a compiled graph hands its activations to autograd as saved tensors, one by one
        def pack(tensor):
            held[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            _, loss = torch.compile(model)(idx, idx, return_logits=False)
        assert loss.grad_fn is not None
        return sum(held.values())

    # eager: every tensor an operator makes, kept as a weak reference; those still alive are held for backward
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOutputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in torch.utils._pytree.tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    held.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
            return out

    with RecordOutputs():
        _, loss = model(idx, idx, return_logits=False)
    gc.collect()
    assert loss.grad_fn is not None  # the graph, and with it what it saved, is alive
    return sum(nbytes for ref, nbytes in held.values() if not ref.expired())


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("recompute", [True, False])
def test_sla_holds_no_more_activations_than_plain(compiled, recompute):
    """The memory target: the concatenated K/V of SLA layers are recomputed in backward, not kept. Exactly
    plain's bytes while every layer computes all its K/V; less where layer 3 leaves out the K/V nobody reads."""
    torch._dynamo.reset()
    idx = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = make_model(sla_skip=1, recompute_mixed_kv=recompute).train()
    plain_bytes = storage_bytes_alive_after_forward(plain, idx, compiled)
    sla_bytes = {}
    for skip_unread_kv in (False, True):
        sla = make_model(sla=True, sla_skip=1, recompute_mixed_kv=recompute, skip_unread_kv=skip_unread_kv).train()
        sla_bytes[skip_unread_kv] = storage_bytes_alive_after_forward(sla, idx, compiled)
    mixed_kv_bytes = 3 * 2 * idx.numel() * 32 * 4  # 3 SLA layers, K and V, float32
    assert plain_bytes > 10 * mixed_kv_bytes  # the measurement sees the activations at all
    assert sla_bytes[False] == plain_bytes + (0 if recompute else mixed_kv_bytes)
    assert sla_bytes[True] < sla_bytes[False]


@pytest.mark.parametrize("skip, head_ratio, first_heads", [(1, 0.75, [0, 0, 0, 3]), (2, 0.5, [0, 0, 2, 2])])
def test_skipping_unread_kv_keeps_the_loss_and_every_gradient(skip, head_ratio, first_heads):
    """Layers that leave the K/V nobody reads out of c_attn's matmul train exactly as if they computed them: those
    rows of c_attn get no gradient either way."""
    idx = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))
    losses, grads = {}, {}
    for skip_unread_kv in (False, True):
        model = make_model(sla=True, sla_skip=skip, sla_head_ratio=head_ratio, skip_unread_kv=skip_unread_kv).train()
        _, loss = model(idx, idx.roll(-1, dims=1))
        loss.backward()
        losses[skip_unread_kv] = loss.detach()
        grads[skip_unread_kv] = {name: param.grad for name, param in model.named_parameters()}
    cfg = model.config
    assert [cfg.first_cached_head(layer) for layer in range(cfg.n_layer)] == first_heads
    assert torch.allclose(losses[True], losses[False], rtol=1e-6, atol=0)
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, rtol=1e-5, atol=1e-7), name
    for layer, first in enumerate(first_heads):
        for skip_unread_kv in (False, True):
            prefix = f"transformer.h.{layer}.attn.c_attn."
            weight = grads[skip_unread_kv][prefix + "weight"].view(3, 4, 8, 32)  # q | k | v, 4 heads of 8
            bias = grads[skip_unread_kv][prefix + "bias"].view(3, 4, 8)
            assert weight[1:, :first].abs().sum() == 0 and bias[1:, :first].abs().sum() == 0  # nobody reads them
            assert weight[1:, first:].abs().amin(dim=(2, 3)).gt(0).all()  # every K/V head read has its gradient


def test_skipping_unread_kv_removes_their_matmul_work():
    """torch's FLOP counter: c_attn's matmul loses 2·B·T·C FLOPs per K/V column left out (2 heads of K and V in
    layers 2 and 3 here), in a forward pass, and three times that in training (the forward and both backward ones)."""
    from torch.utils.flop_counter import FlopCounterMode

    idx = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))
    forward_flops, training_flops = {}, {}
    for skip_unread_kv in (False, True):
        model = make_model(sla=True, sla_skip=2, sla_head_ratio=0.5, bias=False, skip_unread_kv=skip_unread_kv).train()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(idx, idx)
        forward_flops[skip_unread_kv] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model(idx, idx)[1].backward()
        training_flops[skip_unread_kv] = counter.get_total_flops()
    B, T, C, D = 2, 24, 32, 8
    cfg = model.config
    expected = sum(2 * B * T * C * 2 * cfg.first_cached_head(layer) * D for layer in range(cfg.n_layer))
    assert expected == 2 * (2 * B * T * C * 2 * 2 * D)
    assert forward_flops[False] - forward_flops[True] == expected
    assert training_flops[False] - training_flops[True] == 3 * expected


@pytest.mark.parametrize("sla", [False, True])
def test_chunked_loss_matches_full_logits_loss_and_gradients(sla):
    idx = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)
    targets[:, -3:] = -1  # ignored positions
    losses, grads = [], []
    for return_logits in (True, False):
        model = make_model(sla=sla, sla_skip=1).train()
        model.loss_chunk = 7  # several chunks and a ragged last one
        _, loss = model(idx, targets, return_logits=return_logits)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert (grads[0] - grads[1]).norm() / grads[0].norm() < 1e-5


def test_per_token_losses():
    model = make_model(sla=True, sla_skip=1)
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, per_token = model(idx, idx, reduction="none")
    assert per_token.shape == (2, 16)
    expected = F.cross_entropy(logits.flatten(0, 1), idx.flatten(), reduction="none").view(2, 16)
    assert torch.allclose(per_token, expected)
    _, mean = model(idx, idx)
    assert mean.item() == pytest.approx(per_token.mean().item(), rel=1e-6)
    # the memory-lean path evaluation uses: the same per-token losses, a few rows of logits at a time
    model.loss_chunk = 5  # 32 rows: chunks of 5, 5, ..., 2
    targets = idx.clone()
    targets[0, 3] = -1
    _, chunked = model(idx, targets, reduction="none", return_logits=False)
    full = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none").view(2, 16)
    assert chunked.shape == (2, 16) and chunked[0, 3] == 0
    assert torch.allclose(chunked, full, atol=1e-6)


@pytest.mark.parametrize("sla, skip", [(False, 1), (True, 1), (True, 2)])
def test_kv_cache_generation_equals_full_recompute(sla, skip):
    model = make_model(sla=sla, sla_skip=skip)
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(0))
    # 30 new tokens: runs past block_size (24), where the window slides
    cached = model.generate(prompt, max_new_tokens=30, temperature=0)
    idx = prompt
    for _ in range(30):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, idx)


def test_kv_cache_continuation_with_several_tokens_matches_full_pass():
    model = make_model(sla=True, sla_skip=1)
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config, batch_size=2, device="cpu", dtype=torch.float32)
    model.hidden_states(idx[:, :8], cache)
    continued = model.hidden_states(idx[:, 8:], cache, input_pos=torch.arange(8, 20))  # 12 tokens after 8 cached
    full = model.hidden_states(idx)
    assert torch.allclose(continued, full[:, 8:], atol=1e-5)


def test_sampling_is_reproducible_with_a_generator():
    model = make_model(sla=True, sla_skip=1)
    prompt = torch.zeros((1, 1), dtype=torch.long)
    a = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (1, 11)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(sla_head_ratio=1.5), "sla_head_ratio"),
        (dict(sla_head_ratio=-0.1), "sla_head_ratio"),
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(sla_skip=0), "sla_skip"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_parameter_names_and_shapes_are_gpt2s():
    plain, sla = GPT(tiny_config()), GPT(tiny_config(sla=True, sla_skip=1))
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in sla.state_dict().items()}
    assert plain.transformer.wte.weight is plain.lm_head.weight
    assert plain.transformer.h[0].attn.c_attn.weight.shape == (96, 32)


def test_no_graph_breaks():
    import torch._dynamo

    for sla in (False, True):
        model = make_model(sla=sla, sla_skip=1).train()
        idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
        for kwargs in (dict(), dict(return_logits=False)):
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(model)(idx, idx, **kwargs)
            assert explanation.graph_break_count == 0, explanation.break_reasons


def test_from_pretrained_matches_huggingface(tmp_path):
    pytest.importorskip("transformers")
    hf_model = random_hf_gpt2(tmp_path, n_layer=3, n_head=4, n_embd=32, n_positions=40, vocab_size=101)
    idx = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(idx).logits

    model = GPT.from_pretrained(str(tmp_path)).eval()
    logits, _ = model(idx, idx)
    assert (logits - expected).abs().max() < 1e-5

    sla_model = GPT.from_pretrained(str(tmp_path), sla=True, sla_skip=1, block_size=32).eval()
    assert sla_model.config.sla and sla_model.config.block_size == 32
    sla_logits, _ = sla_model(idx[:, :32], idx[:, :32])
    assert (sla_logits - expected[:, :32]).abs().max() > 1e-3  # loaded, and SLA changes the function
    # and back: the SLA model's weights load into a plain GPT-2 shape without renaming
    plain = GPT(GPTConfig(**{**vars(sla_model.config), "sla": False}))
    plain.load_state_dict(sla_model.state_dict())

    with pytest.raises(ValueError, match="n_layer"):
        GPT.from_pretrained(str(tmp_path), n_layer=2)


def test_flops_per_token_counts_the_matmuls_of_a_training_step():
    """6N + 12·L·C·T against torch's FLOP counter on one forward and backward pass (attention through SDPA's math
    path, whose matmuls it counts, in full as the formula does). The counter sees only matmuls, not the 6 FLOPs
    per token charged to each of the 288 LayerNorm gains of this bias-free model ((2 x 4 layers + 1) x 32), nor
    the 6 per token of each of the 2 x 3 x 8 x 32 = 1,536 c_attn weights of the K/V that layer 3 leaves out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model(sla=True, sla_skip=1, bias=False).train()
    idx = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx, return_logits=False)
        loss.backward()
    assert counter.get_total_flops() / idx.numel() + 6 * 288 + 6 * 1_536 == model.flops_per_token()
    # by hand: matrices 61 x 32 (tied wte) + 4 x (32 x 96 + 32 x 32 + 2 x 32 x 128) = 51,104; attention 12 x 4 x 32 x 24
    assert model.flops_per_token() == 6 * (51_104 + 288) + 36_864
    assert model.flops_per_token(12) == 6 * (51_104 + 288) + 36_864 // 2


def test_gpt2_small_flops_per_token():
    """GPT-2 small at 1024 tokens: 6 x 123,653,376 parameters (124,439,808 without the 786,432 of wpe) plus
    12 x 12 x 768 x 1024 for attention."""
    with torch.device("meta"):
        small = GPT(GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, vocab_size=50257))
    assert small.flops_per_token() == 855_166_464


@pytest.mark.parametrize(
    "device_name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("Tesla V100-SXM2-16GB", None),
        (None, None),  # no GPU
    ],
)
def test_gpu_peak_lookup_and_mfu(device_name, peak, monkeypatch):
    import model as model_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: device_name is not None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: device_name)
    assert model_module.gpu_peak_bf16_flops() == peak
    model = GPT(tiny_config())
    mfu = model.estimate_mfu(1e6, seq_len=24)
    assert mfu == (None if peak is None else pytest.approx(model.flops_per_token(24) * 1e6 / peak))


def test_gpt2_small_and_medium_sizes():
    small = GPT(GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, vocab_size=50257))
    assert small.get_num_params() == 124_439_808 - 1024 * 768
    with torch.device("meta"):
        medium = GPT(GPTConfig(block_size=1024, n_layer=24, n_head=16, n_embd=1024, vocab_size=50257))
    assert medium.get_num_params(non_embedding=False) == 354_823_168
