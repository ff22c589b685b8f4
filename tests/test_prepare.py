"""prepare_openwebtext.py: exact token counts on real data, lossless round trips, bad inputs, safe writes."""

import json
import os
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_or_fail_if_hung

import prepare_openwebtext as prep
from prepare_openwebtext import get_tokenizer, main

OUTPUTS = ("train.bin", "val.bin", "meta.json")
REPO = Path(__file__).resolve().parent.parent


def run(tmp_path: Path, *args: str, out: str = "out") -> int:
    """main() in-process with a private datasets cache, so tests neither share nor leave caches."""
    return main([*args, "--out_dir", str(tmp_path / out), "--cache_dir", str(tmp_path / "hf-cache")])


def read_documents(out_dir: Path) -> dict[str, list[str]]:
    """Decode train.bin and val.bin back into their documents (cut at every end-of-text token)."""
    meta = json.loads((out_dir / "meta.json").read_text())
    tok = get_tokenizer(meta["tokenizer"])
    docs = {}
    for split in ("train", "val"):
        ids = np.memmap(out_dir / f"{split}.bin", dtype=meta["dtype"], mode="r")
        assert len(ids) == meta["splits"][split]["tokens"]
        assert ids[-1] == tok.eot_token, "every document, the last included, ends with end-of-text"
        ends = np.flatnonzero(ids == tok.eot_token)
        starts = np.concatenate([[0], ends[:-1] + 1])
        docs[split] = [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]
        assert len(docs[split]) == meta["splits"][split]["documents"] >= 1
    return docs


def all_documents(out_dir: Path) -> list[str]:
    docs = read_documents(out_dir)
    return docs["train"] + docs["val"]


def assert_round_trip(docs: dict[str, list[str]], originals: list[str]) -> None:
    """Every document comes back exactly once; train keeps the corpus order."""
    assert sorted(docs["train"] + docs["val"]) == sorted(originals)
    val = set(docs["val"])
    assert docs["train"] == [d for d in originals if d not in val]


