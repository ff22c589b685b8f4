"""fa4.py on the CPU, around a reference stand-in for FlashAttention-4's kernels: its custom operators train as SDPA
(plain and SLA, eager and compiled), GPTConfig(attention="fa4") routes that model only, train.py --attention=fa4 and
bench.py --attention=fa4 run through it, attention=auto chooses it where it runs, a run may switch attention on resume,
sample.py and the scripts need no flash_attn, and the attention key's errors. The real kernels are checked against
SDPA in tests/test_gpu.py."""

import contextlib
import dataclasses
import json
import math
import subprocess
import sys
import types

import pytest
import torch
from conftest import REPO, SUBPROCESS_ENV, tiny_settings

import bench
import fa4
import sample
import train
from configurator import ConfigError, parse_config
from fa4 import FA4_PACKAGE, check_fa4, fa4_causal_attention, resolve_attention
from model import GPT, GPTConfig
from train import TrainConfig, load_checkpoint, main


def reference_attention(q, k, v):
    """Causal attention of (B, T, H, D) inputs in float32: the output and each row's log-sum-exp (B, H, T)."""
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    lse = scores.logsumexp(-1)
    return ((scores - lse.unsqueeze(-1)).exp() @ v).transpose(1, 2), lse, scores


class KernelCalls(dict):
    """Kernel calls by kind; forward_storages: each forward call's q, k and v, as the storages they are views of."""

    def __init__(self, counts: dict):
        super().__init__(counts)
        self.forward_storages = []


