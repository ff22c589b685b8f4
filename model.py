"""
GPT-2 with Skip-Layer Attention (SLA), in one file that reads top to bottom as the math.

SLA: in layer l >= sla_skip, the first n_skip heads attend with layer l's queries over the keys and values that
layer l - sla_skip computed with its own c_attn (not what that layer itself borrowed). Every other head, and
every head of the first sla_skip layers, is plain causal self-attention. SLA adds no parameters and no matmuls,
so GPT-2 checkpoints load unchanged; it saves a few: the own K/V of skip heads that no later layer reads (in the last
sla_skip SLA layers) are not computed.

    layer l-s  heads: [ 0 .. n_skip-1 | n_skip .. n_head-1 ]  -- own K/V -------------+
    layer l    heads: [ 0 .. n_skip-1 | n_skip .. n_head-1 ]                          |
                        Q of layer l    Q, K, V of layer l                            |
                        K, V of layer l-s  <------------------------------------------+
"""

import inspect
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

CAUSAL_ATTENTIONS = ("sdpa", "fa4")  # GPTConfig.attention's kernels
KERNEL_KEYS = ("attention", "recompute_mixed_kv", "skip_unread_kv")  # GPTConfig's fields that choose kernels only


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
    # How the model computes, not what: kernel choices with the same math, so a checkpoint does not fix them
    # (KERNEL_KEYS; model_from_checkpoint takes the reader's) and a resumed run may switch.
    attention: str = "sdpa"  # causal attention without a mask: 'sdpa' (PyTorch's) | 'fa4' (FlashAttention-4, fa4.py)
    # SLA layers rebuild their mixed K/V in backward rather than keep them (CausalSelfAttention.forward); False keeps
    # them: faster by a copy per SLA layer, 2*B*T*C values more memory each (bench.py --sla_recompute_kv=False)
    recompute_mixed_kv: bool = True
    # c_attn's matmul leaves out the K/V rows of heads nobody reads (first_cached_head): less work, the same
    # parameters; False computes them (bench.py --sla_skip_unread_kv=False measures the difference)
    skip_unread_kv: bool = True

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
        if self.attention not in CAUSAL_ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(CAUSAL_ATTENTIONS)}, got {self.attention!r}")

    @property
    def n_skip_heads(self) -> int:
        """Heads 0 .. n_skip_heads-1 of every layer l >= sla_skip read layer l - sla_skip's K/V."""
        return round(self.sla_head_ratio * self.n_head) if self.sla else 0

    def skip_source(self, layer: int) -> int | None:
        """The layer whose own K/V this layer's skip heads read, or None if the layer is plain."""
        if self.n_skip_heads > 0 and self.sla_skip <= layer < self.n_layer:
            return layer - self.sla_skip
        return None

    def first_cached_head(self, layer: int) -> int:
        """
        A KV cache keeps heads first_cached_head(l) .. n_head-1 of layer l's own K/V. Layer l's own K/V of heads
        0 .. n_skip_heads-1 are read by layer l itself if it is plain, else only by layer l + sla_skip: where layer l
        skips and no layer l + sla_skip exists, nobody reads them.
        """
        if self.skip_source(layer) is not None and self.skip_source(layer + self.sla_skip) is None:
            return self.n_skip_heads
        return 0

    def kv_cache_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V that generation caches per token of one sequence, at the given dtype."""
        cached_heads = sum(self.n_head - self.first_cached_head(layer) for layer in range(self.n_layer))
        return 2 * cached_heads * (self.n_embd // self.n_head) * dtype.itemsize


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.n_skip_heads = config.n_skip_heads if config.skip_source(layer) is not None else 0
        self.first_read_head = config.first_cached_head(layer)  # own K/V of heads below it: nobody reads them
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q | k | v, heads contiguous
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # the kernel choices (GPTConfig); the math below is the same whichever they are
        self.causal_attention = causal_attention_kernel(config.attention)
        self.recompute_mixed_kv = config.recompute_mixed_kv
        self.skip_unread_kv = config.skip_unread_kv

    def forward(self, x, skip_kv=None, kv_cache=None, input_pos=None, attn_mask=None):
        """
        x: (B, T, C). skip_kv: layer l - sla_skip's own (k, v), each (B, T_kv, n_head, head_dim), or None.
        kv_cache: a KVCache this layer writes its own K/V of x's tokens into, at input_pos (T,) or, without it,
        at 0 .. T-1. With input_pos, x continues the cached tokens: attention runs over the whole cache, where
        attn_mask (T, block_size) is True. Returns the attention output and this layer's own (k, v) over what it
        attended to (of the heads from first_read_head on), the only K/V a later layer may read: heads borrowed here
        are never passed on.
        """
        B, T, C = x.size()
        q, k, v, qkv = self.project_qkv(x)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v, input_pos)
            qkv = None  # k and v are the cache's now
        own_kv = (k, v)
        if self.n_skip_heads == 0:
            y = self.attend(q, k, v, attn_mask, qkv)
        else:
            # Skip heads take layer l - sla_skip's K/V, the rest their own: the last n_head - n_skip_heads of k and
            # v (the others, if there, are read by layer l + sla_skip, not here).
            own_heads = slice(k.size(2) - (self.n_head - self.n_skip_heads), None)
            skip_kv = [kv[:, :, : self.n_skip_heads] for kv in skip_kv]
            args = (q, k[:, :, own_heads], v[:, :, own_heads], attn_mask, qkv, skip_kv)
            # SDPA needs the two K/V sources copied into one tensor each; causal_attention attends over each apart
            if torch.is_grad_enabled() and self.recompute_mixed_kv and not self.runs_causal_attention(attn_mask):
                # The mixed K/V are new tensors that SDPA would keep for backward: 2*B*T*C values more per SLA
                # layer than a plain layer holds. Keep only SDPA's outputs; rebuild the mix (a copy) in backward.
                y = checkpoint(self.attend, *args, use_reentrant=False, context_fn=_recompute_only_cat)
            else:
                y = self.attend(*args)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, C))), own_kv

    def project_qkv(self, x):
        """
        q (B, T, n_head, head_dim) and this layer's own k, v (B, T, heads, head_dim) of the heads some layer reads,
        first_read_head .. n_head-1 (all heads with skip_unread_kv off): c_attn without the rows of the others. Then
        qkv, the (B, T, n_head + 2 * heads, head_dim) tensor q, k and v are views of.
        """
        B, T, C = x.size()
        first = self.first_read_head if self.skip_unread_kv else 0
        weight, bias = self.c_attn.weight, self.c_attn.bias
        if first > 0:
            rows = (slice(0, C), slice(C + first * self.head_dim, 2 * C), slice(2 * C + first * self.head_dim, 3 * C))
            weight = torch.cat([weight[r] for r in rows])
            bias = None if bias is None else torch.cat([bias[r] for r in rows])
        qkv = F.linear(x, weight, bias).view(B, T, -1, self.head_dim)
        return *qkv.split([self.n_head, self.n_head - first, self.n_head - first], dim=2), qkv

    def runs_causal_attention(self, attn_mask) -> bool:
        """Whether attend() hands the attention to causal_attention (set, and no mask) rather than SDPA."""
        return attn_mask is None and self.causal_attention is not None

    def attend(self, q, k, v, attn_mask=None, qkv=None, skip_kv=None):
        """
        Attention of q (B, T, n_head, head_dim): heads 0 .. S-1 over skip_kv's (skip_k, skip_v), each (B, T_kv, S,
        head_dim), where given, the other heads over k, v (B, T_kv, n_head - S, head_dim). Causal (T_kv = T) without
        attn_mask, else to the positions where attn_mask (T, T_kv) is True. qkv: the one tensor q, k and v are views
        of (c_attn's output, see project_qkv), where they are, for causal_attention.
        """
        if self.runs_causal_attention(attn_mask):
            return self.causal_attention(q, k, v, qkv, skip_kv)
        if skip_kv is not None:
            k, v = torch.cat([skip_kv[0], k], dim=2), torch.cat([skip_kv[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None,
        )
        return y.transpose(1, 2)


def causal_attention_kernel(attention: str):
    """
    The function (q, k, v, qkv, skip_kv) -> causal attention as attend() computes it, which attend() hands attention
    without a mask to (training, evaluation, prefill): None for PyTorch's SDPA; for 'fa4' FlashAttention-4's custom
    operators from fa4.py, imported only then (they need the flash-attn-4 package only when they run). qkv is None or
    the tensor q, k and v are views of, whose gradient a kernel can then write whole.
    """
    if attention == "fa4":
        from fa4 import fa4_causal_attention

        return fa4_causal_attention
    return None


def _recompute_only_cat(**_):
    """Selective activation checkpointing for an SLA layer's attend: recompute the head concatenation (and the views of
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

    def forward(self, x, skip_kv=None, kv_cache=None, input_pos=None, attn_mask=None):
        attn_out, own_kv = self.attn(self.ln_1(x), skip_kv, kv_cache, input_pos, attn_mask)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, own_kv


class KVCache:
    """
    Static K/V buffers for generation: per layer one K and one V of (B, block_size, cached heads, head_dim),
    allocated once and written at each token's position. Layer l caches its own heads
    config.first_cached_head(l) .. n_head-1, the ones some layer reads; a skip head reads its source layer's buffer.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype: torch.dtype):
        self.keys, self.values = [], []
        for first in (config.first_cached_head(layer) for layer in range(config.n_layer)):
            shape = (batch_size, config.block_size, config.n_head - first, config.n_embd // config.n_head)
            for buffers in (self.keys, self.values):
                # zeros: attention weighs positions not yet written by exactly 0, and 0 * NaN would be NaN
                buffer = torch.zeros(shape, dtype=dtype, device=device)
                torch._dynamo.mark_static_address(buffer)  # CUDA graphs write it in place instead of copying it
                buffers.append(buffer)

    def fits(self, config: GPTConfig, batch_size: int, device, dtype: torch.dtype) -> bool:
        expected = (batch_size, config.block_size)
        key = self.keys[0]
        return key.shape[:2] == expected and key.device == torch.device(device) and key.dtype == dtype

    def bytes_per_token(self) -> int:
        """Bytes the buffers hold per position of one sequence."""
        return sum(buffer[0, 0].nbytes for buffer in self.keys + self.values)

    def update(self, layer: int, k, v, input_pos=None):
        """
        Write layer's own k, v (B, T, heads, head_dim) at positions input_pos (T,), or 0 .. T-1 without it: their
        last heads, as many as the buffers hold (k and v may hold all n_head, or only those). Returns the K/V to
        attend over: without input_pos (a prompt) k and v themselves, else the layer's whole buffers.
        """
        first = k.size(2) - self.keys[layer].size(2)
        positions = torch.arange(k.size(1), device=k.device) if input_pos is None else input_pos
        self.keys[layer].index_copy_(1, positions, k[:, :, first:])
        self.values[layer].index_copy_(1, positions, v[:, :, first:])
        return (k, v) if input_pos is None else (self.keys[layer], self.values[layer])


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
        self.kv_cache = None  # made by generate (kv_cache_for)

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

    def hidden_states(self, idx, kv_cache: KVCache | None = None, input_pos=None):
        """
        Final (ln_f) hidden states, (B, T, C). With kv_cache, every layer also writes its own K/V of idx's tokens
        into it. Without input_pos, idx starts at position 0. With input_pos (T,), the positions of idx's tokens
        (each below block_size), idx continues the cached tokens and attends over the whole cache, masked to the
        positions up to each token's own: whatever the sequence's length, the shapes stay the same.
        """
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        if input_pos is None:
            pos, attn_mask = torch.arange(T, dtype=torch.long, device=idx.device), None  # None: causal
        else:
            cache_pos = torch.arange(self.config.block_size, device=idx.device)
            pos, attn_mask = input_pos, cache_pos <= input_pos.unsqueeze(1)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

        # A layer's own K/V is held here only until the layer that skips to it has read it.
        own_kv = [None] * self.config.n_layer
        for layer, block in enumerate(self.transformer.h):
            source = self.skip_sources[layer]
            skip_kv = own_kv[source] if source is not None else None
            x, kv = block(x, skip_kv, kv_cache, input_pos, attn_mask)
            if layer in self.skip_sources:
                own_kv[layer] = kv
            if source is not None:
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
    def from_pretrained(cls, name_or_dir: str, local_files_only: bool = False, **overrides):
        """
        OpenAI GPT-2 weights ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', or a local Hugging Face directory)
        in this model. overrides may set sla, sla_head_ratio, sla_skip, dropout, a smaller block_size and the kernel
        choices (KERNEL_KEYS).
        local_files_only: from the Hugging Face cache, never the network (an OSError if not there).
        """
        allowed = {"sla", "sla_head_ratio", "sla_skip", "dropout", "block_size", *KERNEL_KEYS}
        if unknown := set(overrides) - allowed:
            raise ValueError(f"from_pretrained cannot override {sorted(unknown)}; allowed: {sorted(allowed)}")
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as err:
            raise ImportError("loading GPT-2 weights needs transformers: pip install transformers") from err

        hf_model = GPT2LMHeadModel.from_pretrained(name_or_dir, local_files_only=local_files_only)
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

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, for_compile=False):
        """
        AdamW with weight decay on matrices and embeddings only (not biases or LayerNorm gains); fused on CUDA. For
        torch.compile (for_compile), as PyTorch's compiled-optimizer recipe makes it: not fused (the compiler makes its
        own kernels from AdamW's code; a fused one is opaque to it), and the learning rate a tensor, which a schedule
        sets without the step being compiled anew for every value.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if for_compile:
            return torch.optim.AdamW(groups, lr=torch.tensor(learning_rate), betas=betas)
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N for the weights plus 12·L·C·T for attention
        scores and values (counted in full, as the PaLM paper and nanoGPT do, though causal masking halves it).
        N counts all of c_attn, also the K/V rows that SLA layers leave out (GPTConfig.skip_unread_kv)."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * (seq_len or cfg.block_size)

    def estimate_mfu(self, tokens_per_second: float, seq_len: int | None = None) -> float | None:
        """Model FLOPs utilisation against the detected GPU's dense bf16 peak; None where that peak is unknown."""
        peak = gpu_peak_bf16_flops()
        return None if peak is None else self.flops_per_token(seq_len) * tokens_per_second / peak

    # Generation, after PyTorch's gpt-fast: the prompt fills a static KV cache in one pass (prefill), then each
    # new token is one decode step whose shapes never change, so that it compiles (and plans its kernels) once.

    def kv_cache_for(self, idx) -> KVCache:
        """
        The KV cache for idx's batch size and device, in the dtype K and V are computed in (autocast's, if on).
        Made once and kept: a compiled decode step replays on the same buffers.
        """
        device_type = idx.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else self.lm_head.weight.dtype
        if self.kv_cache is None or not self.kv_cache.fits(self.config, idx.size(0), idx.device, dtype):
            self.kv_cache = None  # frees the old buffers before the new ones are made
            self.kv_cache = KVCache(self.config, idx.size(0), idx.device, dtype)
        return self.kv_cache

    @torch.no_grad()
    def prefill(self, idx, kv_cache: KVCache):
        """Run idx (B, T <= block_size) from position 0 into kv_cache; the float32 logits of its last token (B, V)."""
        with _sdpa_without_cudnn():
            x = self.hidden_states(idx, kv_cache)
        return self.lm_head(x[:, -1, :]).float()

    @torch.no_grad()
    def decode_step(self, idx, input_pos, kv_cache: KVCache):
        """The float32 logits (B, V) after one more token idx (B, 1) at position input_pos (1,), via kv_cache."""
        x = self.hidden_states(idx, kv_cache, input_pos)
        return self.lm_head(x[:, -1, :]).float()

    @torch.no_grad()
    def decode_token(self, idx, input_pos, kv_cache: KVCache, temperature: float, top_k: int | None = None, noise=None):
        """
        What generate does per new token once the prompt is in the cache: decode_step, then sample_next_token with
        noise (multinomial_noise, drawn beforehand). The next token (B, 1) and the logits (B, V) it was drawn from.
        """
        logits = self.decode_step(idx, input_pos, kv_cache)
        return sample_next_token(logits, temperature, top_k, noise), logits

    def compile_decode_step(self, backend="inductor", freeze_weights=False):
        """
        Compile decode_token, the function generate runs once per new token (the model's step and the sampling), as
        a whole graph (an error if it breaks). Its shapes never change, so it compiles once per temperature and
        top_k (dynamic=False: they are constants of the graph), whatever the prompt. With inductor on CUDA it runs
        as a CUDA graph (mode="reduce-overhead"): one launch for the step's few hundred small kernels. Call it once
        the model is on its device; backend is torch.compile's.
        freeze_weights (inductor only): the weights become constants of the compiled step, so what only depends on
        them, such as autocast's cast of every float32 weight to bf16, is computed once when the step compiles instead
        of at every token (on an H100 those casts were 40% of GPT-2 small's decode time). The tokens stay the same;
        the step then never sees later changes to the weights: compile it again after loading or training them.
        """
        if freeze_weights and backend != "inductor":
            raise ValueError(f"freeze_weights: needs the inductor backend, not {backend!r}")
        cuda_graphs = backend == "inductor" and self.lm_head.weight.is_cuda
        eager_step = GPT.decode_token.__get__(self)  # the method, even where an earlier call replaced it
        compiled = torch.compile(
            eager_step,
            backend=backend,
            fullgraph=True,
            dynamic=False,
            # reduce-overhead's option, spelled out: torch.compile takes a mode or options, not both
            options={"triton.cudagraphs": cuda_graphs, "freezing": freeze_weights} if backend == "inductor" else None,
        )
        inductor_config = torch._inductor.config

        def decode_token(idx, input_pos, kv_cache, temperature, top_k=None, noise=None):
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are used up: their memory is free
            if not freeze_weights:
                return compiled(idx, input_pos, kv_cache, temperature, top_k, noise)
            # Tracing reads the global flag (the option alone reaches inductor too late to make the weights
            # constants), and setting it for good would freeze every no-grad compile, train.py's evaluation too.
            # Not a guard: a step traced with it keeps running as traced once it is off again.
            was_freezing, inductor_config.freezing = inductor_config.freezing, True
            try:
                return compiled(idx, input_pos, kv_cache, temperature, top_k, noise)
            finally:
                inductor_config.freezing = was_freezing

        self.decode_token = decode_token

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, generator=None):
        """
        Extend idx (B, T) by max_new_tokens tokens; temperature 0 is greedy. Once the sequence outgrows block_size,
        each step prefills the last block_size tokens anew: positions shift, so no cache holds. Nothing in the loop
        waits for the device: the host queues the steps and reads no token.
        """
        batch_size, prompt_length = idx.size()
        block_size, vocab_size = self.config.block_size, self.lm_head.weight.size(0)
        temperature = float(temperature)  # a compiled step is specialised on its type too: 1 would recompile after 1.0
        kv_cache = self.kv_cache_for(idx)
        tokens = torch.empty((batch_size, prompt_length + max_new_tokens), dtype=idx.dtype, device=idx.device)
        tokens[:, :prompt_length] = idx
        next_token = input_pos = None  # input_pos: next_token's position, on the device
        for length in range(prompt_length, prompt_length + max_new_tokens):
            # The step's random numbers, from the caller's generator, which a compiled step cannot draw from
            noise = None if temperature == 0 else multinomial_noise(batch_size, vocab_size, idx.device, generator)
            if input_pos is None or length > block_size:
                logits = self.prefill(tokens[:, max(0, length - block_size) : length], kv_cache)
                next_token = sample_next_token(logits, temperature, top_k, noise)
                input_pos = torch.full((1,), min(length, block_size), dtype=torch.long, device=idx.device)
            else:
                next_token, _ = self.decode_token(next_token, input_pos, kv_cache, temperature, top_k, noise)
                input_pos = input_pos + 1
            # a copy: a CUDA graph's output is overwritten by its next replay; a view of tokens would have strides that
            # depend on the sequence's length, and would compile the step anew for every length
            next_token = next_token.clone()
            tokens[:, length : length + 1] = next_token
        return tokens


