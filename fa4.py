"""
FlashAttention-4 (the flash-attn-4 package's flash_attn.cute, for Hopper and Blackwell GPUs) in place of SDPA for
causal attention without a mask: a model built with GPTConfig(attention="fa4") trains, evaluates and prefills with it;
train.py and bench.py choose it with --attention (auto: where it runs).

It lives here, apart from model.py, because it is an optional kernel: model.py's attend() takes any function
(q, k, v, qkv, skip_kv) -> causal attention, and model.causal_attention_kernel("fa4") is this module's
fa4_causal_attention. FA4's autograd.Function cannot be traced by torch.compile, so its forward and backward are
wrapped as custom operators with shape-only (fake) implementations: a compiled graph calls them as opaque kernels.
q, k, v and the output are (B, T, heads, head_dim), FA4's layout and attend()'s.

flash_attn is imported only where a kernel runs (and by check_fa4), so this module, train.py and bench.py import
without it; registering the operators needs only torch. requirements-fa4.txt pins the package and what it pulls in.
"""

import functools

import torch
from torch import Tensor

ATTENTIONS = ("auto", "sdpa", "fa4")  # the values of train.py's and bench.py's attention key
FA4_PACKAGE = "flash-attn-4==4.0.0b36"  # the version whose API fa4_forward and fa4_backward were written against
FA4_GPU_MAJORS = (9, 10, 11)  # compute capabilities attention=auto picks FA4 on: Hopper (9.0), Blackwell (10.x, 11.x)


def check_attention(attention: str, device: str, dtype: str = "auto", dropout: float = 0.0):
    """A config's attention key: one of ATTENTIONS, and for fa4 what check_fa4 needs and no dropout; a ValueError.
    auto needs nothing: it chooses what runs (resolve_attention)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if attention == "fa4":
        if dropout > 0:  # refused, not ignored: the run would train without the dropout it asks for
            raise ValueError(
                f"attention: fa4 has no attention dropout, but dropout={dropout}: set --dropout=0, or use "
                f"--attention=sdpa"
            )
        check_fa4(device, dtype)


def resolve_attention(attention: str, device: str, dtype: str, dropout: float = 0.0) -> str:
    """
    The kernel a config's attention key runs: auto is fa4 where it runs and is the faster one (a Hopper or Blackwell
    GPU, bfloat16 or float16, no dropout, flash_attn.cute importable), else sdpa; sdpa and fa4 are as given. device
    and dtype are resolved (configurator.resolve_device, resolve_dtype).
    """
    if attention != "auto":
        return attention
    if dropout > 0 or not device.startswith("cuda") or dtype not in ("bfloat16", "float16"):
        return "sdpa"
    if torch.cuda.get_device_capability(device)[0] not in FA4_GPU_MAJORS:
        return "sdpa"
    try:
        check_fa4(device, dtype)
    except ValueError:  # flash-attn-4 not installed, or not importable
        return "sdpa"
    return "fa4"


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
        hint, missing = "", getattr(err, "name", None) or ""
        if missing == "cutlass":
            hint = (
                " (installed with pip --target on PYTHONPATH? nvidia_cutlass_dsl puts cutlass on sys.path with a .pth "
                "file, which PYTHONPATH does not read: add <target>/nvidia_cutlass_dsl/dsl_packages to PYTHONPATH too)"
            )
        elif missing.startswith("cutlass."):  # cutlass/ holds only the compiler libraries' _mlir
            hint = " (nvidia-cutlass-dsl-libs-core, which holds cutlass.cute, is missing: requirements-fa4.txt has it)"
        raise ValueError(
            f"attention: fa4 needs the {FA4_PACKAGE} package and what requirements-fa4.txt pins with it (pip "
            f"install -r requirements-fa4.txt), or use --attention=sdpa: {err}{hint}"
        ) from None


# One pair of operators for every layer. A layer's c_attn output qkv, (B, T, n_head + 2 * kv_heads, head_dim), holds
# q, then its own K and V (see CausalSelfAttention.project_qkv). An SLA layer's skip heads 0 .. S-1 attend over the
# earlier layer's skip_k and skip_v (B, T, S, head_dim), its other heads over the last n_head - S own K/V heads: FA4
# runs once per group of heads, each writing its part of one output. So no SLA layer copies its two K/V sources into
# one tensor as SDPA needs, and the backward writes the gradients of q and of the own K/V straight into one tensor,
# the gradient of c_attn's output: separate gradients would be copied into one (a stack or cat kernel, 1.5% of GPT-2
# small's step at 4K x 4 on an H100 for the plain layers' alone).
# The price: a call over a few heads leaves most SMs idle in its last waves (the 3 own heads of a GPT-2 small SLA layer
# at skip 9), so the two calls run side by side on two CUDA streams, the second group's blocks filling the first's
# tail. On one stream SLA's step took 1.3-1.8% longer than plain's at GPT-2 small 16K on an H100; on two, 0.4% less to
# 0.1% more (results/speed/streams-ab.log, tools/fa4_streams_ab.py). Copying the two K/V into one tensor for one
# call measured alike with one stream, and copying inside the operator (aten's cat) slower still.


def _head_groups(qkv: Tensor, n_head: int, skip_k: Tensor | None, skip_v: Tensor | None):
    """
    q; (heads, k, v) for each group of heads that attends over one K/V: the skip heads, then the own heads (either
    may be none: FA4 is called with no empty group); and the own k and v of the heads that a later layer reads but
    this one does not attend over (no heads where there are none).
    """
    n_kv = (qkv.size(2) - n_head) // 2
    q, k, v = qkv.split([n_head, n_kv, n_kv], dim=2)
    n_skip = 0 if skip_k is None else skip_k.size(2)
    own = slice(n_kv - (n_head - n_skip), n_kv)
    groups = [(slice(0, n_skip), skip_k, skip_v), (slice(n_skip, n_head), k[:, :, own], v[:, :, own])]
    unattended = (k[:, :, : own.start], v[:, :, : own.start])
    return q, [group for group in groups if group[0].stop > group[0].start], unattended


_side_streams: dict[torch.device, torch.cuda.Stream] = {}  # one per GPU, made on first use


def _side_by_side(kernel_calls: list, device: torch.device):
    """
    Run each group's kernel calls (one or two); on a GPU the second group's on a side stream that starts after
    everything queued before this operator and that the current stream waits for before anything queued after it.
    """
    if device.type != "cuda" or len(kernel_calls) == 1:
        for call in kernel_calls:
            call()
        return
    first, second = kernel_calls
    main = torch.cuda.current_stream(device)
    side = _side_streams.get(device)
    if side is None:
        side = _side_streams[device] = torch.cuda.Stream(device)
    side.wait_stream(main)  # the inputs, and the outputs allocated (and zeroed) on the current stream
    first()
    with torch.cuda.stream(side):
        second()
    main.wait_stream(side)  # the outputs are read, and the side stream's inputs freed, after this


@torch.library.custom_op("sla_gpt::fa4_forward", mutates_args=())
def fa4_forward(qkv: Tensor, n_head: int, skip_k: Tensor | None, skip_v: Tensor | None) -> tuple[Tensor, Tensor]:
    """Causal attention: the output (B, T, n_head, head_dim) and the log-sum-exp of each row's scores (B, n_head, T)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _fa4_forward_fake(qkv, n_head, skip_k, skip_v)
    q, groups, _ = _head_groups(qkv, n_head, skip_k, skip_v)
    _side_by_side(
        [
            functools.partial(
                _flash_attn_fwd, q[:, :, heads], k, v, causal=True, return_lse=True, out=out[:, :, heads],
                lse=lse[:, heads],
            )
            for heads, k, v in groups
        ],
        qkv.device,
    )  # fmt: skip
    return out, lse


