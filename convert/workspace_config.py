"""``config.ini``: one typed schema, written by ``qconv convert`` and read by the runtime.

It is the only source of truth about a workspace (in the spirit of TurboMind's ``[llama]`` section):
every value is a real bool / int / float / str, and a missing or unknown key is a one-line error, except the keys
of OPTIONAL_KEYS, added later, whose defaults derive from the others: ``kv_mode`` (fp16 | int8-static | int8 | int4)
defaults from ``quant_policy`` (4 -> int8-static, else fp16); ``kv_rotation`` (none), ``kv_sink`` (0) and
``kv_k_center`` (false), the online cache's transform, default to none. Our quant_policy 4 is calibrated static
int8, not LMDeploy's online int4 (LMDeploy: 4 = int4, 8 = int8, both online per token); convert/kv_mode.py has the
table.
"""
from __future__ import annotations

import configparser
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from .. import QconvError
from .arch import ARCHS
from .fileio import atomic_path
from .kv_mode import STATIC_POLICY, KVTransform, mode_of_policy, mode_problem, policy_of_mode, transform_problem
from .layout import WEIGHT_TYPES

CONFIG_FILE = "config.ini"  # in the workspace folder
SECTION = "llama"
ROPE_SCALINGS = ("none", "linear", "llama3")
QUANT_POLICIES = (0, STATIC_POLICY)  # 0: no calibrated KV params, 4: static per-head int8 (convert/kv_mode.py)
# keys added after workspaces existed: absent, their default derives from the others (or is the field's own)
OPTIONAL_KEYS = ("kv_mode", "kv_rotation", "kv_sink", "kv_k_center")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(slots=True)
class WorkspaceConfig:
    model_name: str
    model_arch: str                 # a model_type of convert/arch.py
    head_num: int
    kv_head_num: int
    size_per_head: int
    hidden_units: int
    inter_size: int
    num_layer: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: str               # none | linear | llama3
    rope_scaling_factor: float      # linear, llama3: positions / factor (1.0 for none)
    rope_low_freq_factor: float     # llama3 only
    rope_high_freq_factor: float    # llama3 only
    rope_original_max_position_embeddings: int  # llama3 only
    max_position_embeddings: int
    attn_bias: bool
    tie_word_embeddings: bool
    weight_type: str                # fp32 | fp16 | bf16 | int8 | int4
    group_size: int                 # int4 / int8: input channels per scale; 0: per output channel (int8) or float
    quant_policy: int               # 0 | 4 (4: calibrated static int8; not LMDeploy's meaning, see kv_mode.py)
    kv_sym: bool                    # with quant_policy=4: the params are symmetric (zp = 0)
    session_len: int                # most tokens one sequence holds (prompt + answer)
    max_batch_size: int             # most sequences one engine holds
    start_id: int                   # BOS, -1 when the tokenizer has none
    end_id: tuple[int, ...]         # every stop id
    cache_max_entry_count: float    # most of the free memory the KV cache may take (0, 1]
    tensor_para_size: int           # 1: the bundled runtime does not shard
    kv_mode: str = ""               # fp16 | int8-static | int8 | int4; "" (or no key): from quant_policy
    kv_rotation: str = "none"       # online modes: none | hadamard (convert/kv_mode.py KVTransform)
    kv_sink: int = 0                # online modes: first positions held in the compute dtype
    kv_k_center: bool = False       # online modes: K minus the centers in kv_center.safetensors

    def __post_init__(self):
        if not self.kv_mode:  # a config.ini written before kv_mode existed reads as its quant_policy says
            self.kv_mode = mode_of_policy(self.quant_policy)
        self._check()

    def _check(self):
        def check(ok: bool, what: str):
            if not ok:
                raise QconvError(f"config.ini: {what}")

        check(self.model_arch in ARCHS, f"model_arch {self.model_arch!r} is not one of {', '.join(sorted(ARCHS))}")
        for name in ("head_num", "kv_head_num", "size_per_head", "hidden_units", "inter_size", "num_layer",
                     "vocab_size", "max_position_embeddings", "max_batch_size"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        check(self.head_num % self.kv_head_num == 0,
              f"head_num {self.head_num} is not a multiple of kv_head_num {self.kv_head_num}")
        check(self.weight_type in WEIGHT_TYPES, f"weight_type must be one of {', '.join(WEIGHT_TYPES)}, "
                                                f"got {self.weight_type!r}")
        check(self.group_size > 0 if self.weight_type == "int4" else self.group_size >= 0,
              f"group_size {self.group_size} is not valid for weight_type {self.weight_type}")
        if self.group_size > 0:
            ins = {"hidden_units": self.hidden_units, "inter_size": self.inter_size,
                   "head_num * size_per_head": self.head_num * self.size_per_head}
            for name, n in ins.items():
                check(n % self.group_size == 0, f"group_size {self.group_size} does not divide {name} ({n}); "
                                                f"pick a divisor, e.g. --group-size 64")
        check(self.quant_policy in QUANT_POLICIES, f"quant_policy must be 0 (fp KV) or 4 (int8 KV), "
                                                   f"got {self.quant_policy}")
        problem = mode_problem(self.kv_mode, self.size_per_head)
        check(problem is None, problem)
        problem = transform_problem(self.kv_mode, self.kv_transform)
        check(problem is None, problem)
        check(self.kv_sink < self.session_len, f"kv_sink {self.kv_sink} must be below session_len {self.session_len}")
        check(self.quant_policy == policy_of_mode(self.kv_mode),
              f"kv_mode {self.kv_mode} goes with quant_policy {policy_of_mode(self.kv_mode)}, got {self.quant_policy} "
              f"(quant_policy 4 means calibrated static int8 here)")
        check(self.rope_scaling in ROPE_SCALINGS, f"rope_scaling must be one of {', '.join(ROPE_SCALINGS)}, "
                                                  f"got {self.rope_scaling!r}")
        check(self.rope_scaling_factor > 0, f"rope_scaling_factor must be positive, got {self.rope_scaling_factor}")
        check(self.session_len >= 2, f"session_len must be at least 2, got {self.session_len}")
        check(len(self.end_id) > 0, "end_id needs at least one stop id")
        check(0 < self.cache_max_entry_count <= 1,
              f"cache_max_entry_count must lie in (0, 1], got {self.cache_max_entry_count}")
        check(self.tensor_para_size == 1, f"tensor_para_size {self.tensor_para_size}: the bundled runtime runs "
                                          f"on one device; use 1")

    @property
    def kv_transform(self) -> KVTransform:
        return KVTransform(self.kv_rotation, self.kv_sink, self.kv_k_center)

    # ------------------------------------------------------------------------------------------
    def replace(self, **changes) -> WorkspaceConfig:
        return dataclasses.replace(self, **changes)

    def write(self, path) -> None:
        parser = configparser.ConfigParser(interpolation=None)
        parser[SECTION] = {f.name: _format(getattr(self, f.name)) for f in dataclasses.fields(self)}
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            parser.write(f)

    @classmethod
    def read(cls, path) -> WorkspaceConfig:
        path = Path(path)
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(path.read_text(), source=str(path))
        except (configparser.Error, UnicodeDecodeError) as e:
            raise QconvError(f"{path} is not a valid config.ini ({str(e).splitlines()[0]})") from None
        if not parser.has_section(SECTION):
            raise QconvError(f"{path} has no [{SECTION}] section; recreate the workspace with qconv convert")
        raw = dict(parser[SECTION])
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        for name in names:
            if name not in raw and name not in OPTIONAL_KEYS:
                raise QconvError(f"{path} is missing the key '{name}' in [{SECTION}]; "
                                 f"recreate the workspace with qconv convert")
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise QconvError(f"{path} has unknown key '{unknown[0]}' in [{SECTION}]")
        return cls(**{n: _parse(raw[n], hints[n], n, path) for n in names if n in raw})


def _format(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _parse(text: str, typ, name: str, path):
    text = text.strip()
    try:
        if typ is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if typ in (int, float, str):
            return typ(text)
        if typing.get_origin(typ) is tuple:  # tuple[int, ...]: comma separated
            return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        pass
    else:
        raise AssertionError(f"no parser for {typ}")
    kind = getattr(typ, "__name__", "list of ints")
    raise QconvError(f"{path}: {name} = {text!r} is not a valid {kind}")
