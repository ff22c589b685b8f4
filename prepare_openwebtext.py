"""Turn a corpus into the flat token files that train.py reads: <out_dir>/train.bin, val.bin and meta.json.

Default source is OpenWebText from the Hugging Face Hub; `--files` takes local .jsonl / .parquet files, and any
other file (.txt, .py, ...) becomes one document. Examples:
    python prepare_openwebtext.py                                  # OpenWebText, gpt2 tokens, data/openwebtext
    python prepare_openwebtext.py --files 'corpus/*.jsonl' --out_dir data/mine
    python prepare_openwebtext.py --files '/usr/lib/python3*/**/*.py' --tokenizer byte --out_dir data/pysrc
"""

import argparse
import errno
import functools
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    import datasets

OUTPUTS = ("train.bin", "val.bin", "meta.json")
DOCS_PER_JOB = 512  # small enough to keep every core busy and memory low, big enough to amortise the IPC


class PrepareError(Exception):
    """Bad input or environment: reported as one line on stderr with a non-zero exit, no traceback."""


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM) ends the run: raised like Ctrl-C's KeyboardInterrupt, it unwinds through the
    cleanup (temporary files, an out_dir this run made, the worker pool); the command line then exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----------------------------------------------------------------------------- tokenizers


@dataclass(frozen=True)
class Tokenizer:
    name: str
    vocab_size: int
    eot_token: int
    encode: Callable[[str], list[int]]  # ordinary text only: never emits eot_token
    decode: Callable[[list[int]], str]  # renders eot_token as "<|endoftext|>", like tiktoken


def _byte_decode(ids) -> str:
    pieces, current = [], bytearray()
    for i in ids:
        i = int(i)
        if i == 256:
            pieces += [current.decode("utf-8", errors="replace"), "<|endoftext|>"]
            current = bytearray()
        elif 0 <= i < 256:
            current.append(i)
        else:
            raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary (0..256)")
    # errors="replace": a model can sample byte sequences that are not valid UTF-8
    return "".join(pieces) + current.decode("utf-8", errors="replace")


@functools.cache
def get_tokenizer(name: str) -> Tokenizer:
    """`gpt2` (tiktoken, end-of-text 50256) or `byte` (UTF-8 bytes, end-of-text 256)."""
    if name == "byte":
        return Tokenizer("byte", 257, 256, lambda text: list(text.encode("utf-8")), _byte_decode)
    if name == "gpt2":
        import tiktoken

        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken downloads the BPE files on first use: offline this is a network error
            raise RuntimeError(
                f"could not load tiktoken's gpt2 encoding ({type(e).__name__}: {e}). Without network access, point "
                "TIKTOKEN_CACHE_DIR at a directory holding the cached gpt2 BPE files."
            ) from e
        return Tokenizer("gpt2", enc.n_vocab, enc.eot_token, enc.encode_ordinary, enc.decode)
    raise ValueError(f"unknown tokenizer {name!r}: choose 'gpt2' or 'byte'")


# ----------------------------------------------------------------------------- loading


def _resolve_globs(patterns: list[str]) -> list[str]:
    files = set()
    for pattern in patterns:
        matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
        if not matched:
            raise PrepareError(f"--files pattern {pattern!r} matches no files")
        files.update(os.path.abspath(p) for p in matched)
    return sorted(files)


def _loader_kind(path: str) -> str:
    return {".jsonl": "json", ".parquet": "parquet"}.get(Path(path).suffix.lower(), "document")


def _read_documents(paths: list[str]):
    # Bytes in, strict UTF-8 out, so text is kept exactly (datasets' "text" loader would turn \r\n into \n).
    # A file that is not UTF-8 is decoded with replacement here and judged later in the main process:
    # an exception raised in a datasets worker process loses its message on the way back.
    for path in paths:
        raw = Path(path).read_bytes()
        try:
            yield {"text": raw.decode("utf-8"), "utf8_error": None}
        except UnicodeDecodeError as e:
            yield {"text": raw.decode("utf-8", errors="replace"), "utf8_error": f"{path} (byte {e.start})"}


