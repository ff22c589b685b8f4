"""
Typed configuration for any dataclass, nanoGPT style: `python script.py [config/FILE.py ...] [--key=value ...]`.

Config files are plain Python run in an empty namespace; every public name they assign must be a field of the
dataclass (imported modules and `_private` names are ignored). Arguments apply left to right, so overrides
given after a config file win. Values are typed by the field annotations: int, float (an int is accepted),
str, bool (true/false/1/0/yes/no/on/off; a bare `--flag` means True), tuple[int, ...] (`--sizes=4096,8192`)
and `X | None` (`--key=None`). `--help` lists the keys with their defaults. parse_cli_explicit also says which keys
the config files and arguments set, for a script whose defaults come from elsewhere (train.py's resume).
"""

import dataclasses
import difflib
import importlib.metadata
import os
import subprocess
import sys
import types
import typing

import torch

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class ConfigError(ValueError):
    """A config file or command-line argument that does not fit the config dataclass, or settings that cannot work
    together (train.py finds some only once it knows the model's shape). The command line exits with status 2."""


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; --help lists the keys"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _split_optional(annotation) -> tuple[typing.Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _check_value(key: str, value, annotation):
    """A Python value (from a config file or parsed text) checked against, and coerced to, the annotation."""
    annotation, optional = _split_optional(annotation)
    if value is None and optional:
        return None
    if typing.get_origin(annotation) in (tuple, list) and isinstance(value, (tuple, list)):
        (element, *_) = typing.get_args(annotation) or (typing.Any,)
        items = [_check_value(key, item, element) for item in value]
        return tuple(items) if typing.get_origin(annotation) is tuple else items
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is typing.Any or (isinstance(annotation, type) and type(value) is annotation):
        return value
    expected = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"config key {key!r} expects {expected}, got {value!r} ({type(value).__name__})")


def _parse_text(key: str, text: str, annotation):
    """Command-line text for one key, converted to the annotation's type."""
    base, optional = _split_optional(annotation)
    if optional and text.lower() == "none":
        return None
    origin = typing.get_origin(base)
    if origin in (tuple, list):
        (element, *_) = typing.get_args(base) or (str,)
        items = [_parse_text(key, item.strip(), element) for item in text.split(",") if item.strip()]
        return _check_value(key, items, base)
    try:
        if base is bool:
            if text.lower() not in _TRUE | _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if base in (int, float, str):
            return base(text)
    except ValueError:
        raise ConfigError(f"config key {key!r} expects {base.__name__}, got {text!r}") from None
    raise ConfigError(f"config key {key!r} has annotation {annotation!r}, which the command line cannot set")