@pytest.fixture
def flash_attn_stand_in(monkeypatch):
    """flash_attn.cute's two functions that fa4.py calls, as FA4 4.0.0b36 defines them, computed in plain torch
    (FlashAttention's backward formulas); the calls are counted."""
    calls = KernelCalls({"forward": 0, "backward": 0, "backward into one tensor": 0})

    def _flash_attn_fwd(q, k, v, causal=False, return_lse=False, out=None, lse=None):
        assert causal and return_lse and q.shape == k.shape == v.shape
        assert q.size(2) > 0  # FA4 divides by the number of K/V heads
        calls["forward"] += 1
        calls.forward_storages.append(tuple(x.untyped_storage().data_ptr() for x in (q, k, v)))
        reference_out, reference_lse, _ = reference_attention(q, k, v)
        if out is None:
            return reference_out.to(q.dtype), reference_lse, None, None, None
        # written into the given tensors (views of a larger output, say), which must be of FA4's shapes and dtypes
        assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == reference_lse.shape
        out.copy_(reference_out)
        lse.copy_(reference_lse)
        return out, lse, None, None, None

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, dq=None, dk=None, dv=None):
        assert causal and q.size(2) > 0
        calls["backward"] += 1
        _, _, scores = reference_attention(q, k, v)
        p = (scores - lse.unsqueeze(-1)).exp()  # (B, H, T, T)
        qt, kt, vt, ot, dot = (x.transpose(1, 2).float() for x in (q, k, v, out, dout))
        dp = dot @ vt.transpose(-1, -2)
        ds = p * (dp - (dot * ot).sum(-1, keepdim=True)) / math.sqrt(q.size(-1))
        grads = (ds @ kt, ds.transpose(-1, -2) @ qt, p.transpose(-1, -2) @ dot)
        grads = tuple(x.transpose(1, 2).to(q.dtype) for x in grads)
        if dq is None:
            return grads
        # written into the given tensors, which must be of q's shape and dtype, as FA4 asserts
        assert all(given.shape == q.shape and given.dtype == q.dtype for given in (dq, dk, dv))
        if len({given.untyped_storage().data_ptr() for given in (dq, dk, dv)}) == 1:
            calls["backward into one tensor"] += 1
        for given, grad in zip((dq, dk, dv), grads, strict=True):
            given.copy_(grad)
        return dq, dk, dv

    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = _flash_attn_fwd, _flash_attn_bwd
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface
    package = types.ModuleType("flash_attn")
    package.cute = cute
    for name, module in (("flash_attn", package), ("flash_attn.cute", cute), ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.fixture
def fa4_on_the_cpu(monkeypatch):
    """train.py and bench.py accept attention=fa4 on the CPU, where the stand-in runs it."""
    monkeypatch.setattr(fa4, "check_fa4", lambda device, dtype="auto": None)  # fa4.check_attention calls it


@pytest.mark.parametrize("sla", [False, True])
@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_fa4_model_trains_as_sdpa(flash_attn_stand_in, sla, backend):
    """A model configured with attention="fa4" gets SDPA's loss and gradients through the custom operators, eagerly
    and compiled (their shape-only implementations traced); an SLA layer (skip 1) attends with two kernel calls, one
    per K/V source, in forward and in backward, none recomputed. Other models keep SDPA."""
    idx = torch.randint(256, (2, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for attention in ("sdpa", "fa4"):
        torch.manual_seed(0)
        config = GPTConfig(
            block_size=32, vocab_size=256, n_layer=4, n_head=4, n_embd=64, sla=sla, sla_skip=1, attention=attention
        )
        model = GPT(config)
        forward = model if backend is None else torch.compile(model, backend=backend)
        _, loss = forward(idx[:, :-1], idx[:, 1:], return_logits=False)
        loss.backward()
        results.append((loss.item(), [p.grad for p in model.parameters()]))
    (sdpa_loss, sdpa_grads), (fa4_loss, fa4_grads) = results
    assert fa4_loss == pytest.approx(sdpa_loss, rel=1e-5)
    for sdpa_grad, fa4_grad in zip(sdpa_grads, fa4_grads, strict=True):
        torch.testing.assert_close(fa4_grad, sdpa_grad, rtol=1e-4, atol=1e-6)
    # every layer, none run twice: a plain layer in one call, an SLA layer (3 of 4 with sla) in two. A layer's own
    # heads' gradients are written into one tensor, the gradient of c_attn's output; the skip heads' dk and dv apart
    # (they are the earlier layer's)
    calls = 1 + 3 * 2 if sla else 4
    assert flash_attn_stand_in == {"forward": calls, "backward": calls, "backward into one tensor": 4}
    # and no copies: every call reads q, k and v where c_attn put them, in its layer's output or, for the skip
    # heads' K/V, in the earlier layer's
    storages = flash_attn_stand_in.forward_storages
    layer_outputs = list(dict.fromkeys(q for q, _, _ in storages))
    assert len(layer_outputs) == 4
    for number, (q, k, v) in enumerate(storages):
        assert k == v and k in layer_outputs[: layer_outputs.index(q) + 1], f"call {number} reads a copy"

    # the configuration of that model: a model of the default configuration keeps SDPA
    assert all(block.attn.causal_attention is fa4_causal_attention for block in model.transformer.h)
    default = dataclasses.replace(model.config, attention=GPTConfig.attention)
    assert all(block.attn.causal_attention is None for block in GPT(default).transformer.h)

    # a prompt (no mask) goes through FA4 too; decoding's masked steps stay with SDPA
    model.eval()
    with torch.no_grad():
        model.generate(idx[:, :5], 3)
    assert flash_attn_stand_in == {"forward": 2 * calls, "backward": calls, "backward into one tensor": 4}


def test_second_head_group_runs_on_a_side_stream_joined_both_ways(monkeypatch):
    """On a GPU an SLA layer's second group of heads runs on a side stream, beside the first group on the current
    stream: the side stream waits for the current one before its kernels and the current one for the side stream
    after them (either wait missing is a race: FA4 reading inputs not yet written, or later kernels reading outputs
    not yet written). One side stream per GPU, made once; CPU tensors and a lone group stay on the current stream.
    CUDA's stream API is replaced by fakes that record the order: no GPU needed."""
    events, made, current = [], [], ["main"]

    class FakeStream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    @contextlib.contextmanager
    def stream(on):
        previous, current[0] = current[0], on.name
        try:
            yield
        finally:
            current[0] = previous

    main_stream = FakeStream("main")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main_stream)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: made.append(device) or FakeStream("side"))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(fa4, "_side_streams", {})

    def kernels(*groups):
        return [lambda group=group: events.append(f"{group} on {current[0]}") for group in groups]

    gpu = torch.device("cuda", 0)
    for _ in range(2):
        events.clear()
        fa4._side_by_side(kernels("skip heads", "own heads"), gpu)
        assert events == ["side waits for main", "skip heads on main", "own heads on side", "main waits for side"]
    assert made == [gpu]
    events.clear()
    fa4._side_by_side(kernels("skip heads", "own heads"), torch.device("cpu"))
    fa4._side_by_side(kernels("own heads"), gpu)
    assert events == ["skip heads on main", "own heads on main", "own heads on main"]


def read_log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def losses(out_dir) -> dict[tuple[int, str], float]:
    """Every logged training and validation loss, by (iter, key)."""
    return {
        (line["iter"], key): value
        for line in read_log(out_dir)
        for key, value in line.items()
        if key == "train/loss" or key.startswith("val/loss")
    }


def assert_same_losses(got: dict, expected: dict):
    assert got.keys() == expected.keys() and len(expected) > 0
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key


def test_train_py_trains_through_fa4(flash_attn_stand_in, fa4_on_the_cpu, byte_data, tmp_path):
    """attention=fa4 routes training and evaluation through the operators, to SDPA's losses; sdpa never calls them."""
    settings = tiny_settings(byte_data, tmp_path, sla=True, sla_skip=1, max_iters=4, eval_interval=2)
    main(TrainConfig(**{**settings, "out_dir": str(tmp_path / "sdpa")}))  # attention left at its default
    assert flash_attn_stand_in == {"forward": 0, "backward": 0, "backward into one tensor": 0}
    assert [line["config"]["attention"] for line in read_log(tmp_path / "sdpa") if "config" in line] == ["sdpa"]
    main(TrainConfig(**{**settings, "out_dir": str(tmp_path / "fa4"), "attention": "fa4"}))

    n_layer, micro_steps = settings["n_layer"], settings["max_iters"] * settings["gradient_accumulation_steps"]
    # evaluations at iters 0, 2, 4: eval_iters batches of batch_size windows at T = block_size
    eval_forwards = 3 * settings["eval_iters"]
    # layer 0 plain, layer 1 SLA (sla_skip=1) with both its heads skipping: one call each, over its own K/V and over
    # layer 0's (no call over an empty group of heads: FA4 cannot make one)
    assert (n_layer, settings["n_head"], settings.get("sla_head_ratio", 0.75)) == (2, 2, 0.75)
    assert flash_attn_stand_in == {
        "forward": 2 * (micro_steps + eval_forwards),
        "backward": 2 * micro_steps,  # the attention is saved for backward, not run again
        "backward into one tensor": micro_steps,  # layer 0's; layer 1's dk and dv are layer 0's, apart
    }
    assert_same_losses(losses(tmp_path / "fa4"), losses(tmp_path / "sdpa"))
    assert [line["config"]["attention"] for line in read_log(tmp_path / "fa4") if "config" in line] == ["fa4"]
    assert load_checkpoint(str(tmp_path / "fa4"))["config"]["attention"] == "fa4"


def test_resume_may_switch_attention(flash_attn_stand_in, fa4_on_the_cpu, byte_data, tmp_path, monkeypatch, capsys):
    """Attention changes kernels, not the math: a resumed run may switch it (no 'no longer an exact continuation'
    note) and continues to the uninterrupted run's losses. An fa4 checkpoint where FA4 cannot run is an error that
    names the fix, and sample.py reads it without flash_attn."""
    reference = tiny_settings(byte_data, tmp_path / "reference", max_iters=6, eval_interval=3)
    main(TrainConfig(**reference))
    resume_keys = {"out_dir", "init_from", "max_iters", "attention"}  # as `--attention=...` on the command line
    for first, then in (("fa4", "sdpa"), ("sdpa", "fa4")):
        out_dir = tmp_path / f"{first}-then-{then}"
        interrupted = {**reference, "out_dir": str(out_dir), "max_iters": 3}
        main(TrainConfig(**interrupted, attention=first))
        if first == "fa4":
            with monkeypatch.context() as real:
                real.setattr(fa4, "check_fa4", check_fa4)  # the real check: FA4 cannot run on the saved cpu
                resume = TrainConfig(**{**interrupted, "init_from": "resume", "max_iters": 6})
                with pytest.raises(ConfigError, match=r"attention: fa4 runs on CUDA GPUs .* use --attention=sdpa"):
                    main(resume, explicit_keys={"out_dir", "init_from", "max_iters"})
                real.setitem(sys.modules, "flash_attn", None)  # sampling needs no flash_attn
                samples = sample.main(
                    sample.SampleConfig(out_dir=str(out_dir), device="cpu", num_samples=2, max_new_tokens=8)
                )
                assert len(samples) == 2
        capsys.readouterr()
        resume = TrainConfig(**{**interrupted, "init_from": "resume", "max_iters": 6, "attention": then})
        main(resume, explicit_keys=resume_keys)
        assert "no longer an exact continuation" not in capsys.readouterr().out
        assert_same_losses(losses(out_dir), losses(tmp_path / "reference"))
        assert [line["config"]["attention"] for line in read_log(out_dir) if "config" in line] == [first, then]
    assert flash_attn_stand_in["backward"] == 2 * (2 * 3 * 2)  # each direction: 2 layers, 3 steps of 2 micro-steps


def test_bench_routes_our_models_through_fa4(flash_attn_stand_in, fa4_on_the_cpu):
    """bench.py --attention=fa4 measures our models through the operators, to SDPA's losses."""
    settings = dict(shapes=("tiny:16:1",), sla_skips=(1,), device="cpu", warmup_steps=1, rounds=1, block_steps=1,
                    vocab_size=256, decode_tokens=0)  # fmt: skip
    sdpa_rows = bench.main(bench.BenchConfig(**settings))
    assert flash_attn_stand_in["forward"] == 0
    fa4_rows = bench.main(bench.BenchConfig(**settings, attention="fa4"))
    assert flash_attn_stand_in["backward"] == 2 * (12 + 1 + 11 * 2)  # 2 steps of plain and SLA (11 layers skip)
    for sdpa_row, fa4_row in zip(sdpa_rows, fa4_rows, strict=True):
        assert fa4_row["attention"] == "fa4" and fa4_row["model"] == sdpa_row["model"]
        assert fa4_row["first_loss"] == pytest.approx(sdpa_row["first_loss"], rel=1e-5)
        assert fa4_row["loss"] == pytest.approx(sdpa_row["loss"], rel=1e-4)


def test_auto_attention_is_fa4_where_it_runs(monkeypatch):
    """attention=auto: FA4 on a Hopper or Blackwell GPU in bfloat16 or float16, without dropout, where flash_attn.cute
    imports; SDPA anywhere else. sdpa and fa4 stay as given."""
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(fa4, "check_fa4", lambda device, dtype="auto": None)  # the package imports
    assert resolve_attention("auto", "cuda:0", "bfloat16") == "fa4"
    assert resolve_attention("auto", "cuda", "float16") == "fa4"
    assert resolve_attention("auto", "cuda:0", "float32") == "sdpa"
    assert resolve_attention("auto", "cuda:0", "bfloat16", dropout=0.1) == "sdpa"
    assert resolve_attention("auto", "cpu", "float32") == "sdpa"
    for major, expected in ((8, "sdpa"), (10, "fa4"), (11, "fa4"), (12, "sdpa")):
        capability[0] = (major, 0)
        assert resolve_attention("auto", "cuda:0", "bfloat16") == expected, major
    assert resolve_attention("sdpa", "cuda:0", "bfloat16") == "sdpa"
    assert resolve_attention("fa4", "cpu", "float32") == "fa4"  # as given: check_attention refuses it
    monkeypatch.setattr(fa4, "check_fa4", check_fa4)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    assert resolve_attention("auto", "cuda:0", "bfloat16") == "sdpa"


def test_train_py_records_which_attention_auto_chose(flash_attn_stand_in, fa4_on_the_cpu, byte_data, tmp_path,
                                                     monkeypatch, capsys):  # fmt: skip
    """The first printed lines and the log's config say which kernel attention=auto ran; the checkpoint keeps auto, so
    a run resumed on a machine where FA4 does not run chooses SDPA and goes on."""
    settings = tiny_settings(byte_data, tmp_path, max_iters=4, eval_interval=2)
    assert TrainConfig(**settings).attention == "auto"  # the default
    monkeypatch.setattr(train, "resolve_attention", lambda attention, *_: "fa4" if attention == "auto" else attention)
    main(TrainConfig(**{**settings, "max_iters": 2}))
    assert "attention fa4 (auto)" in capsys.readouterr().out.split("tokens per optimizer step")[0]
    assert flash_attn_stand_in["backward"] > 0
    checkpoint = load_checkpoint(str(tmp_path))
    assert checkpoint["config"]["attention"] == "auto" and "attention" not in checkpoint["model_args"]
    monkeypatch.undo()
    main(TrainConfig(**{**settings, "init_from": "resume"}))  # on the CPU: SDPA
    configs = [line for line in read_log(tmp_path) if "config" in line]
    assert [line["config"]["attention"] for line in configs] == ["fa4", "sdpa"]
    assert [line["model_args"]["attention"] for line in configs] == ["fa4", "sdpa"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--attention=flex"], "attention must be one of auto, sdpa, fa4, got 'flex'"),
        (
            ["--attention=fa4", "--device=cpu"],
            "attention: fa4 runs on CUDA GPUs (Hopper or Blackwell) only, not on 'cpu'; use --attention=sdpa",
        ),
        (
            ["--attention=fa4", "--device=cpu", "--dropout=0.1"],
            "attention: fa4 has no attention dropout, but dropout=0.1: set --dropout=0, or use --attention=sdpa",
        ),
        (
            ["--attention=fa4", "--device=cuda", "--dtype=float32"],
            "attention: fa4 runs in bfloat16 or float16 only, not with dtype=float32; use --dtype=auto (or bfloat16), "
            "or --attention=sdpa",
        ),
        (
            ["--attention=fa4", "--device=cuda"],
            f"attention: fa4 needs the {FA4_PACKAGE} package and what requirements-fa4.txt pins with it (pip install "
            f"-r requirements-fa4.txt), or use --attention=sdpa: ",
        ),
    ],
)
def test_attention_errors_name_the_key_and_the_fix(monkeypatch, argv, message):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed, also on a machine where it is
    with pytest.raises(ConfigError) as error:
        parse_config(TrainConfig, argv)
    assert str(error.value).startswith(message)


