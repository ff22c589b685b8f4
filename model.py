"""
GPT-2 with Skip-Layer Attention (SLA), in one file that reads top to bottom as the math.

SLA: in layer l >= sla_skip, the first n_skip heads attend with layer l's queries over the keys and values that
layer l - sla_skip computed with its own c_attn (not what that layer itself borrowed). Every other head, and
every head of the first sla_skip layers, is plain causal self-attention. SLA adds no parameters and no matmuls:
each layer still computes K and V for all heads, so GPT-2 checkpoints load unchanged.

    layer l-s  heads: [ 0 .. n_skip-1 | n_skip .. n_head-1 ]  -- own K/V -------------+
    layer l    heads: [ 0 .. n_skip-1 | n_skip .. n_head-1 ]                          |
                        Q of layer l    Q, K, V of layer l                            |
                        K, V of layer l-s  <------------------------------------------+
"""

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has them
    sla: bool = False
    sla_head_ratio: float = 0.75  # fraction of heads that skip; the paper's best: 9 of 12
    sla_skip: int = 9  # skip distance: layer l reads layer l - sla_skip's K/V

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.sla_head_ratio <= 1.0:
            raise ValueError(f"sla_head_ratio must be in [0, 1], got {self.sla_head_ratio}")
        if self.sla_skip < 1:
            raise ValueError(f"sla_skip must be >= 1 (a layer can only read an earlier layer), got {self.sla_skip}")

    @property
    def n_skip_heads(self) -> int:
        """Heads 0 .. n_skip_heads-1 of every layer l >= sla_skip read layer l - sla_skip's K/V."""
        return round(self.sla_head_ratio * self.n_head) if self.sla else 0

    def skip_source(self, layer: int) -> int | None:
        """The layer whose own K/V this layer's skip heads read, or None if the layer is plain."""
        if self.n_skip_heads > 0 and self.sla_skip <= layer < self.n_layer:
            return layer - self.sla_skip
        return None


class CausalSelfAttention(nn.Module):
    # SLA layers rebuild their mixed K/V in backward rather than keep them (see forward); False keeps them: faster
    # by a copy per SLA layer, 2*B*T*C values more memory each. bench.py --sla_recompute_kv=False measures it.
    recompute_mixed_kv = True

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.n_skip_heads = config.n_skip_heads if config.skip_source(layer) is not None else 0
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q | k | v, heads contiguous
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, skip_kv=None, past_kv=None):
        """
        x: (B, T, C). skip_kv: layer l - sla_skip's own (k, v), each (B, T_total, n_head, head_dim), or None.
        past_kv: this layer's own cached (k, v) of earlier tokens during generation, or None.
        Returns the attention output and this layer's own (k, v) over all T_total tokens, the only K/V a later
        layer may read: heads borrowed here are never passed on.
        """
        B, T, C = x.size()
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(dim=2)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=1), torch.cat([past_kv[1], v], dim=1)
        own_kv = (k, v)
        if self.n_skip_heads == 0:
            y = self.attend(q, k, v)
        elif torch.is_grad_enabled() and self.recompute_mixed_kv:
            # The mixed K/V are new tensors that SDPA would keep for backward: 2*B*T*C values more per SLA layer
            # than a plain layer holds. Keep only SDPA's outputs and rebuild the mix (a copy, no matmul) in backward.
            y = checkpoint(self.attend_mixed, q, k, v, *skip_kv, use_reentrant=False, context_fn=_recompute_only_cat)
        else:
            y = self.attend_mixed(q, k, v, *skip_kv)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, C))), own_kv

    def attend_mixed(self, q, k, v, skip_k, skip_v):
        """Skip heads take layer l - sla_skip's K/V, the rest their own; one tensor each, so one SDPA call."""
        k = torch.cat([skip_k[:, :, : self.n_skip_heads], k[:, :, self.n_skip_heads :]], dim=2)
        v = torch.cat([skip_v[:, :, : self.n_skip_heads], v[:, :, self.n_skip_heads :]], dim=2)
        return self.attend(q, k, v)

    def attend(self, q, k, v):
        """Causal attention of q (B, T, n_head, head_dim) over k, v (B, T_total, n_head, head_dim)."""
        T, T_total = q.size(1), k.size(1)
        # With a cache, new queries sit at the end of the sequence; SDPA's is_causal aligns them to the start.
        # (A Python bool, not `past_len == 0`: under dynamic shapes that is symbolic and breaks the graph.)
        past_len = T_total - T
        is_causal, attn_mask = (True if past_len == 0 else False), None
        if past_len > 0 and T > 1:
            attn_mask = torch.ones(T, T_total, dtype=torch.bool, device=q.device).tril(diagonal=past_len)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return y.transpose(1, 2)


