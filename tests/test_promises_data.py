"""prepare_openwebtext.py's data promises: --seed decides the validation documents, and a vocabulary above 65,536
tokens is stored as uint32 without losing ids."""

import json
from pathlib import Path

import numpy as np

import prepare_openwebtext as prep
from prepare_openwebtext import Tokenizer

DOCUMENTS = [f"document number {i}: " + "abc"[i % 3] * (i + 1) for i in range(40)]


def prepare(tmp_path: Path, out: str, *args: str) -> Path:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCUMENTS))
    out_dir = tmp_path / out
    assert prep.main(["--files", str(corpus), "--num_proc", "1", "--out_dir", str(out_dir), *args]) == 0
    return out_dir


def split_documents(out_dir: Path, eot: int) -> dict[str, list[bytes]]:
    meta = json.loads((out_dir / "meta.json").read_text())
    documents = {}
    for split in ("train", "val"):
        ids = np.fromfile(out_dir / f"{split}.bin", dtype=meta["dtype"])
        ends = np.flatnonzero(ids == eot)
        starts = np.concatenate([[0], ends[:-1] + 1])
        documents[split] = [ids[s:e].tobytes() for s, e in zip(starts, ends, strict=True)]
    return documents


def test_seed_decides_the_validation_split(tmp_path):
    args = ("--tokenizer", "byte", "--val_fraction", "0.25", "--cache_dir", str(tmp_path / "hf-cache"))
    splits = {
        name: split_documents(prepare(tmp_path, name, *args, "--seed", seed), eot=256)
        for name, seed in (("a", "1"), ("a_again", "1"), ("b", "2"))
    }
    assert splits["a"] == splits["a_again"]
    val = {name: set(split["val"]) for name, split in splits.items()}
    assert len(val["a"]) == len(val["b"]) == 10
    assert val["a"] != val["b"]
    for split in splits.values():  # every document once, on one side
        assert sorted(split["train"] + split["val"]) == sorted(
            np.array(list(d.encode()), np.uint16).tobytes() for d in DOCUMENTS
        )


def test_vocabulary_above_65536_is_stored_as_uint32(tmp_path, monkeypatch):
    """A tokenizer whose ids go past 65,535 (65,536 + code point): the files are uint32 and keep every id."""
    wide = Tokenizer(
        "wide",
        70_000,
        69_999,
        lambda text: [65_536 + ord(c) for c in text],
        lambda ids: "".join(chr(i - 65_536) for i in ids),
    )
    monkeypatch.setattr(prep, "get_tokenizer", lambda name: wide)
    out_dir = prepare(tmp_path, "out", "--val_fraction", "0.25", "--cache_dir", str(tmp_path / "hf-cache"))
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    documents = split_documents(out_dir, eot=69_999)
    decoded = [
        "".join(chr(i - 65_536) for i in np.frombuffer(d, dtype=np.uint32))
        for d in documents["train"] + documents["val"]
    ]
    assert sorted(decoded) == sorted(DOCUMENTS)
    assert sum(meta["splits"][s]["tokens"] for s in ("train", "val")) == sum(len(d) + 1 for d in DOCUMENTS)
