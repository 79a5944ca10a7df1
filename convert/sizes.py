"""Byte sizes as people write them (``8GiB``, ``500MB``, ``4G``, ``123456``), and the defaults the CLI shows in them.

KiB, MiB, GiB, TiB and the bare letters K, M, G, T are powers of 1024 (as ``free -h`` and ``docker --memory``
read them); kB, MB, GB, TB are powers of 1000; no unit (or B) is bytes. torch-free: the CLI imports it.
"""
from __future__ import annotations

import re

# AWQ checkpoint shards: transformers' own writers use 2-5 GB, and loaders expect a shard to fit in memory.
DEFAULT_SHARD_BYTES = 4 << 30

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes in ``text``; ValueError (a message for people) when it is not a positive size."""
    m = _SIZE.fullmatch(text)
    scale = _UNITS.get(m.group(2).lower()) if m else None
    if scale is None:
        raise ValueError(f"{text!r} is not a size; write e.g. 8GiB, 500MB or 123456 (bytes)")
    n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return n


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit it reaches: 4GiB, 1.5MiB, 300B."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{round(n / scale, 2):g}{unit}"
    return f"{n}B"
