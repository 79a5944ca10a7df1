"""EXPERIMENT (H100; numbers in bench/GPU_NOTES.md): the mma int4 GEMV (runtime/kernels/gemv_int4.py) per decode role of qwen2.5-1.5b: check + sweep."""
import itertools, torch, json, os
import torch.nn.functional as F
from qconv.convert.layout import QuantLinear
from bench.experiments.w4_mma_gemv import w4_matmul, w4_dequantize, GemvConfig, pack_mma, interleave_gate_up
from bench.gpu_micro import graph_us, copies_for
dev = torch.device("cuda")
G = 128
ROLES = {"qkv": (2048, 1536, "store", True), "qkv-acc": (2048, 1536, "residual", True), "o": (1536, 1536, "residual", False),
         "w13": (17920, 1536, "silu", False), "w2": (1536, 8960, "residual", False)}
res = {}
for role, (N, K, epi, has_bias) in ROLES.items():
    nbytes = N * K // 2 + N * (K // G) * 3
    n = copies_for(nbytes)
    qs = [torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev) for _ in range(n)]
    ss = [(torch.rand(N, K // G, device=dev) * 0.02 + 0.001).half() for _ in range(n)]
    zs = [torch.randint(0, 16, (N, K // G), dtype=torch.uint8, device=dev) for _ in range(n)]
    W = (qs[0].float() - zs[0].float().repeat_interleave(G, 1)) * ss[0].float().repeat_interleave(G, 1)
    if epi == "silu":
        ql = [interleave_gate_up(QuantLinear(q, s, z)) for q, s, z in zip(qs, ss, zs)]
        qs, ss, zs = [a.codes for a in ql], [a.scale for a in ql], [a.zero for a in ql]
    words = [pack_mma(q) for q in qs]
    del qs
    bias = torch.randn(N, device=dev).half() if has_bias else None
    for M in (1, 8):
        x = torch.randn(M, K, device=dev).half()
        y = x.float() @ W.t() + (bias.float() if has_bias else 0)
        if epi == "silu":
            I = N // 2
            want = F.silu(y[:, :I].half().float()).half().float() * y[:, I:].half().float()
            out = torch.empty(M, I, device=dev, dtype=torch.float16)
        else:
            want = y
            out = torch.zeros(M, N, device=dev, dtype=torch.float32 if epi == "residual" else torch.float16)
        best = None
        for tiles, split, pdl in itertools.product((1, 2), (1, 2, 3, 4, 6, 12, 35), (False, True)):
            if (split > 1 and epi != "residual") or (N // 16) % tiles or (K // G) < split or (split == 35 and K < 4000):
                continue
            cfg = GemvConfig(tiles, split)
            if epi == "residual":
                out.zero_()
            w4_matmul(x, words[0], ss[0], zs[0], G, out, bias=bias, epilogue=epi, config=cfg, pdl=pdl)
            err = ((out.float() - want).norm() / want.norm()).item()
            if M == 8 and tiles == 1 and split == 1 and not pdl:
                o = out.float()
                per_n = [round(((o[i] - want[i]).norm() / want[i].norm()).item(), 3) for i in range(M)]
                match = [int(((o[i][None] - want).norm(dim=1)).argmin()) for i in range(M)]
                print(f"  DIAG {role} per-n err {per_n} best-matching want row {match}")
            us = graph_us(lambda i: w4_matmul(x, words[i], ss[i], zs[i], G, out, bias=bias, epilogue=epi, config=cfg,
                                              pdl=pdl), n)
            r = (us, tiles, split, pdl, err)
            if best is None or us < best[0]:
                best = r
            print(f"  {role} M={M} tiles={tiles} split={split} pdl={pdl}: {us:.2f} us {nbytes / us / 1e6:.2f} TB/s err {err:.1e}")
        res[f"{role}/M{M}"] = best
    # prefill dequantize: check and time
    Wd = torch.empty(N, K, device=dev, dtype=torch.float16)
    w4_dequantize(words[0], ss[0], zs[0], G, Wd)
    if epi == "silu":
        Wr = interleave_gate_up(W)
    else:
        Wr = W
    res[f"{role}/dequant_ok"] = bool(torch.equal(Wd, Wr.half()))
    res[f"{role}/dequant_us"] = graph_us(lambda i: w4_dequantize(words[i], ss[i], zs[i], G, Wd), n)
    del words
    torch.cuda.empty_cache()
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "mma.json"), "w"))
for k, v in res.items():
    print(k, v)