def test_owt_sample_gpt2_exact_tokens_and_round_trip(tmp_path, owt_jsonl, tiktoken_cache):
    stats_path = tmp_path / "stats.json"
    assert run(tmp_path, "--files", str(owt_jsonl), "--num_proc", "2", "--stats_json", str(stats_path)) == 0
    out = tmp_path / "out"
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    tokens = np.concatenate([np.fromfile(out / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert len(tokens) == 538_111
    assert (tokens == 50256).sum() == 500
    assert sum(s["tokens"] for s in meta["splits"].values()) == 538_111
    assert meta["splits"]["val"]["documents"] == 1  # round(500 * 0.0005) = 0, raised to the minimum of one
    assert "--files" in meta["command"] and meta["source"]["num_files"] == 1

    originals = [json.loads(line)["text"] for line in owt_jsonl.read_text(encoding="utf-8").splitlines()]
    assert_round_trip(read_documents(out), originals)

    stats = json.loads(stats_path.read_text())
    assert stats["num_proc"] == 2 and stats["splits"]["train"]["mb_per_s"] > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS), "no temporary files left behind"


def test_stats_of_splits_tokenized_in_under_a_millisecond(tmp_path, monkeypatch):
    """Each split's seconds are rounded to 0.001 in the stats; on a tiny corpus they round to 0.0, and the overall
    MB/s must not divide by them (a CI run once failed on this). A clock that ticks 10 µs a reading makes every
    split that fast on any machine."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(prep, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks) * 1e-5))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"short document {i}"}) + "\n" for i in range(8)))
    stats_path = tmp_path / "stats.json"
    args = ("--files", str(corpus), "--tokenizer", "byte", "--num_proc", "1", "--stats_json", str(stats_path))
    assert run(tmp_path, *args) == 0
    stats = json.loads(stats_path.read_text())
    assert [split["seconds"] for split in stats["splits"].values()] == [0.0, 0.0]
    corpus_bytes = sum(split["bytes"] for split in stats["splits"].values())
    assert 0 < stats["tokenize_mb_per_s"] < corpus_bytes / 1e6 / 1e-5


def test_dataset_path_goes_through_load_dataset(tmp_path):
    """The Hub path (load_dataset(name, num_proc=...)) is unreachable offline; a local dataset folder takes it."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    texts = [f"document {i} \u00e9\u6f22" for i in range(20)]
    write_jsonl(folder / "train.jsonl", [json.dumps({"body": t}) for t in texts])
    assert (
        run(tmp_path, "--dataset", str(folder), "--text_field", "body", "--tokenizer", "byte", "--num_proc", "2") == 0
    )
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["source"]["dataset"] == str(folder)
    assert_round_trip(read_documents(tmp_path / "out"), texts)


def random_text(rng: np.random.Generator, n: int) -> str:
    """Code points from every plane, surrogates excluded (they cannot be encoded as UTF-8)."""
    points = rng.integers(1, 0x110000, size=n)
    points = np.where((points >= 0xD800) & (points < 0xE000), points - 0x800, points)
    return "".join(map(chr, points))


TRICKY = [
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 and flags 🇩🇪🇯🇵",
    "CJK 漢字かなカナ 한국어, 𠜎𠜱 (outside the BMP)",
    "combining e\u0301 vs \u00e9, a\u030a\u0323, Zalgo z\u0357\u0351\u0363",
    "windows\r\nline\rendings\n\ttabs, NUL \x00 and DEL \x7f, BOM \ufeff, RTL \u202eabc",
]


def test_byte_tokenizer_round_trips_arbitrary_utf8(tmp_path):
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    (corpus / "sub" / "deeper").mkdir(parents=True)
    one_per_file = {corpus / "a.txt": TRICKY[0], corpus / "b.py": TRICKY[1], corpus / "sub" / "c.md": TRICKY[3]}
    for i in range(5):
        one_per_file[corpus / "sub" / "deeper" / f"r{i}.txt"] = random_text(rng, 200)
    for path, text in one_per_file.items():
        path.write_bytes(text.encode("utf-8"))  # bytes: no newline translation on the way in
    (corpus / "sub" / "empty.txt").write_bytes(b"")
    jsonl_docs = [TRICKY[2], random_text(rng, 300), "", "plain ascii"]
    (corpus / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(jsonl_docs)))
    parquet_docs = [TRICKY[2] + " (parquet)", random_text(rng, 50)]
    pq.write_table(pa.table({"text": parquet_docs}), corpus / "e.parquet")

    assert run(tmp_path, "--files", f"{corpus}/**/*", "--tokenizer", "byte", "--val_fraction", "0.3") == 0
    out = tmp_path / "out"
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"], meta["dtype"]) == ("byte", 257, 256, "uint16")
    assert meta["empty_documents_skipped"] == 2  # empty.txt and the "" line
    # sorted file order: a.txt, b.py, d.jsonl (its lines in order), e.parquet, sub/c.md, sub/deeper/r*.txt
    originals = [TRICKY[0], TRICKY[1], *jsonl_docs, *parquet_docs, TRICKY[3]]
    originals += [one_per_file[corpus / "sub" / "deeper" / f"r{i}.txt"] for i in range(5)]
    originals = [d for d in originals if d]
    docs = read_documents(out)
    assert_round_trip(docs, originals)
    assert meta["splits"]["val"]["documents"] == round(len(originals) * 0.3)
    total = sum(len(d.encode("utf-8")) + 1 for d in originals)
    assert sum(s["tokens"] for s in meta["splits"].values()) == total


def test_byte_tokenizer_api():
    tok = get_tokenizer("byte")
    for text in [*TRICKY, random_text(np.random.default_rng(1), 1000)]:
        assert tok.encode(text) == list(text.encode("utf-8"))
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([104, 105, 256, 0xF0, 0x9F]) == "hi<|endoftext|>\ufffd"  # a cut-off emoji is not an error
    with pytest.raises(ValueError, match="257"):
        tok.decode([257])
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("bpe")


def test_import_needs_no_datasets():
    code = "import sys, prepare_openwebtext; assert 'datasets' not in sys.modules; prepare_openwebtext.get_tokenizer"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(prep.__file__).parent)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_fails(tmp_path, capsys, args: list[str], *expected: str) -> None:
    assert run(tmp_path, *args) != 0
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert not any((tmp_path / "out" / name).exists() for name in OUTPUTS), "nothing half-written"


