"""Shared fixtures. Data from ../shared (next to the repo) is read in place, never copied into the repo."""

import os
from pathlib import Path

import pytest

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
