"""EXPERIMENT (H100; numbers in bench/GPU_NOTES.md): the word-layout GEMV prototype per decode role of qwen2.5-1.5b.
Its run compared against the byte-layout kernel of that time, which the runtime's word-layout kernel replaced
(those numbers are in bench/RESULTS.md); that comparison is not repeated here."""
import itertools, torch, triton
from bench.experiments.w4_words_gemv import gemv32
from bench.gpu_micro import graph_us, copies_for

dev = torch.device("cuda")
G = 128


def pack_words(q, group):
    N, K = q.shape
    WG = group // 8
    t = q.view(N, K // group, 8, WG).permute(0, 1, 3, 2).to(torch.int64)  # [N, ng, WG, 8 nibbles]
    w = (t << (4 * torch.arange(8, device=q.device))).sum(-1)
    return w.to(torch.int64).where(w < 2**31, w - 2**32).to(torch.int32).reshape(N, K // 8)


def run(x, nw, words, s, z, out, N, K, pro, epi, bn, v, warps, split, bias=None, pdl=False):
    grid = (N // bn, split, 1)
    gemv32[grid](x, x.stride(0), nw if nw is not None else s, 1e-6, words, s, z, words.stride(0), s.stride(0),
                 bias if bias is not None else s, out, out.stride(0), N, K, split, G=G, PRO=pro, EPI=epi,
                 ATOMIC=split > 1 or epi == 1, HAS_BIAS=bias is not None, ACT_BF16=False, BLOCK_N=bn, V=v,
                 C=32 * warps, num_warps=warps, PDL=pdl, launch_pdl=pdl)


ROLES = {"qkv": (2048, 1536, 1, 0, True), "o": (1536, 1536, 0, 1, False), "w13": (17920, 1536, 1, 2, False),
         "w2": (1536, 8960, 0, 1, False)}
rows = []
for role, (N, K, pro, epi, has_bias) in ROLES.items():
    nbytes = N * K // 2 + N * (K // G) * 3
    n = copies_for(nbytes)
    qs = [torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev) for _ in range(n)]
    words = [pack_words(q, G) for q in qs]
    ss = [(torch.rand(N, K // G, device=dev) * 0.02 + 0.001).half() for _ in range(n)]
    zs = [torch.randint(0, 16, (N, K // G), dtype=torch.uint8, device=dev) for _ in range(n)]
    bias = torch.randn(N, device=dev).half() if has_bias else None
    nw = torch.rand(K, device=dev).half() + 0.5
    x = torch.randn(1, K, device=dev, dtype=torch.float32 if pro else torch.float16)
    W = (qs[0].float() - zs[0].float().repeat_interleave(G, 1)) * ss[0].float().repeat_interleave(G, 1)
    if pro:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.float()
    else:
        h = x.float()
    y = h @ W.t() + (bias.float() if has_bias else 0)
    if epi == 2:
        g, u = y[:, 0::2].half().float(), y[:, 1::2].half().float()
        want = (torch.nn.functional.silu(g).half().float() * u)
    else:
        want = y
    Nout = N // 2 if epi == 2 else N
    out = torch.zeros(1, Nout, device=dev, dtype=torch.float32 if epi == 1 else torch.float16)
    best = None
    for bn, v, warps, split, pdl in itertools.product((8, 16), (2, 4), (1, 2), (1, 2, 4, 8), (False, True)):
        if split > 1 and epi != 1:
            continue
        if (K // G) < split * (32 * warps * v // 16) // 2:
            continue
        try:
            out.zero_()
            run(x, nw, words[0], ss[0], zs[0], out, N, K, pro, epi, bn, v, warps, split, bias, pdl)
            err = ((out.float() - want).norm() / want.norm()).item()
            us = graph_us(lambda i: run(x, nw, words[i], ss[i], zs[i], out, N, K, pro, epi, bn, v, warps, split, bias, pdl), n)
        except Exception as e:
            print(role, bn, v, warps, split, "ERR", str(e).splitlines()[0][:100]); continue
        rows.append((role, bn, v, warps, split, us, nbytes / us / 1e6, err, pdl))
        if best is None or us < best[5]:
            best = rows[-1]
    print(f"{role}: best {best[1:5]} {best[5]:.2f} us {best[6]:.2f} TB/s err {best[7]:.1e}", flush=True)
    del qs, words
    torch.cuda.empty_cache()
import triton.language as tl
@triton.jit
def _empty(x_ptr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if tl.program_id(0) == 0:
        tl.store(x_ptr, 1.0)
e = torch.zeros(4, device=dev)
for pdl in (False, True):
    for grid in (1, 132, 1024):
        us = graph_us(lambda i: _empty[(grid,)](e, PDL=pdl, launch_pdl=pdl), 64)
        print(f"empty kernel grid={grid} pdl={pdl}: {us:.2f} us per launch in a graph")
import json, os
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "gemv32.json"), "w"))
for role in ROLES:
    top = sorted([r for r in rows if r[0] == role], key=lambda r: r[5])[:4]
    top += sorted([r for r in rows if r[0] == role and not r[8]], key=lambda r: r[5])[:1]
    for r in top:
        print(f"  {role:4s} bn={r[1]:2d} v={r[2]} w={r[3]} sk={r[4]:2d} pdl={int(r[8])}: {r[5]:6.2f} us {r[6]:.2f} TB/s err {r[7]:.1e}")