def test_missing_cutlass_points_at_the_dsl_packages_folder(tmp_path, monkeypatch):
    """flash-attn-4 installed with pip --target on PYTHONPATH: flash_attn imports, cutlass does not, because
    nvidia_cutlass_dsl adds it to sys.path with a .pth file that PYTHONPATH does not read."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("import cutlass\n")
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # put back afterwards where flash_attn is installed
    monkeypatch.setitem(sys.modules, "cutlass", None)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ValueError, match=r"add <target>/nvidia_cutlass_dsl/dsl_packages to PYTHONPATH"):
            check_fa4("cuda", "bfloat16")
    finally:
        for name in ("flash_attn", "flash_attn.cute"):
            sys.modules.pop(name, None)


def test_missing_cutlass_cute_points_at_the_core_library(tmp_path, monkeypatch):
    """nvidia-cutlass-dsl's compiler libraries installed without nvidia-cutlass-dsl-libs-core: cutlass is a namespace
    holding only _mlir, and `import cutlass.cute` fails."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("import cutlass.cute\n")
    (tmp_path / "cutlass" / "_mlir").mkdir(parents=True)  # what libs-base and libs-cu13 put there: no __init__.py
    for name in ("flash_attn", "flash_attn.cute", "cutlass", "cutlass.cute"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ValueError, match=r"No module named 'cutlass.cute' \(nvidia-cutlass-dsl-libs-core, which"):
            check_fa4("cuda", "bfloat16")
    finally:
        for name in ("flash_attn", "flash_attn.cute", "cutlass"):
            sys.modules.pop(name, None)


def test_scripts_import_and_refuse_fa4_without_flash_attn():
    """Importing fa4.py, train.py, bench.py and sample.py imports no flash_attn (the operators register without it);
    train.py --attention=fa4 then exits 2 naming the package."""
    code = (
        "import runpy, sys\n"
        "sys.modules['flash_attn'] = None  # an import of it raises, as if not installed\n"
        "import fa4, bench, sample, train, torch\n"
        "assert torch.ops.sla_gpt.fa4_forward is not None\n"
        "sys.argv = ['train.py', '--attention=fa4', '--device=cuda']\n"
        "runpy.run_path('train.py', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: attention: fa4 needs the {FA4_PACKAGE} package"), result.stderr[-3000:]