def _recompute_only_cat(**_):
    """Selective activation checkpointing for attend_mixed: recompute the head concatenation (and the views of
    it, which would keep it alive), save everything else (the attention itself is never recomputed)."""

    def policy(ctx, op, *args, **kwargs):
        recompute = op is torch.ops.aten.cat.default or op.is_view
        return CheckpointPolicy.PREFER_RECOMPUTE if recompute else CheckpointPolicy.MUST_SAVE

    return create_selective_checkpoint_contexts(policy)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, skip_kv=None, past_kv=None):
        attn_out, own_kv = self.attn(self.ln_1(x), skip_kv=skip_kv, past_kv=past_kv)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, own_kv


class GPT(nn.Module):
    loss_chunk = 4096  # rows of logits made at a time by the memory-lean loss (0.4 GB in bf16 at GPT-2's vocab)

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.skip_sources = [config.skip_source(layer) for layer in range(config.n_layer)]

        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: keeps the residual stream's variance flat in depth
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embeddings (the token embeddings are the tied
        lm_head, so they count)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def hidden_states(self, idx, kv_cache: list | None = None):
        """
        Final (ln_f) hidden states, (B, T, C). With kv_cache (a list with one own (k, v) or None per layer), idx
        continues the cached tokens and the cache is extended in place.
        """
        T = idx.size(1)
        past_len = 0 if kv_cache is None or kv_cache[0] is None else kv_cache[0][0].size(1)
        if past_len + T > self.config.block_size:
            raise ValueError(f"sequence of {past_len + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(past_len, past_len + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

        # Without a cache, a layer's own K/V is held only until the layer that skips to it has read it.
        own_kv = kv_cache if kv_cache is not None else [None] * self.config.n_layer
        for layer, block in enumerate(self.transformer.h):
            source = self.skip_sources[layer]
            skip_kv = own_kv[source] if source is not None else None
            x, kv = block(x, skip_kv=skip_kv, past_kv=own_kv[layer] if kv_cache is not None else None)
            if kv_cache is not None or layer in self.skip_sources:
                own_kv[layer] = kv
            if kv_cache is None and source is not None:
                own_kv[source] = None
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, reduction: str = "mean", return_logits: bool = True):
        """
        Without targets: logits of the last position, (B, 1, V), and None.
        With targets: logits (B, T, V) and the cross-entropy (targets of -1 ignored), its mean or, with
        reduction="none", the per-token losses (B, T). With return_logits=False the loss is computed without
        ever holding the (B*T, V) logits (training: the mean; evaluation: per token), and None stands for them.
        """
        x = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        if not return_logits:
            flat_hidden, flat_targets = x.flatten(0, 1), targets.flatten()
            if reduction == "mean":
                return None, ChunkedLinearCrossEntropy.apply(
                    flat_hidden, self.lm_head.weight, flat_targets, self.loss_chunk
                )
            if reduction == "none":  # evaluation: per-token losses, one chunk of logits at a time
                chunk_losses = [
                    F.cross_entropy(self.lm_head(h).float(), t, ignore_index=-1, reduction="none")
                    for h, t in zip(
                        flat_hidden.split(self.loss_chunk), flat_targets.split(self.loss_chunk), strict=True
                    )
                ]
                return None, torch.cat(chunk_losses).view_as(targets)
            raise ValueError("return_logits=False computes reduction='mean' or 'none'")
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)
        return logits, loss if reduction != "none" else loss.view_as(targets)

    def crop_block_size(self, block_size: int):
        """Shorten the context (e.g. a 1024-token GPT-2 to a smaller model); it cannot grow."""
        if block_size > self.config.block_size:
            raise ValueError(f"block_size {block_size} exceeds the model's {self.config.block_size}; can only crop")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **overrides):
        """
        OpenAI GPT-2 weights ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', or a local Hugging Face directory)
        in this model. overrides may set sla, sla_head_ratio, sla_skip, dropout and a smaller block_size.
        """
        allowed = {"sla", "sla_head_ratio", "sla_skip", "dropout", "block_size"}
        if unknown := set(overrides) - allowed:
            raise ValueError(f"from_pretrained cannot override {sorted(unknown)}; allowed: {sorted(allowed)}")
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as err:
            raise ImportError("loading GPT-2 weights needs transformers: pip install transformers") from err

        hf_model = GPT2LMHeadModel.from_pretrained(name_or_dir)
        hf = hf_model.config
        block_size = overrides.pop("block_size", hf.n_positions)
        config = GPTConfig(
            block_size=hf.n_positions, vocab_size=hf.vocab_size, n_layer=hf.n_layer, n_head=hf.n_head,
            n_embd=hf.n_embd, bias=True, **overrides,
        )  # fmt: skip
        model = cls(config)
        hf_state = hf_model.state_dict()
        # HF's GPT-2 stores these as Conv1D, i.e. transposed Linear weights
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for name, param in model.state_dict().items():
                source = hf_state[name]
                param.copy_(source.t() if name.endswith(transposed) else source)
        if block_size < config.block_size:
            model.crop_block_size(block_size)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices and embeddings only (not biases or LayerNorm gains)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N for the weights plus 12·L·C·T for attention
        scores and values (counted in full, as the PaLM paper and nanoGPT do, though causal masking halves it)."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * (seq_len or cfg.block_size)

    def estimate_mfu(self, tokens_per_second: float, seq_len: int | None = None) -> float | None:
        """Model FLOPs utilisation against the detected GPU's dense bf16 peak; None where that peak is unknown."""
        peak = gpu_peak_bf16_flops()
        return None if peak is None else self.flops_per_token(seq_len) * tokens_per_second / peak

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, generator=None):
        """
        Extend idx (B, T) by max_new_tokens tokens with a KV cache; temperature 0 is greedy. Once the sequence
        outgrows block_size, each step recomputes the last block_size tokens: positions shift, so no cache holds.
        """
        kv_cache = None
        for _ in range(max_new_tokens):
            cached_len = 0 if kv_cache is None else kv_cache[0][0].size(1)
            if kv_cache is None or cached_len + 1 > self.config.block_size:
                kv_cache = [None] * self.config.n_layer
                x = self.hidden_states(idx[:, -self.config.block_size :], kv_cache)
            else:
                x = self.hidden_states(idx[:, -1:], kv_cache)
            logits = self.lm_head(x[:, -1, :]).float()
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


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """
    mean cross_entropy(hidden @ weight.T, targets), ignoring targets of -1, without the (N, V) logits.

    At 16K tokens GPT-2's logits are 0.8 G values; holding them (and their float32 copy and gradient) dominates
    memory. The loss is the end of the graph, so its gradient is known in the forward pass: each chunk of
    logits is made, turned into loss and gradients, and freed. Same matmuls as the plain path, no recompute.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        valid = targets != -1
        n_valid = valid.sum().clamp(min=1)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)  # accumulated over chunks in float32
        for start in range(0, hidden.size(0), chunk_size):
            chunk = slice(start, start + chunk_size)
            h, scale = hidden[chunk], (valid[chunk] / n_valid).unsqueeze(1)  # ignored rows get weight 0
            target = targets[chunk].clamp(min=0).unsqueeze(1)  # any index for ignored rows: their scale is 0
            logits = h @ weight.t()  # bfloat16 under autocast, as lm_head's
            logits_fp32 = logits.float()
            lse = torch.logsumexp(logits_fp32, dim=1, keepdim=True)
            target_logit = logits_fp32.gather(1, target)
            loss = loss + ((lse - target_logit) * scale).sum()
            # d(mean CE)/d logits = (softmax - onehot) / n_valid, made in one pass in the logits' dtype; then the
            # target entries are overwritten with softmax - 1 from float32 values (not 1 taken off a rounded one)
            grad_logits = (torch.exp(logits_fp32 - lse) * scale).to(logits.dtype)
            grad_logits.scatter_(1, target, ((torch.exp(target_logit - lse) - 1) * scale).to(logits.dtype))
            grad_hidden[chunk] = grad_logits @ weight
            grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype), None, None


def gpu_peak_bf16_flops() -> float | None:
    """Dense bf16 tensor-core peak of the current CUDA device, from the datasheets; None if unknown or no GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for marker, peak in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12)):
        if marker in name:
            return peak
    return None