def _sdpa_without_cudnn():
    """
    The enabled SDPA backends but cuDNN, for prompts: cuDNN builds an execution plan per new sequence length, and
    every prompt brings one. Where cuDNN is the only one enabled (bench.py --sdpa_backend=cudnn), cuDNN it is.
    """
    enabled = [
        backend
        for backend, is_enabled in (
            (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled),
            (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled),
            (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled),
        )
        if is_enabled()
    ]
    return sdpa_kernel(enabled) if enabled else nullcontext()


def sample_next_token(logits, temperature: float, top_k: int | None = None, noise=None):
    """
    The next token (B, 1) for float32 logits (B, V): the argmax at temperature 0, else drawn from the top_k with noise
    (B, V) from multinomial_noise. argmax(probs / noise) is how torch.multinomial(probs, 1) draws (an exponential race),
    from the same random numbers, so the same generator gives the same tokens, but without multinomial's checks of
    probs (inf, nan, < 0, zero sum), which wait for the device or add kernels per token; softmax of finite logits
    passes them.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return (F.softmax(logits, dim=-1) / noise).argmax(dim=-1, keepdim=True)


def multinomial_noise(batch_size: int, vocab_size: int, device, generator=None):
    """The random numbers torch.multinomial(probs, 1, generator=generator) draws for float32 probs (batch_size,
    vocab_size): one exponential(1) draw per entry, in the same order from the same generator."""
    return torch.empty((batch_size, vocab_size), dtype=torch.float32, device=device).exponential_(generator=generator)


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
