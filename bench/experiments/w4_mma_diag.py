"""EXPERIMENT: the mma GEMV with several input rows against float32 (H100): one-hot rows come out right,
random rows wrong by a per-(row, half-tile) offset; the open bug of bench/experiments/w4_mma_gemv.py."""
import torch
from bench.experiments.w4_mma_gemv import w4_matmul, GemvConfig, pack_mma
dev = torch.device("cuda")
torch.manual_seed(0)
def run(N, K, G, M, sz, xkind, rows_nonzero=None):
    q = torch.randint(0, 16, (N, K), device=dev)
    s = (torch.rand(N, K // G, device=dev) + 0.5).half() if sz else torch.ones(N, K // G, device=dev).half()
    z = torch.randint(0, 16, (N, K // G), device=dev).to(torch.uint8) if sz else torch.zeros(N, K // G, dtype=torch.uint8, device=dev)
    x = torch.randn(M, K, device=dev).half() if xkind == "randn" else torch.randint(-3, 4, (M, K), device=dev).half()
    if rows_nonzero is not None:
        x[rows_nonzero:] = 0
    W = (q.float() - z.float().repeat_interleave(G, 1)) * s.float().repeat_interleave(G, 1)
    out = torch.zeros(M, N, device=dev)
    w4_matmul(x, pack_mma(q), s, z, G, out, epilogue="residual", config=GemvConfig(1, 1))
    want = x.float() @ W.t()
    per_n = [round(((out[i] - want[i]).norm() / (want[i].norm() + 1e-9)).item(), 4) for i in range(M)]
    print(N, K, G, M, "sz" if sz else "s1z0", xkind, rows_nonzero, per_n)
    if max(per_n) > 0.01:
        d = (out - want)
        print("   diff row0", d[0, :16].tolist())
        print("   diff row1", d[1, :16].tolist())
run(16, 128, 128, 2, False, "int")
run(16, 128, 128, 2, False, "randn")
run(16, 128, 128, 2, True, "int")
run(16, 128, 128, 8, True, "int")
run(16, 128, 128, 8, True, "int", rows_nonzero=1)
run(16, 64, 64, 8, False, "int")
run(16, 1536, 128, 8, True, "randn")