def _load_documents(files: list[str], args) -> tuple["datasets.Dataset", int]:
    """One file, one document, through Dataset.from_generator: for 100k small files ~15x faster than datasets'
    "text" loader, which spends its time probing every file for compression and archives."""
    import datasets

    stats = "\n".join(f"{p}\t{st.st_size}\t{st.st_mtime_ns}" for p in files for st in [os.stat(p)])
    ds = datasets.Dataset.from_generator(
        _read_documents,
        gen_kwargs={"paths": files},
        features=datasets.Features({"text": datasets.Value("string"), "utf8_error": datasets.Value("string")}),
        num_proc=min(args.num_proc, len(files)) if len(files) > 1 and args.num_proc > 1 else None,
        cache_dir=args.cache_dir,
        # datasets cannot see a changed file through the generator's arguments; the fingerprint lets it
        fingerprint=hashlib.sha256(f"read_documents-v1\n{stats}".encode()).hexdigest()[:32],
    )
    bad = ds.data.column("utf8_error").drop_null().to_pylist()
    if bad and args.encoding_errors == "strict":
        raise PrepareError(
            f"{len(bad)} file(s) are not valid UTF-8, e.g. {', '.join(bad[:3])}. Use --encoding_errors replace "
            "to decode them with U+FFFD replacement characters (they are counted in meta.json)."
        )
    for name in bad[:10]:
        print(f"warning: not valid UTF-8, decoded with replacement characters: {name}", file=sys.stderr)
    return ds.select_columns(["text"]), len(bad)


def _find_bad_jsonl_line(files: list[str], field: str) -> str | None:
    """Only called once datasets has failed or found gaps: names the first offending file:line."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue  # datasets' json loader skips blank lines too
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}:{lineno}: not valid JSON ({e.msg})"
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    return f"{path}:{lineno}: no string field {field!r} (see --text_field)"
    return None


def _no_records(files: list[str]) -> str | None:
    """Names the .jsonl files that hold no record at all (empty or blank), when every one of them is so."""
    if all(not line.strip() for path in files for line in open(path, encoding="utf-8", errors="replace")):
        return f"{', '.join(files)}: no JSON lines (the file is empty): nothing to prepare"
    return None


def _only_text(ds, field: str, where: str):
    if field not in ds.column_names:
        raise PrepareError(f"{where}: no column {field!r} (has {ds.column_names}); see --text_field")
    ds = ds.select_columns([field])
    return ds if field == "text" else ds.rename_column(field, "text")


def _load_tables(kind: str, files: list[str], args) -> "datasets.Dataset":
    import datasets

    if kind == "json":
        try:
            ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=args.cache_dir)
        except Exception as e:
            reason = _find_bad_jsonl_line(files, args.text_field) or _no_records(files)
            raise PrepareError(reason or f"could not read {files}: {type(e).__name__}: {e}") from e
        # pyarrow fills a field missing from some lines with nulls, and mixed types make a non-string column
        text = ds.features.get(args.text_field)
        if getattr(text, "dtype", None) not in ("string", "large_string") or ds.data[args.text_field].null_count:
            raise PrepareError(_find_bad_jsonl_line(files, args.text_field) or f"bad field {args.text_field!r}")
    else:
        ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=args.cache_dir)
    return _only_text(ds, args.text_field, f"{files[0]} (and {len(files) - 1} more)" if len(files) > 1 else files[0])


def load_corpus(args) -> tuple["datasets.Dataset", dict]:
    """A Dataset with one column, "text", one row per document, in a reproducible order."""
    import datasets  # lazily: get_tokenizer must import on machines without datasets

    if not args.files:
        try:
            ds = datasets.load_dataset(
                args.dataset, split=args.split, revision=args.revision, num_proc=args.num_proc, cache_dir=args.cache_dir
            )
        except ConnectionError as e:
            raise PrepareError(
                f"{e}. Offline, run once where the Hub is reachable with the same HF_HOME and set HF_HUB_OFFLINE=1, "
                "or pass local files with --files"
            ) from e
        source = {"dataset": args.dataset, "split": args.split, "revision": args.revision}
        return _only_text(ds, args.text_field, args.dataset), source

    files = _resolve_globs(args.files)
    # Consecutive files of one kind are loaded together, so documents keep the files' sorted order.
    parts, bad_utf8 = [], 0
    for kind, run in itertools.groupby(files, key=_loader_kind):
        if kind == "document":
            ds, bad = _load_documents(list(run), args)
            bad_utf8 += bad
        else:
            ds = _load_tables(kind, list(run), args)
        parts.append(ds)
    if len({str(part.features) for part in parts}) > 1:  # e.g. parquet's large_string beside string
        parts = [part.cast(datasets.Features({"text": datasets.Value("large_string")})) for part in parts]
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return ds, {"files": args.files, "num_files": len(files), "files_not_utf8": bad_utf8}


# ----------------------------------------------------------------------------- tokenizing and writing


def split_documents(nbytes: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row ids of (train, val), whole non-empty documents, each side at least one, in corpus order."""
    nonempty = np.flatnonzero(nbytes > 0)
    if len(nonempty) < 2:
        raise PrepareError(f"need at least 2 non-empty documents (one per split), found {len(nonempty)}")
    n_val = min(max(1, round(len(nonempty) * val_fraction)), len(nonempty) - 1)
    val = np.sort(np.random.default_rng(seed).choice(nonempty, size=n_val, replace=False))
    return np.setdiff1d(nonempty, val, assume_unique=True), val


