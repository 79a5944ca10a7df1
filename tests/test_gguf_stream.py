"""A GGUF becomes an HF folder one tensor at a time: the tensors equal transformers' own GGUF loading, and the
weights phase never holds the float32 model."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from qconv.convert.shards import ShardSet

# Config and tokenizer first (transformers parses the GGUF's metadata for each), then the weights alone, with
# the peak reset in between: the weights phase's peak above the RSS it started from.
CONVERT = """
import json, sys, tempfile
from pathlib import Path
from transformers import AutoConfig
from qconv.convert.gguf_stream import write_hf_weights
from qconv.convert.memory import peak_host_rss
g, out = Path(sys.argv[1]), Path(sys.argv[2])
config = AutoConfig.from_pretrained(str(g.parent), gguf_file=g.name)
rss = lambda: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
base = rss()
open("/proc/self/clear_refs", "w").write("5")
write_hf_weights(g, out, config, shard_bytes=int(sys.argv[3]))
print(json.dumps({"above": peak_host_rss() - base}))
"""


def test_gguf_streams_into_shards_equal_to_transformers(smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    r = subprocess.run([sys.executable, "-c", CONVERT, str(smollm2_gguf), str(tmp_path), str(128 << 20)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    above = json.loads(r.stdout.strip().splitlines()[-1])["above"]
    shards = ShardSet(tmp_path)
    assert len({shards.file_of(n) for n in shards.keys()}) > 1  # 128 MB shards of a 538 MB model
    ours = {n: shards.read(n) for n in shards.keys()}
    model_bytes = sum(t.numel() * t.element_size() for t in ours.values())
    assert above < model_bytes / 2, (above, model_bytes)

    ref = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                               dtype=torch.float32).state_dict()
    ref.pop("lm_head.weight")  # tied to the embedding: save_pretrained leaves it out too
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref), [k for k in ref if not torch.equal(ours[k], ref[k])][:5]
