"""Shared fixtures. Data from ../shared (next to the repo) is read in place, never copied into the repo."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.fail(
            f"{what} not found at {path}. The tests expect the project's shared/ folder beside the repo "
            f"(../shared relative to {REPO}) with owt-sample/ and tiktoken-cache/ in it."
        )
    return path


@pytest.fixture(scope="session")
def owt_jsonl() -> Path:
    return _require(SHARED / "owt-sample" / "openwebtext-500.jsonl", "The 500-document OpenWebText sample")


@pytest.fixture(scope="session", autouse=False)
def tiktoken_cache() -> Path:
    """Point tiktoken at the pre-seeded GPT-2 BPE files: no network is needed (or reachable)."""
    cache = _require(SHARED / "tiktoken-cache", "The tiktoken cache with the GPT-2 BPE files")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    return cache


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: on 2 cores, a second thread's synchronisation costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_byte_data(out_dir: Path, documents: list[str]) -> Path:
    """train.bin/val.bin/meta.json as prepare_openwebtext.py --tokenizer byte writes them (UTF-8 bytes, eot 256)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n_val = max(1, len(documents) // 25)
    splits = {"train": documents[:-n_val], "val": documents[-n_val:]}
    meta = {"tokenizer": "byte", "vocab_size": 257, "eot_token": 256, "dtype": "uint16", "splits": {}}
    for split, docs in splits.items():
        tokens = np.array([t for doc in docs for t in [*doc.encode("utf-8"), 256]], dtype=np.uint16)
        tokens.tofile(out_dir / f"{split}.bin")
        meta["splits"][split] = {"documents": len(docs), "tokens": len(tokens)}
    (out_dir / "meta.json").write_text(json.dumps(meta))
    return out_dir


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory, owt_jsonl) -> Path:
    documents = [json.loads(line)["text"] for line in owt_jsonl.read_text().splitlines()]
    return write_byte_data(tmp_path_factory.mktemp("byte-owt"), documents)
