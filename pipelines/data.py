"""Calibration and evaluation text: the bundled C4, local files, or ``hf:NAME[:CONFIG]:SPLIT``."""
from __future__ import annotations

import contextlib
import gzip
import json
import random
from pathlib import Path

import torch

from .. import QconvError

BUNDLED = {"c4": Path(__file__).resolve().parent.parent / "calib_data" / "c4.jsonl.gz"}


def _read_jsonl(lines, src) -> list[str]:
    texts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise QconvError(f"{src}:{i} is not valid JSON; each line of a .jsonl must be an object with a 'text' field") from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise QconvError(f"{src}:{i} has no 'text' field; each record needs one")
        texts.append(str(obj["text"]))
    return texts


def _read_file(path: Path) -> list[str]:
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise QconvError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
        return [str(t) for t in table.column("text").to_pylist() if t]
    opener = gzip.open if name.endswith(".gz") else open
    stem = name[:-3] if name.endswith(".gz") else name
    with _utf8(path), opener(path, "rt", encoding="utf-8") as f:
        if stem.endswith(".jsonl"):
            return _read_jsonl(f, path)
        if stem.endswith(".json"):
            head = f.read()
            try:
                data = json.loads(head)
            except json.JSONDecodeError:
                return _read_jsonl(head.splitlines(), path)
            records = data if isinstance(data, list) else [data]
            if not all(isinstance(r, dict) and "text" in r for r in records):
                raise QconvError(f"{path}: expected a list of objects with a 'text' field")
            return [str(r["text"]) for r in records]
        if stem.endswith(".txt") or "." not in stem:
            return [line.rstrip("\n") for line in f if line.strip()]
    raise QconvError(f"unsupported dataset file {path}; use .txt (one document per line), .jsonl/.json with a 'text' field, or .parquet")


@contextlib.contextmanager
def _utf8(path):
    """Reading a text file that is not UTF-8 is a user error, not a traceback."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise QconvError(f"{path} is not UTF-8 text (it holds byte 0x{e.object[e.start]:02x}); "
                         f"convert it first, e.g. iconv -f latin1 -t utf-8 {path} > fixed.txt") from None


def _read_hf(spec: str) -> list[str]:
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise QconvError(f"bad dataset spec {spec!r}; use hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types when offline; all mean "could not fetch"
        raise QconvError(f"could not load {spec} through datasets ({type(e).__name__}); offline, pass a local "
                         f".txt/.jsonl/.parquet file or use the bundled 'c4'") from None
    if "text" not in ds.column_names:
        raise QconvError(f"{spec} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return [t for t in ds["text"] if t]


def load_texts(spec: str) -> list[str]:
    """Documents for ``--calib-dataset``: 'c4' (bundled), a local file, or hf:NAME[:CONFIG]:SPLIT."""
    if spec in BUNDLED:
        texts = _read_file(BUNDLED[spec])
    elif spec.startswith("hf:"):
        texts = _read_hf(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise QconvError(f"dataset {spec} not found; use 'c4' (bundled), a local file, or hf:NAME[:CONFIG]:SPLIT")
        texts = _read_file(path)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise QconvError(f"dataset {spec} holds no text; give a file with at least one non-empty document")
    return texts


def calib_windows(texts: list[str], tokenizer, samples: int, seqlen: int, seed: int = 0,
                  log=print) -> torch.Tensor:
    """Token windows [n, seqlen]: documents in a seeded order, joined with EOS, cut into consecutive windows.

    When the text cannot fill ``samples`` windows, as many as it can are used and the count is reported.
    """
    if samples <= 0 or seqlen <= 0:
        raise QconvError(f"--calib-samples and --calib-seqlen must be positive (got {samples} x {seqlen})")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    need = samples * seqlen
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:
            break
    n = min(samples, len(ids) // seqlen)
    if n == 0:
        raise QconvError(f"the dataset has only {len(ids)} tokens, less than one window of {seqlen}; "
                         f"lower --calib-seqlen or give more text")
    if n < samples:
        log(f"qconv: the dataset fills only {n} of {samples} windows; using {n * seqlen} tokens")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).reshape(n, seqlen)


def eval_text(path: str) -> str:
    """The perplexity text of BENCH_PROTOCOL: drop '<doc ...' and '</doc>' lines, join the rest with newlines."""
    p = Path(path)
    if not p.is_file():
        raise QconvError(f"dataset {path} not found; pass a text file such as wiki.utf8")
    with _utf8(p):
        lines = p.read_text(encoding="utf-8").split("\n")
    text = "\n".join(l for l in lines if not l.startswith("<doc ") and l != "</doc>")
    if not text.strip():
        raise QconvError(f"dataset {path} holds no text")
    return text