_WORKER = {}


def _init_worker(ds, tokenizer_name: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate() stops workers with SIGTERM
    _WORKER.update(ds=ds, tok=get_tokenizer(tokenizer_name))  # by name: a Tokenizer holds lambdas, unpicklable


def _tokenize_rows(rows: np.ndarray) -> np.ndarray:
    tok = _WORKER["tok"]
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    eot, pieces = np.array([tok.eot_token], dtype), []
    for text in _WORKER["ds"][rows.tolist()]["text"]:
        if tok.name == "byte":  # a numpy view of the bytes: 6x faster than a list of Python ints
            pieces += [np.frombuffer(text.encode("utf-8"), np.uint8), eot]
        else:
            pieces += [np.array(tok.encode(text), dtype), eot]
    return np.concatenate(pieces, dtype=dtype)


def _in_order(pool, jobs, window: int):
    """pool.imap with back-pressure: imap would read the whole corpus ahead into its queue."""
    pending = deque()
    for job in jobs:
        pending.append(pool.apply_async(_tokenize_rows, (job,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def write_split(pool, name: str, rows: np.ndarray, nbytes: np.ndarray, path: str, num_proc: int) -> dict:
    """Tokenize `rows` on all workers and stream the tokens to `path` in corpus order; returns the split's stats."""
    # at least a few jobs per worker even for a small split, so that every core gets some
    jobs = np.array_split(rows, max(-(-len(rows) // DOCS_PER_JOB), min(len(rows), 4 * num_proc)))
    results = _in_order(pool, jobs, 4 * num_proc) if pool else map(_tokenize_rows, jobs)
    total_bytes, tokens, docs, t0 = int(nbytes[rows].sum()), 0, 0, time.perf_counter()
    # Sequential writes rather than a pre-sized np.memmap: the token count is only known at the end.
    with open(path, "wb") as f, tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing {name}") as bar:
        for job, ids in zip(jobs, results, strict=True):
            raise_if_stopped()
            f.write(ids.tobytes())
            tokens, docs = tokens + len(ids), docs + len(job)
            bar.update(int(nbytes[job].sum()))
            bar.set_postfix(docs=docs, docs_per_s=f"{docs / (time.perf_counter() - t0):.0f}", refresh=False)
    seconds = time.perf_counter() - t0
    return {"documents": docs, "tokens": tokens, "bytes": total_bytes, "seconds": round(seconds, 3),
            "mb_per_s": round(total_bytes / 1e6 / seconds, 3), "docs_per_s": round(docs / seconds, 1)}  # fmt: skip


def _check_out_dir(out_dir: Path, force: bool) -> None:
    existing = [name for name in OUTPUTS if (out_dir / name).exists()]
    if existing and not force:
        raise PrepareError(f"{out_dir} already holds {', '.join(existing)}; pass --force to overwrite")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise PrepareError(f"cannot write to out_dir {out_dir}: {e.strerror or e}") from e


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "unknown")


def prepare(args, argv: list[str]) -> dict:
    """Prepare as args say; an out_dir that this call created is removed again if it fails before writing."""
    out_dir = Path(args.out_dir)
    try:
        tokenizer = get_tokenizer(args.tokenizer)  # fail now, before touching out_dir or loading 40 GB
    except (ValueError, RuntimeError) as e:
        raise PrepareError(str(e)) from e
    created = not out_dir.exists()
    try:
        _check_out_dir(out_dir, args.force)
        return _prepare(args, argv, out_dir, tokenizer)
    except BaseException:
        uninterruptible()  # this cleanup, too, must run to its end
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def _prepare(args, argv: list[str], out_dir: Path, tokenizer: Tokenizer) -> dict:
    t_start = time.perf_counter()
    ds, source = load_corpus(args)
    load_seconds = time.perf_counter() - t_start
    raise_if_stopped()

    import pyarrow.compute as pc

    nbytes = pc.fill_null(pc.binary_length(ds.data.column("text")), 0).to_numpy()  # nulls count as empty
    train_rows, val_rows = split_documents(nbytes, args.val_fraction, args.seed)
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    temps = {name: out_dir / f"{name}.tmp" for name in OUTPUTS}
    splits, pool = {}, None
    try:
        if args.num_proc > 1:
            pool = multiprocessing.Pool(args.num_proc, _init_worker, (ds, tokenizer.name))
            raise_if_stopped()
        _WORKER.update(ds=ds, tok=tokenizer)  # for the in-process path of --num_proc 1
        t_tokenize = time.perf_counter()
        for name, rows in (("train", train_rows), ("val", val_rows)):
            splits[name] = write_split(pool, name, rows, nbytes, temps[f"{name}.bin"], args.num_proc)
        # timed here, not summed from the splits' rounded seconds: those of a small corpus round to 0.0
        tokenize_seconds = time.perf_counter() - t_tokenize
        meta = dict(tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size, eot_token=tokenizer.eot_token,
                    dtype=dtype, splits={name: {k: s[k] for k in ("documents", "tokens", "bytes")}
                                         for name, s in splits.items()},
                    empty_documents_skipped=int(len(nbytes) - len(train_rows) - len(val_rows)),
                    val_fraction=args.val_fraction, seed=args.seed, source=source,
                    command=shlex.join(["python", "prepare_openwebtext.py", *argv]))  # fmt: skip
        temps["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
        # All is written: from here a stop signal no longer interrupts, so the outputs land as a whole. meta.json is
        # the completion marker: the old one goes first, the new one lands last.
        raise_if_stopped()
        uninterruptible()
        (out_dir / "meta.json").unlink(missing_ok=True)
        for name in OUTPUTS:
            os.replace(temps[name], out_dir / name)
    except OSError as e:  # a full disk, a quota, a folder made read-only meanwhile
        where = f" ({e.filename})" if e.filename else ""
        raise PrepareError(
            f"cannot write to out_dir {out_dir}: {e.strerror or e}{where}; temporary files removed, existing outputs "
            f"left as they were"
        ) from e
    finally:
        uninterruptible()  # a second signal must not cut the cleanup short, leaving a temporary file behind
        if pool:
            pool.terminate()
        _WORKER.clear()
        for path in temps.values():
            path.unlink(missing_ok=True)
    return {
        **meta,
        "splits": splits,
        "load_seconds": round(load_seconds, 3),
        "tokenize_mb_per_s": round(sum(s["bytes"] for s in splits.values()) / 1e6 / tokenize_seconds, 3),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "num_proc": args.num_proc,
        "machine": {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source")
    src.add_argument("--dataset", default="Skylion007/openwebtext", help="Hub dataset (default: %(default)s)")
    src.add_argument("--split", default="train", help="Hub dataset split to read (default: %(default)s)")
    src.add_argument("--revision", help="Hub revision, e.g. refs/convert/parquet for a script-only dataset")
    src.add_argument("--files", nargs="+", metavar="GLOB", help="local .jsonl/.parquet files, any other file is "
                     "one document; use instead of the Hub (quote globs; ** recurses)")  # fmt: skip
    src.add_argument("--text_field", default="text", help="JSONL/parquet/Hub column with the text (default: text)")
    src.add_argument("--encoding_errors", choices=["strict", "replace"], default="strict", help="one-document "
                     "files that are not UTF-8: fail (default) or decode with U+FFFD and count them")  # fmt: skip
    src.add_argument("--cache_dir", help="datasets cache (default: HF_DATASETS_CACHE / ~/.cache/huggingface)")
    out = p.add_argument_group("output")
    out.add_argument("--out_dir", default="data/openwebtext", help="where train.bin, val.bin, meta.json go")
    out.add_argument("--tokenizer", choices=["gpt2", "byte"], default="gpt2", help="default: %(default)s")
    out.add_argument("--val_fraction", type=float, default=0.0005, help="share of documents for val.bin")
    out.add_argument("--seed", type=int, default=2357, help="seed of the train/val document split")
    out.add_argument("--force", action="store_true", help="overwrite existing outputs in out_dir")
    out.add_argument("--stats_json", help="also write the run's statistics (timings, MB/s, machine) here")
    default_procs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out.add_argument("--num_proc", type=int, default=default_procs, help="worker processes (default: all cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.num_proc < 1:
        parser.error(f"--num_proc must be at least 1, got {args.num_proc}")
    try:
        stats = prepare(args, argv)
    except BaseException as e:
        return report_failure(e)
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats, indent=2) + "\n")
    print(f"wrote {args.out_dir}: {stats['empty_documents_skipped']} empty documents skipped")
    print(" | ".join(f"{name}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['mb_per_s']:.2f} MB/s"
                     for name, s in stats["splits"].items()))  # fmt: skip
    return 0


def report_failure(error: BaseException) -> int:
    """One line on stderr for a run that stopped or failed, and its exit status; anything else is a bug, raised."""
    stopped = _in_chain(error, KeyboardInterrupt)  # a library may turn our Stopped into an error of its own
    if stopped is not None:
        signum = getattr(stopped, "signum", signal.SIGINT)
        # A stop that lands as a bar's close() starts leaves that bar open (ours or datasets'), and Python would close
        # it when it frees it, at exit, printing its last state under this line: close them all first
        for bar in list(tqdm._instances):
            bar.close()
        # on a line of its own: the signal may have landed in a progress bar's close(), between its last state and
        # the newline after it
        print(f"\ninterrupted by {signal.Signals(signum).name}: temporary files removed, no new meta.json written",
              file=sys.stderr)  # fmt: skip
        return 128 + signum
    if isinstance(error, PrepareError):
        print(f"error: {error}", file=sys.stderr)
        return 1
    full = _in_chain(error, OSError)
    if full is not None and full.errno in (errno.ENOSPC, errno.EDQUOT):  # e.g. datasets' cache on a full disk
        where = f" ({full.filename})" if full.filename else ""
        print(f"error: {full.strerror}{where}: free space, or point --cache_dir at another disk", file=sys.stderr)
        return 1
    raise error


def _in_chain(error: BaseException, kind: type) -> BaseException | None:
    """The first exception of kind in error's chain (itself, then what it was raised from or while handling)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop(signum, frame):
    """
    The command line's handler of SIGINT and SIGTERM (Ctrl-C, a scheduler's time limit, scancel): the first one
    raises Stopped, which unwinds through the cleanup, and every later one is ignored. `timeout` and schedulers that
    signal a whole process group deliver a signal two or three times within milliseconds, and a second Stopped
    raised inside the cleanup would cut it short, leaving a temporary file (of any size) and the out_dir behind.
    """
    global _stop_signal
    uninterruptible()
    _stop_signal = signum
    raise Stopped(signum)


_stop_signal: int | None = None  # the stop signal received, if any: see raise_if_stopped


def raise_if_stopped() -> None:
    """
    Raise Stopped again for a stop signal whose first Stopped Python swallowed. A handler runs wherever the main thread
    is, and an exception raised inside an at-fork hook, a finalizer or a weakref callback is printed as "Exception
    ignored" and dropped: a signal that arrives while datasets or our pool forks (it stays pending across the fork, see
    stop_on_signals, and lands in the hooks) would let the run go on to the end with every later signal ignored.
    Called where the run can stop cleanly: after loading, after starting the pool, after each job, before the renames.
    """
    if _stop_signal is not None:
        raise Stopped(_stop_signal)


def uninterruptible() -> None:
    """
    From now on stop signals are ignored by this process: for cleanup, and for the outputs' renames, which must run
    to their end. Ignored, not merely caught: the interpreter restores the default action of signals with Python
    handlers when it shuts down, so a late signal would still kill a finished run. A no-op where main() runs inside
    another program, which keeps its own handlers.
    """
    if signal.getsignal(signal.SIGTERM) is stop:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def stop_on_signals() -> None:
    """
    Install stop() for SIGINT and SIGTERM, in this process only. Forked pool workers (ours, and datasets' in
    Dataset.from_generator) must die at once on the SIGTERM that Pool.terminate() sends, or the pool waits for them
    forever. A worker that inherits a Python-level handler can lose that signal: one that arrives while the child is
    still forking is dropped with the interpreter's pending signals after fork, and the worker then blocks on the
    task queue's lock, which terminate() holds (the demo's prepare step hung so about one run in 20). So SIGTERM is
    blocked across every fork, and the child restores the default action before unblocking it: a SIGTERM sent
    meanwhile stays pending in the kernel and then ends the child. Children ignore SIGINT: a Ctrl-C reaches the
    whole process group, and it is the main process's to handle (it ends the workers).
    """

    def block():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def unblock():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    def in_child():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        unblock()

    def quiet_after_a_stop(unraisable):
        # Once stopped, an exception that Python drops unraised (in an at-fork hook, a finalizer) is the stop's doing:
        # our Stopped itself (raise_if_stopped raises it again), or a library's generator or bar cut short by it.
        # Its traceback would bury the one line that says what happened.
        if _stop_signal is None:
            default_unraisablehook(unraisable)

    default_unraisablehook = sys.unraisablehook
    sys.unraisablehook = quiet_after_a_stop
    os.register_at_fork(before=block, after_in_parent=unblock, after_in_child=in_child)
    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)


if __name__ == "__main__":
    stop_on_signals()
    status = main()
    uninterruptible()  # the run is over: a late signal (the second of a pair) must not turn its status into a traceback
    sys.exit(status)
