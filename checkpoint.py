"""
The checkpoint file that train.py writes and train.py, sample.py and bench.py read: one dict saved with torch.save
and loaded with torch.load(weights_only=True), so a file from elsewhere can hold no code that runs.

Keys: model (the bare model's state dict), model_args (GPTConfig's fields but the kernel choices), meta (the
training data's meta.json, tokenizer included), and for resuming: optimizer, scaler, config, iter_num, tokens_seen,
best_val_loss and rng (each rank's RNG states; the data windows follow from iter_num). train.py's training_state()
builds it.
"""

import contextlib
import dataclasses
import os
import pickle
import random
import zipfile

import numpy as np
import torch

from model import GPT, KERNEL_KEYS, GPTConfig

READ_KEYS = ("model", "model_args", "meta")  # what any reader needs; resuming needs RESUME_KEYS as well
RESUME_KEYS = ("optimizer", "scaler", "config", "iter_num", "tokens_seen", "best_val_loss", "rng")


class TrainError(RuntimeError):
    """A problem the user fixes (data, settings, files, divergence); the message says how. CLI: printed, exit 1."""


def save_checkpoint(checkpoint: dict, path: str):
    """
    Atomic: written to a temporary file beside path, then renamed over it, so a crash while writing leaves the
    previous checkpoint as it was. The temporary file is named by process, so two runs on one out_dir never
    write the same one. A failed write (full disk, read-only folder) removes it and raises a TrainError.
    """
    temp_path = f"{path}.{os.getpid()}.tmp"
    writer = _WholeWrites()
    try:
        with open(temp_path, "wb", buffering=0) as temp_file:
            writer.raw_file = temp_file
            torch.save(checkpoint, writer)
        os.replace(temp_path, path)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp_path)
        err = writer.error or err  # torch reports a failed write mid-file only as "unexpected pos"
        cause = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
        folder = os.path.dirname(os.path.abspath(path))
        kept = f"{path} left as it was" if os.path.exists(path) else f"no {os.path.basename(path)} written"
        raise TrainError(
            f"cannot save {os.path.basename(path)} in {folder}: {cause}; {kept}. "
            f"Free space or make the folder writable, then resume with --init_from=resume"
        ) from None


class _WholeWrites:
    """The file torch.save writes to: each write() writes all its bytes, and keeps the OSError of one that fails."""

    raw_file = None
    error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[self.raw_file.write(view) :]
        except OSError as err:
            self.error = self.error or err
            raise
        return len(data)

    def flush(self):
        self.raw_file.flush()


def first_line(err: Exception) -> str:
    """An error's message in one line (its first), or its type's name if it has none."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint that train.py wrote (a path, or a run's folder holding ckpt.pt), checked to have READ_KEYS."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise TrainError(
            f"no checkpoint at {path}: train one first (python train.py --out_dir={os.path.dirname(path)} ...), "
            f"or pass --out_dir=<a run's folder with ckpt.pt>"
        )
    damaged = f"{path} is damaged or cut off (a full disk, a killed copy?): restore it from a copy, or train again"
    # torch.save writes a zip archive; anything else (empty, zero-filled, truncated, random bytes) is no checkpoint
    if not zipfile.is_zipfile(path):
        raise TrainError(f"{damaged} (not a complete torch.save archive)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise TrainError(
            f"{path} holds Python objects other than tensors and plain values, which a weights-only load refuses "
            f"(they could run code): it is not a checkpoint that train.py wrote"
        ) from None
    except Exception as err:  # a damaged archive fails in many ways; the message names the file
        raise TrainError(f"{damaged} ({first_line(err)})") from None
    missing = [key for key in READ_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise TrainError(
            f"{path} is not a checkpoint that train.py wrote: it has no {', '.join(missing)} "
            f"(a bare state dict?); train.py saves a dict with {', '.join(READ_KEYS + RESUME_KEYS)}"
        )
    return checkpoint


def model_args(config: GPTConfig) -> dict:
    """A checkpoint's model_args: what the model computes (GPTConfig's fields), not how (KERNEL_KEYS: the kernel
    choices belong to whoever runs it, on whatever machine)."""
    return {key: value for key, value in dataclasses.asdict(config).items() if key not in KERNEL_KEYS}


def model_from_checkpoint(checkpoint: dict, **overrides) -> GPT:
    """
    The GPT of a checkpoint, weights loaded; overrides change GPTConfig fields that keep the shapes (dropout) and
    choose its kernels (KERNEL_KEYS: GPTConfig's defaults unless given, whatever the checkpoint's writer ran).
    """
    saved = {key: value for key, value in checkpoint["model_args"].items() if key not in KERNEL_KEYS}
    try:
        model = GPT(GPTConfig(**{**saved, **overrides}))
        # train.py saves the bare model; a torch.compile'd module's state dict has its keys prefixed
        model.load_state_dict({key.removeprefix("_orig_mod."): value for key, value in checkpoint["model"].items()})
    except (TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise TrainError(f"the checkpoint's weights do not fit its model_args: {first_line(err)}") from None
    return model


PRETRAINED = "'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' (from the Hugging Face Hub or HF_HOME's cache)"


def pretrained_model(name_or_dir: str, **overrides) -> GPT:
    """
    GPT.from_pretrained, its failures (no transformers, an unknown name, offline) as one TrainError. Hub weights come
    from the Hugging Face cache when they are there, without the network (HF_HUB_OFFLINE set or not); else they are
    downloaded, and a Hub that cannot be reached fails at once, saying what to do offline, instead of after
    huggingface_hub's half a minute of retries.
    """
    try:
        if not os.path.isdir(name_or_dir):
            with contextlib.suppress(OSError):  # not in the cache
                return GPT.from_pretrained(name_or_dir, local_files_only=True, **overrides)
            check_hub_reachable(name_or_dir)
        return GPT.from_pretrained(name_or_dir, **overrides)
    except (OSError, ImportError, ValueError) as err:
        raise TrainError(
            f"cannot load GPT-2 weights {name_or_dir!r} ({first_line(err)}): give one of {PRETRAINED}, "
            f"or a Hugging Face GPT-2 folder"
        ) from None


def check_hub_reachable(name: str):
    """A TrainError if the Hugging Face Hub cannot be asked about the model name: offline, or HF_HUB_OFFLINE set."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        huggingface_hub.model_info(name, timeout=10)  # one request, no retries
    except (HfHubHTTPError, HFValidationError):
        return  # the Hub answered (e.g. 404), or no Hub name (a folder that is not there): from_pretrained says what
    except Exception as err:  # no network, no DNS, a proxy that refuses, HF_HUB_OFFLINE=1
        fill = f"from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('{name}')"
        raise TrainError(
            f"GPT-2 weights {name!r} are not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) and "
            f"the Hub cannot be reached ({first_line(err)}). Where it can be, fill the cache once with the same "
            f'HF_HOME (python -c "{fill}"), then set HF_HUB_OFFLINE=1 offline; or pass a local Hugging Face GPT-2 dir'
            f" (the Hub's GPT-2 names: {PRETRAINED})"
        ) from None


def rng_state() -> dict:
    """This process's RNG states as plain lists and tensors (torch.load(weights_only=True) accepts them)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict):
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