def test_glob_matching_nothing(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", ['{"text": "a"}', '{"text": "b"}'])
    args = ["--files", str(good), f"{tmp_path}/nope/*.jsonl", "--tokenizer", "byte"]
    assert_fails(tmp_path, capsys, args, f"{tmp_path}/nope/*.jsonl")


def test_jsonl_line_not_json(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "a"}', "", '{"text": "b"', '{"text": "c"}'])
    assert_fails(tmp_path, capsys, ["--files", str(bad), "--tokenizer", "byte"], f"{bad}:3:", "not valid JSON")


def test_jsonl_line_without_text_field(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "a"}', '{"body": "b"}', '{"text": "c"}'])
    assert_fails(tmp_path, capsys, ["--files", str(bad), "--tokenizer", "byte"], f"{bad}:2:", "'text'")
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "a"}', '{"text": 7}'])
    assert_fails(tmp_path, capsys, ["--files", str(bad), "--tokenizer", "byte"], f"{bad}:2:", "'text'")
    only = write_jsonl(tmp_path / "body.jsonl", ['{"body": "a"}', '{"body": "b"}'])
    assert_fails(tmp_path, capsys, ["--files", str(only), "--tokenizer", "byte"], f"{only}:1:", "--text_field")
    assert run(tmp_path, "--files", str(only), "--tokenizer", "byte", "--text_field", "body") == 0


def test_unknown_tokenizer(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", ['{"text": "a"}', '{"text": "b"}'])
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--files", str(good), "--tokenizer", "bpe")
    assert exit_info.value.code == 2
    assert "invalid choice: 'bpe'" in capsys.readouterr().err


def test_empty_jsonl_names_the_reason(tmp_path, capsys):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n")):
        empty = tmp_path / name
        empty.write_text(text)
        assert_fails(tmp_path, capsys, ["--files", str(empty), "--tokenizer", "byte"], f"{empty}: no JSON lines")
        assert not (tmp_path / "out").exists(), "a failed run leaves no empty out_dir behind"


def test_tokenizer_that_cannot_load_touches_no_out_dir(tmp_path, capsys, monkeypatch):
    def offline(name):
        raise RuntimeError("could not load tiktoken's gpt2 encoding (offline)")

    monkeypatch.setattr(prep, "get_tokenizer", offline)
    good = write_jsonl(tmp_path / "good.jsonl", ['{"text": "a"}', '{"text": "b"}'])
    assert run(tmp_path, "--files", str(good)) == 1
    assert "error: could not load tiktoken's gpt2 encoding" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_prepare_step_never_hangs(tmp_path):
    """
    The demo's prepare step as a user runs it: a subprocess (so prepare's own SIGTERM handler is installed) on
    standard-library sources with a fresh datasets cache each time. Many workers on few files make the pool's
    terminate() race its workers' start: before the fix about 1 run in 3 of these hung forever.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    for attempt in range(12):
        command = [
            sys.executable, "prepare_openwebtext.py", "--files", f"{stdlib}/a*.py", "--tokenizer", "byte",
            "--val_fraction", "0.1", "--num_proc", "8", "--out_dir", str(tmp_path / f"out{attempt}"),
            "--cache_dir", str(tmp_path / f"cache{attempt}"),
        ]  # fmt: skip
        result = run_or_fail_if_hung(command, f"prepare on run {attempt + 1} of 12", timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        assert (tmp_path / f"out{attempt}" / "meta.json").exists()


def test_unwritable_out_dir(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", ['{"text": "a"}', '{"text": "b"}'])
    (tmp_path / "a_file").write_text("not a directory")
    args = ["--files", str(good), "--tokenizer", "byte"]
    assert run(tmp_path, *args, out="a_file/out") != 0
    assert "cannot write to out_dir" in capsys.readouterr().err


def test_file_not_utf8_is_an_error_or_counted(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.py").write_text("print('ok')\n")
    (corpus / "latin1.py").write_bytes("# caf\u00e9\n".encode("latin-1"))
    args = ["--files", f"{corpus}/*.py", "--tokenizer", "byte"]
    assert_fails(tmp_path, capsys, args, "latin1.py", "not valid UTF-8", "--encoding_errors replace")
    assert run(tmp_path, *args, "--encoding_errors", "replace") == 0
    assert "latin1.py" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["source"]["files_not_utf8"] == 1
    assert sorted(all_documents(tmp_path / "out")) == ["# caf\ufffd\n", "print('ok')\n"]


def test_too_few_documents_and_split_minimums(tmp_path, capsys):
    one = write_jsonl(tmp_path / "one.jsonl", ['{"text": "only"}', '{"text": ""}'])
    assert_fails(tmp_path, capsys, ["--files", str(one), "--tokenizer", "byte"], "at least 2 non-empty documents")
    three = write_jsonl(tmp_path / "three.jsonl", ['{"text": "a"}', '{"text": "b"}', '{"text": "c"}'])
    for fraction, n_val in (("0", 1), ("0.99", 2)):
        assert run(tmp_path, "--files", str(three), "--tokenizer", "byte", "--val_fraction", fraction, "--force") == 0
        splits = json.loads((tmp_path / "out" / "meta.json").read_text())["splits"]
        assert (splits["train"]["documents"], splits["val"]["documents"]) == (3 - n_val, n_val)


def snapshot(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


def test_existing_outputs_kept_unless_force(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ['{"text": "hello"}', '{"text": "world"}', '{"text": "again"}'])
    assert run(tmp_path, "--files", str(data), "--tokenizer", "byte") == 0
    before = snapshot(tmp_path / "out")
    assert run(tmp_path, "--files", str(data), "--tokenizer", "byte", "--seed", "1") != 0
    assert "--force" in capsys.readouterr().err
    assert snapshot(tmp_path / "out") == before
    data = write_jsonl(tmp_path / "d.jsonl", ['{"text": "new"}', '{"text": "texts"}'])
    assert run(tmp_path, "--files", str(data), "--tokenizer", "byte", "--force") == 0
    assert sorted(all_documents(tmp_path / "out")) == ["new", "texts"]


def test_interrupted_run_leaves_nothing_and_keeps_old_outputs(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"text": f"document {i}"}) for i in range(2000)])
    args = ["--files", str(data), "--tokenizer", "byte", "--num_proc", "1"]
    real_tokenize, calls = prep._tokenize_rows, []

    def interrupt_on_third_batch(rows):
        calls.append(len(rows))
        if len(calls) == 3:  # mid-way through train.bin.tmp, after two batches were written
            raise KeyboardInterrupt
        return real_tokenize(rows)

    monkeypatch.setattr(prep, "_tokenize_rows", interrupt_on_third_batch)
    assert run(tmp_path, *args) == 130
    assert not (tmp_path / "out").exists(), "no train.bin, meta.json, temporary file or empty out_dir is left"

    monkeypatch.setattr(prep, "_tokenize_rows", real_tokenize)
    assert run(tmp_path, *args) == 0
    before = snapshot(tmp_path / "out")
    calls.clear()
    monkeypatch.setattr(prep, "_tokenize_rows", interrupt_on_third_batch)
    assert run(tmp_path, *args, "--force", "--seed", "7") == 130
    assert snapshot(tmp_path / "out") == before, "the previous complete outputs survive an interrupted --force"

    # Interrupted while renaming into place: meta.json, the completion marker, is gone until the new one lands.
    monkeypatch.setattr(prep, "_tokenize_rows", real_tokenize)
    real_replace = os.replace

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        if Path(dst).name == "train.bin":
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    assert run(tmp_path, *args, "--force", "--seed", "7") == 130
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.bin", "val.bin"]
