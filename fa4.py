"""
FlashAttention-4 (the flash-attn-4 package's flash_attn.cute, for Hopper and Blackwell GPUs) in place of SDPA for
causal attention without a mask: train.py --attention=fa4 trains with it, bench.py --attention=fa4 measures it.

It lives here, apart from model.py, because it is an optional kernel: model.py's attend() takes any function
(q, k, v, qkv) -> causal attention through CausalSelfAttention.causal_attention, and use_fa4 hands it this one. FA4's
autograd.Function cannot be traced by torch.compile, so its forward and backward are wrapped as custom operators
with shape-only (fake) implementations: a compiled graph calls them as opaque kernels, and SLA's selective
checkpointing saves the attention's output as it saves SDPA's instead of running the kernel again in backward.
q, k, v and the output are (B, T, n_head, head_dim), FA4's layout and attend()'s; qkv, where a plain layer has
one, is (B, T, 3, n_head, head_dim), c_attn's output, and gets its gradient written whole.

flash_attn is imported only where a kernel runs (and by check_fa4), so this module, train.py and bench.py import
without it; registering the operators needs only torch.
"""

import torch
from torch import Tensor

from model import GPT

ATTENTIONS = ("sdpa", "fa4")  # the values of train.py's and bench.py's attention key
FA4_PACKAGE = "flash-attn-4==4.0.0b36"  # the version whose API fa4_forward and fa4_backward were written against


def check_attention(attention: str, device: str, dtype: str = "auto", dropout: float = 0.0):
    """A config's attention key: one of ATTENTIONS, and for fa4 what check_fa4 needs and no dropout; a ValueError."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if attention == "fa4":
        if dropout > 0:  # refused, not ignored: the run would train without the dropout it asks for
            raise ValueError(
                f"attention: fa4 has no attention dropout, but dropout={dropout}: set --dropout=0, or use "
                f"--attention=sdpa"
            )
        check_fa4(device, dtype)


def check_fa4(device: str, dtype: str = "auto"):
    """attention=fa4 needs a CUDA device, a 16-bit dtype and flash_attn.cute; a ValueError saying which is missing.
    device is resolved ('auto' already made 'cuda' or 'cpu'); dtype is a config's ('auto' is 16-bit on CUDA)."""
    if not device.startswith("cuda"):
        raise ValueError(
            f"attention: fa4 runs on CUDA GPUs (Hopper or Blackwell) only, not on {device!r}; use --attention=sdpa"
        )
    if dtype == "float32":
        raise ValueError(
            "attention: fa4 runs in bfloat16 or float16 only, not with dtype=float32; use --dtype=auto (or bfloat16), "
            "or --attention=sdpa"
        )
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError as err:
        hint = ""
        if (getattr(err, "name", None) or "").startswith("cutlass"):
            hint = (
                " (installed with pip --target on PYTHONPATH? nvidia_cutlass_dsl puts cutlass on sys.path with a .pth "
                "file, which PYTHONPATH does not read: add <target>/nvidia_cutlass_dsl/dsl_packages to PYTHONPATH too)"
            )
        raise ValueError(
            f"attention: fa4 needs the {FA4_PACKAGE} package (pip install {FA4_PACKAGE}), or use --attention=sdpa: "
            f"{err}{hint}"
        ) from None


def _flash_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    from flash_attn.cute import flash_attn_func

    with torch.no_grad():  # the operators' autograd formulas are below, not FA4's own autograd.Function
        out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("sla_gpt::fa4_forward", mutates_args=())
def fa4_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Causal attention: the output (B, T, n_head, head_dim) and the log-sum-exp of each row's scores (B, n_head, T)."""
    return _flash_attention(q, k, v)


def _fa4_forward_fake(q, k, v):
    batch_size, seq_len, n_head, head_dim = q.shape
    out = q.new_empty((batch_size, seq_len, n_head, head_dim))
    return out, q.new_empty((batch_size, n_head, seq_len), dtype=torch.float32)


fa4_forward.register_fake(_fa4_forward_fake)


@torch.library.custom_op("sla_gpt::fa4_backward", mutates_args=())
def fa4_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of q, k and v, given the output's gradient dout and fa4_forward's out and lse."""
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, causal=True)[:3]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@fa4_backward.register_fake
def _(dout, q, k, v, out, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fa4_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _fa4_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return fa4_backward(dout.contiguous(), q, k, v, out, lse)


fa4_forward.register_autograd(_fa4_backward, setup_context=_fa4_setup_context)


# The same attention for q, k and v packed in one (B, T, 3, n_head, head_dim) tensor, as c_attn makes them in a plain
# layer. Its backward has FA4 write the three gradients into one packed tensor, which is the gradient of c_attn's
# output as it is: with separate q, k and v the compiled backward copies their gradients into one (a stack kernel,
# 1.5% of GPT-2 small's step at 4K x 4 on an H100).


@torch.library.custom_op("sla_gpt::fa4_packed_forward", mutates_args=())
def fa4_packed_forward(qkv: Tensor) -> tuple[Tensor, Tensor]:
    """fa4_forward of qkv's q, k and v: the output (B, T, n_head, head_dim) and the log-sum-exp (B, n_head, T)."""
    return _flash_attention(*qkv.unbind(dim=2))


@fa4_packed_forward.register_fake
def _(qkv):
    return _fa4_forward_fake(*qkv.unbind(dim=2))


@torch.library.custom_op("sla_gpt::fa4_packed_backward", mutates_args=())
def fa4_packed_backward(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor) -> Tensor:
    """The gradient of qkv, (B, T, 3, n_head, head_dim), written by FA4 in place of its own dq, dk and dv."""
    from flash_attn.cute.interface import _flash_attn_bwd

    dqkv = torch.empty_like(qkv)
    dq, dk, dv = dqkv.unbind(dim=2)
    _flash_attn_bwd(*qkv.unbind(dim=2), out, dout, lse, causal=True, dq=dq, dk=dk, dv=dv)
    return dqkv


@fa4_packed_backward.register_fake
def _(dout, qkv, out, lse):
    return qkv.new_empty(qkv.shape)


def _fa4_packed_backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    return fa4_packed_backward(dout.contiguous(), qkv, out, lse)


fa4_packed_forward.register_autograd(_fa4_packed_backward, setup_context=_fa4_setup_context)


def fa4_causal_attention(q: Tensor, k: Tensor, v: Tensor, qkv: Tensor | None = None) -> Tensor:
    """CausalSelfAttention.causal_attention: through the packed operators where attend() has q, k, v packed in qkv."""
    return (fa4_forward(q, k, v) if qkv is None else fa4_packed_forward(qkv))[0]


def use_fa4(model: GPT) -> GPT:
    """
    Route model's causal attention without a mask (training, evaluation, prefill) through FA4; masked attention
    (decode steps) stays with SDPA. Set on this model's attention modules, not on the class, so that other models
    in the process keep SDPA. Call it on the bare model, before torch.compile or DDP wrap it; check_fa4 first.
    """
    for block in model.transformer.h:
        block.attn.causal_attention = fa4_causal_attention
    return model