def _read_config_file(path: str) -> dict:
    namespace: dict = {}
    try:
        with open(path) as f:
            source = f.read()
        exec(compile(source, path, "exec"), namespace)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path!r}: {err.strerror}") from None
    except Exception as err:
        raise ConfigError(f"config file {path!r} failed: {type(err).__name__}: {err}") from None
    return {
        name: value
        for name, value in namespace.items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def parse_config(config_cls, argv: list[str]):
    """An instance of the dataclass config_cls from config files and --key=value overrides (see module doc)."""
    return make_config(config_cls, explicit_values(config_cls, argv))


def make_config(config_cls, values: dict):
    """config_cls(**values), its own checks (__post_init__) raised as ConfigError."""
    try:
        return config_cls(**values)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def explicit_values(config_cls, argv: list[str]) -> dict:
    """The values that config files and --key=value arguments in argv set, checked and typed, by key."""
    annotations = typing.get_type_hints(config_cls)
    keys = [field.name for field in dataclasses.fields(config_cls)]
    values: dict = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(describe_config(config_cls))
            raise SystemExit(0)
        if not arg.startswith("--"):
            for key, value in _read_config_file(arg).items():
                if key not in annotations:
                    raise ConfigError(f"in {arg}: {_unknown_key(key, keys)}")
                values[key] = _check_value(key, value, annotations[key])
            continue
        key, has_value, text = arg[2:].partition("=")
        if key not in keys:
            raise _unknown_key(key, keys)
        if has_value:
            values[key] = _parse_text(key, text, annotations[key])
        elif annotations[key] is bool:
            values[key] = True
        else:
            raise ConfigError(f"--{key} needs a value: write --{key}=VALUE (with '=', no space)")
    return values


def describe_config(config_cls) -> str:
    """One line per key: name, type and default (what --help prints)."""
    annotations = typing.get_type_hints(config_cls)
    lines = [f"{config_cls.__name__} keys (set in config files or as --key=value):"]
    for field in dataclasses.fields(config_cls):
        annotation = annotations[field.name]
        type_name = annotation.__name__ if type(annotation) is type else str(annotation)
        lines.append(f"  --{field.name}={field.default!r}  ({type_name})")
    return "\n".join(lines)


def parse_cli(config_cls, argv: list[str] | None = None):
    """parse_config for a script's __main__: a ConfigError prints its message and exits with status 2."""
    return parse_cli_explicit(config_cls, argv)[0]


def parse_cli_explicit(config_cls, argv: list[str] | None = None):
    """(the config, the set of keys that config files and arguments set explicitly), as parse_cli."""
    try:
        values = explicit_values(config_cls, sys.argv[1:] if argv is None else argv)
        return make_config(config_cls, values), set(values)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# ---- the device and dtype settings that train.py, sample.py and bench.py share

DTYPES = ("auto", "bfloat16", "float16", "float32")


def check_dtype(dtype: str):
    """For a config's __post_init__: the dtype key names one of DTYPES."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def resolve_freeze_weights(key: str, freeze_weights: bool | None, compile: bool) -> bool:
    """For a config's __post_init__: whether a compiled decode step freezes the weights (None: when compiled); a
    key set True without compile is an error that names it, not a setting silently unused."""
    if freeze_weights and not compile:
        raise ValueError(f"{key}: freezes the weights into the compiled decode step: add --compile")
    return compile if freeze_weights is None else freeze_weights


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")  # torch.compile's
CUDA_GRAPH_MODES = ("max-autotune", "reduce-overhead")  # compile modes that run the step as CUDA graphs


def check_compile_mode(compile_mode: str, compile: bool):
    """For a config's __post_init__: compile_mode is one of torch.compile's modes, and one other than the default is
    an error without compile (a setting that would do nothing)."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    if compile_mode != "default" and not compile:
        raise ValueError(f"compile_mode: {compile_mode!r} applies to compiled models: add --compile")


def check_device(device: str):
    """For a config's __post_init__: device is auto, cpu, cuda or cuda:N, and a GPU it names is there."""
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}, but torch sees no CUDA GPU: use --device=cpu (or auto)")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}, but torch sees {torch.cuda.device_count()} GPU(s): cuda:0 is the first")


def resolve_device(device: str) -> str:
    """'auto' is 'cuda' where a GPU is visible, else 'cpu'; any other value is used as given."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' is bfloat16 on CUDA (float16 where the GPU lacks it) and float32 on the CPU."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def autocast_context(device: str, dtype: str) -> torch.autocast:
    """Mixed precision in dtype on device's type; float32 runs without autocast."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=dtype != "float32")


# ---- what made a run, for the first line of its log (train.py) and every row (bench.py)

CODE_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ("flash-attn-4", "nvidia-cutlass-dsl")  # optional kernels whose version changes what runs


def provenance(device: str) -> dict:
    """
    The code and software a run ran on: the git commit of this code's folder and whether tracked files differed
    from it (dirty; untracked files, such as outputs, do not count), torch, the CUDA it was built for, the device
    (the GPU's name, or "cpu") and the versions of PACKAGES (None: not installed). Outside a git checkout of this
    code (a copied folder, say) commit and dirty are None and commit_error says why.
    """
    record = {"commit": None, "dirty": None, "commit_error": None}
    try:
        top = _git("rev-parse", "--show-toplevel")
        if os.path.realpath(top) != os.path.realpath(CODE_DIR):  # the code sits inside some other repository
            raise RuntimeError(f"{CODE_DIR} is not a git checkout (inside {top})")
        record["commit"] = _git("rev-parse", "HEAD")
        record["dirty"] = _git("status", "--porcelain", "--untracked-files=no") != ""
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        record["commit_error"] = str(err)
    record["torch"] = torch.__version__
    record["cuda"] = torch.version.cuda
    record["device"] = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    for package in PACKAGES:
        try:
            record[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            record[package] = None
    return record


def _git(*args: str) -> str:
    """git's output in CODE_DIR; a RuntimeError with its message where it fails (not a checkout, no git)."""
    result = subprocess.run(["git", *args], cwd=CODE_DIR, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"git {args[0]} failed")
    return result.stdout.strip()


def describe_provenance(record: dict) -> str:
    """provenance() in one line, for a run's first printed lines."""
    if record["commit"] is None:
        code = f"code: no git commit ({record['commit_error']})"
    else:
        code = f"code: commit {record['commit'][:12]}{' with uncommitted changes' if record['dirty'] else ''}"
    packages = "".join(f", {name} {record[name]}" for name in PACKAGES if record[name])
    return f"{code}; torch {record['torch']}, CUDA {record['cuda'] or '-'}, {record['device']}{packages}"
