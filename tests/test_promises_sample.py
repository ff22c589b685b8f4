"""sample.py passes --temperature and --top_k through: greedy text computed here by argmax over separate forward
passes is what --temperature=0 and --top_k=1 give, and what plain sampling does not."""

from dataclasses import asdict

import torch

import sample
from model import GPT, GPTConfig
from prepare_openwebtext import get_tokenizer
from sample import SampleConfig
from train import save_checkpoint

BYTE_META = {"tokenizer": "byte", "vocab_size": 257, "eot_token": 256, "dtype": "uint16"}


def test_temperature_and_top_k_reach_the_sampler(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=4, n_embd=32, sla=True, sla_skip=1))
    with torch.no_grad():
        model.transformer.wte.weight.normal_(std=0.1)  # next-token distributions far from uniform
    model.eval()
    save_checkpoint(
        {"model": model.state_dict(), "model_args": asdict(model.config), "meta": BYTE_META}, str(tmp_path / "ckpt.pt")
    )

    prompt = "Hello"
    ids = torch.tensor([get_tokenizer("byte").encode(prompt)])
    with torch.no_grad():
        for _ in range(16):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    greedy_text = get_tokenizer("byte").decode(ids[0].tolist())

    def text(**overrides):
        args = dict(out_dir=str(tmp_path), device="cpu", num_samples=1, max_new_tokens=16, start=prompt, seed=5)
        (sampled,) = sample.main(SampleConfig(**{**args, **overrides}))
        return sampled

    assert text(temperature=0.0, top_k=None) == greedy_text
    assert text(temperature=1.0, top_k=1) == greedy_text
    assert text(temperature=1e-4, top_k=None) == greedy_text
    sampled = text(temperature=1.0, top_k=None)
    assert sampled != greedy_text and sampled.startswith(prompt)
    assert text(temperature=0.3, top_k=None) != sampled  # one seed, another temperature