@fa4_forward.register_fake
def _fa4_forward_fake(qkv, n_head, skip_k, skip_v):
    batch_size, seq_len, _, head_dim = qkv.shape
    out = qkv.new_empty((batch_size, seq_len, n_head, head_dim))
    return out, qkv.new_empty((batch_size, n_head, seq_len), dtype=torch.float32)


@torch.library.custom_op("sla_gpt::fa4_backward", mutates_args=())
def fa4_backward(
    dout: Tensor, qkv: Tensor, n_head: int, skip_k: Tensor | None, skip_v: Tensor | None, out: Tensor, lse: Tensor
) -> list[Tensor]:
    """
    The gradients of qkv (zero for own K/V heads that this layer does not attend over), and of skip_k and skip_v if
    given; from the output's gradient dout and fa4_forward's out and lse. FA4 writes them in place of its own.
    """
    from flash_attn.cute.interface import _flash_attn_bwd

    grads = _fa4_backward_fake(dout, qkv, n_head, skip_k, skip_v, out, lse)
    q, groups, _ = _head_groups(qkv, n_head, skip_k, skip_v)
    dq, grad_groups, unattended = _head_groups(grads[0], n_head, *(grads[1:] or (None, None)))
    for grad in unattended:  # their gradient is the later layer's alone, added to this zero
        grad.zero_()
    _side_by_side(
        [
            functools.partial(
                _flash_attn_bwd, q[:, :, heads], k, v, out[:, :, heads], dout[:, :, heads], lse[:, heads],
                causal=True, dq=dq[:, :, heads], dk=dk, dv=dv,
            )
            for (heads, k, v), (_, dk, dv) in zip(groups, grad_groups, strict=True)
        ],
        qkv.device,
    )  # fmt: skip
    return grads


@fa4_backward.register_fake
def _fa4_backward_fake(dout, qkv, n_head, skip_k, skip_v, out, lse):
    return [torch.empty_like(qkv)] + ([] if skip_k is None else [torch.empty_like(skip_k), torch.empty_like(skip_v)])


def _fa4_setup_context(ctx, inputs, output):
    qkv, ctx.n_head, skip_k, skip_v = inputs
    ctx.save_for_backward(qkv, skip_k, skip_v, *output)


def _fa4_backward(ctx, dout, _dlse):
    qkv, skip_k, skip_v, out, lse = ctx.saved_tensors
    grads = fa4_backward(dout.contiguous(), qkv, ctx.n_head, skip_k, skip_v, out, lse)
    return grads[0], None, *(grads[1:] or (None, None))


fa4_forward.register_autograd(_fa4_backward, setup_context=_fa4_setup_context)


def fa4_causal_attention(q: Tensor, k: Tensor, v: Tensor, qkv: Tensor | None = None, skip_kv=None) -> Tensor:
    """attend()'s attention through the operators (model.causal_attention_kernel("fa4")). Where q, k and v are not
    views of one qkv (from a KV cache: prefill, no gradient), they are packed into one by a copy."""
    if qkv is None:
        qkv = torch.cat([q, k, v], dim=2)
    return fa4_forward(qkv, q.size(2), *(skip_kv or (None, None)))[0]
