"""
model.py promises not covered by the float64 reference: round() (not int()) for the number of skip heads, the
chunked loss's backward under an upstream gradient other than 1, and sampling: top_k and temperature checked
against the model's own next-token distribution, computed here by separate forward passes.
"""

import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig

# ------------------------------------------------------------------------------------------ skip heads: round()


@pytest.mark.parametrize(
    "ratio, n_head, n_skip",
    [
        (0.7, 4, 3),  # 2.8: round gives 3, int() would give 2
        (0.75, 12, 9),  # the README's example
        (0.625, 4, 2),  # 2.5: Python's round goes to the even 2
        (0.875, 4, 4),  # 3.5: to the even 4
        (0.3, 2, 1),  # 0.6: one skip head, where int() would give none
        (0.2, 2, 0),
    ],
)
def test_skip_head_count_is_python_round(ratio, n_head, n_skip):
    config = GPTConfig(n_head=n_head, n_embd=8 * n_head, sla=True, sla_head_ratio=ratio)
    assert config.n_skip_heads == n_skip
    assert GPTConfig(n_head=n_head, n_embd=8 * n_head, sla=False, sla_head_ratio=ratio).n_skip_heads == 0


def test_ratio_0_7_of_4_heads_runs_3_skip_heads():
    """The model with ratio 0.7 computes what the one with 3 of 4 heads skipping computes (0.75), not 2 (0.5)."""
    args = dict(block_size=16, vocab_size=61, n_layer=3, n_head=4, n_embd=32, sla=True, sla_skip=1)
    torch.manual_seed(0)
    models = {ratio: GPT(GPTConfig(**args, sla_head_ratio=ratio)).eval() for ratio in (0.7, 0.75, 0.5)}
    for model in models.values():
        model.load_state_dict(models[0.7].state_dict())
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {ratio: model(idx, idx)[0] for ratio, model in models.items()}
    assert torch.equal(logits[0.7], logits[0.75])
    assert (logits[0.7] - logits[0.5]).abs().max() > 1e-3


# ------------------------------------------------------------------------- chunked loss: upstream gradient != 1


@pytest.mark.parametrize("sla", [False, True])
def test_chunked_loss_backward_scales_with_the_upstream_gradient(sla):
    """Training may scale the loss (micro-steps, float16 loss scaling): d(f(loss)) must be f'(loss) x d(loss)."""
    idx = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)
    targets[:, -3:] = -1
    grads = []
    for return_logits in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=24, vocab_size=61, n_layer=2, n_head=4, n_embd=32, sla=sla, sla_skip=1))
        model.loss_chunk = 7  # several chunks and a ragged last one
        _, loss = model(idx, targets, return_logits=return_logits)
        (0.37 * loss**2).backward()  # upstream gradient 0.74 x loss, about 3
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 1e-5


# ----------------------------------------------------------------------------------- sampling: top_k, temperature


def spread_model(block_size=16) -> GPT:
    """A small SLA model whose next-token distributions are far from uniform (larger token embeddings)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=61, n_layer=2, n_head=4, n_embd=32, sla=True, sla_skip=1))
    with torch.no_grad():
        model.transformer.wte.weight.normal_(std=0.1)
    return model.eval()


def next_token_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """(B, V) logits of the token after idx, from a plain forward pass (no cache)."""
    with torch.no_grad():
        return model(idx)[0][:, -1].double()


def expected_distribution(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    scaled = logits / temperature
    if top_k is not None:
        outside = torch.ones_like(scaled, dtype=torch.bool).scatter(-1, scaled.topk(top_k).indices, False)
        scaled = scaled.masked_fill(outside, float("-inf"))
    return F.softmax(scaled, dim=-1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return (p - q).abs().sum().item() / 2


def test_sampled_frequencies_follow_softmax_of_logits_over_temperature_within_top_k():
    model = spread_model(block_size=8)
    prompt = torch.tensor([[3, 14, 15, 9, 2]])
    logits = next_token_logits(model, prompt)[0]
    n = 20_000  # the same prompt n times: the first sampled token's frequencies estimate its distribution
    cases = [(0.7, None), (1.5, None), (1.5, 5)]
    for temperature, top_k in cases:
        generator = torch.Generator().manual_seed(0)
        sampled = model.generate(prompt.expand(n, -1), 1, temperature=temperature, top_k=top_k, generator=generator)
        frequencies = torch.bincount(sampled[:, -1], minlength=61).double() / n
        expected = expected_distribution(logits, temperature, top_k)
        assert total_variation(frequencies, expected) < 0.04, (temperature, top_k)
        if top_k is not None:
            assert frequencies[expected == 0].sum() == 0  # never a token outside the k most likely
    # the check tells these cases apart: a sampler that ignored temperature or top_k would be far off
    assert total_variation(expected_distribution(logits, 0.7, None), expected_distribution(logits, 1.0, None)) > 0.1
    assert total_variation(expected_distribution(logits, 1.5, None), expected_distribution(logits, 1.0, None)) > 0.1
    assert total_variation(expected_distribution(logits, 1.5, 5), expected_distribution(logits, 1.5, None)) > 0.1


def test_every_sampled_token_is_among_the_top_k_at_its_step():
    """Through the KV cache and past block_size (where the window slides), step after step."""
    model = spread_model()
    prompt = torch.randint(0, 61, (16, 4), generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    sequence = model.generate(prompt, 20, temperature=2.0, top_k=3, generator=generator)
    for t in range(4, sequence.size(1)):
        context = sequence[:, max(0, t - model.config.block_size) : t]
        allowed = next_token_logits(model, context).topk(3).indices
        assert (allowed == sequence[:, [t]]).any(dim=1).all(), f"step {t}"
    assert len(set(sequence[:, 4:].flatten().tolist())) > 3  # it samples: not one token over and over


def greedy(model: GPT, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    sequence = prompt
    for _ in range(new_tokens):
        context = sequence[:, -model.config.block_size :]
        sequence = torch.cat([sequence, next_token_logits(model, context).argmax(-1, keepdim=True)], dim=1)
    return sequence


def test_top_k_1_and_a_tiny_temperature_are_greedy_and_temperature_changes_samples():
    model = spread_model()
    prompt = torch.randint(0, 61, (4, 4), generator=torch.Generator().manual_seed(3))
    expected = greedy(model, prompt, 12)

    def sample(temperature, top_k=None):
        return model.generate(prompt, 12, temperature, top_k, generator=torch.Generator().manual_seed(4))

    assert torch.equal(sample(0.0), expected)
    assert torch.equal(sample(1.0, top_k=1), expected)
    assert torch.equal(sample(1.0, top_k=1), expected)
    assert torch.equal(sample(1e-4), expected)
    assert not torch.equal(sample(1.0), expected)
    assert not torch.equal(sample(1.0), sample(2.0))  # one generator seed, another temperature: other tokens
