"""The GPU path (runtime/cuda/model.py) against the CPU runtime on one tiny int4 + int8-KV workspace.

Without CUDA the GPU model runs on CPU tensors with its kernels in Triton's interpreter (conftest); the
tests marked ``cuda`` add the engine, CUDA graphs and decode_batch on a real GPU.
"""
import re

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the GPU path is not tested")

from qconv import QconvError  # noqa: E402
from qconv.cli import main  # noqa: E402
from qconv.convert.fileio import save_tensors  # noqa: E402
from qconv.pipelines.kv_params import compute_kv_params  # noqa: E402
from qconv.runtime.cuda.graphs import DecodeBuffers, DecodeGraphs  # noqa: E402
from qconv.runtime.cuda.runner import CudaRunner  # noqa: E402
from qconv.runtime.options import RuntimeOptions  # noqa: E402
from qconv.runtime.engine import Engine  # noqa: E402
from qconv.runtime.generation import GenerationConfig  # noqa: E402
from qconv.runtime.cuda.linear import Int8Head  # noqa: E402
from qconv.convert.manifest import update_manifest  # noqa: E402
from qconv.runtime.cuda.model import GpuTransformer, use_gpu_path  # noqa: E402
from qconv.runtime.cuda.kernels import tuning  # noqa: E402
from qconv.runtime.cuda.kernels.tuning import GemvConfig  # noqa: E402
from qconv.runtime.kv_cache import KVCache  # noqa: E402
from qconv.runtime.loader import load_workspace, read_workspace_config  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ids(shape, seed):
    return torch.randint(0, 49152, shape, generator=torch.Generator().manual_seed(seed))


def convert(src, dst, *extra):
    assert main(["convert", "--model", str(src), "--dst-path", str(dst), "--weight-type", "int4", "--group-size", "32",
                 "--session-len", "64", "--max-batch-size", "4", *map(str, extra)]) == 0
    return dst


@pytest.fixture(scope="module")
def w4kv(tmp_path_factory, make_tiny):
    """qwen2 (q/k/v bias) with int4 g32 weights and int8 KV params taken from a float32 run's cache."""
    src = make_tiny("qwen2", seed=3)
    root = tmp_path_factory.mktemp("gpu")
    ws = load_workspace(convert(src, root / "w4"), RuntimeOptions(device="cpu", dtype="float32"))
    c = ws.cfg
    cache = KVCache(c.num_layer, 1, c.kv_head_num, 64, c.size_per_head, torch.float32, torch.device("cpu"))
    ws.model(ids((1, 40), 1), torch.arange(40)[None], cache)
    stats = [{f"layers.{i}.{s}": getattr(t[i][0, :, :40], f"a{s}")(dim=1) for i in range(c.num_layer)
              for s in ("min", "max")} for t in (cache.k, cache.v)]  # per (head, dim) ranges [H, D]
    save_tensors(compute_kv_params(*stats, c.num_layer, False, "head", 1), root / "kv.safetensors")
    return convert(src, root / "w4kv", "--kv-params", root / "kv.safetensors")


def table_entry(lin, bucket: int):
    """(the kernel config table of lin's GPU, lin's key in it at this rows bucket), for monkeypatch.setitem: every
    linear of that shape on that GPU then takes the entry."""
    return tuning.table_for(lin.gpu), (bucket, lin.out_features, lin.in_features, lin.group)


def test_gpu_model_matches_cpu_runtime(w4kv):
    # the GPU path's default head for int4 workspaces
    cpu = load_workspace(w4kv, RuntimeOptions(device="cpu", dtype="float32", head="int8"))
    gpu = load_workspace(w4kv, RuntimeOptions(device=str(DEV), dtype="float16", gpu_path=True))
    assert isinstance(gpu.model, GpuTransformer) and gpu.model.layers[0].w13.int4
    assert isinstance(gpu.model.head, Int8Head) and gpu.model.head.codes.dtype == torch.int8
    c = cpu.cfg

    def cache(ws, dt):
        return KVCache(c.num_layer, 4, c.kv_head_num, 64, c.size_per_head, dt, ws.device, ws.kv_qparams)
    cc, gc = cache(cpu, torch.float32), cache(gpu, torch.float16)
    assert gc.quantized
    # prefill of two fresh rows (causal SDPA over the new K/V, int8 round-tripped)
    x, pos = ids((2, 20), 2), torch.arange(20).expand(2, 20)
    assert rel(gpu.model(x.to(DEV), pos.to(DEV), gc).cpu(), cpu.model(x, pos, cc)) < 5e-3
    # three more tokens after the cached prefix (the cache is read back and masked)
    x, pos = ids((2, 3), 3), torch.arange(20, 23).expand(2, 3)
    got = gpu.model(x.to(DEV), pos.to(DEV), gc, last_only=True)
    assert rel(got.cpu(), cpu.model(x, pos, cc, last_only=True)) < 5e-3
    # decode steps on static buffers (bucket of 4): cache rows 1 and 0 in swapped order, two padding rows
    bufs = DecodeBuffers.allocate(gpu.cfg, torch.float16, DEV, [1, 2, 4], 64, burst=8)
    for step in range(2):
        tok, p = ids((2,), 10 + step), 23 + step
        want = cpu.model(tok[:, None], torch.tensor([[p], [p]]), cc, last_only=True)[:, -1]
        bufs.idx[:, :4] = torch.tensor([[tok[1], tok[0], 7, 0], [p, p, -1, -1], [1, 0, 3, 2]], device=DEV)
        gpu.model.decode_step(bufs, 4, gc, RuntimeOptions())
        got = bufs.logits[:2].flip(0).cpu()
        assert rel(got, want) < 5e-3 and torch.equal(got.argmax(-1), want.argmax(-1))
    # a one-row step (rotary, cache write and attention in one kernel) on cache row 1
    want = cpu.model(torch.tensor([[5]]), torch.tensor([[25]]), cc.rows(1, 2), last_only=True)[:, -1]
    bufs.idx[:, :1] = torch.tensor([[5], [25], [1]], device=DEV)
    gpu.model.decode_step(bufs, 1, gc, RuntimeOptions())
    assert rel(bufs.logits[:1].cpu(), want) < 5e-3 and (bufs.count == 0).all()
    assert (gc.k[0][2:].cpu() == 0).all() and (gc.k[0][:, :, 26:].cpu() == 0).all()  # padding wrote nothing
    assert (gc.k[0][0, :, 25].cpu() == 0).all() and (gc.k[0][1, :, 25].cpu() != 0).any()


def test_split_w13_hands_its_sums_to_w2(w4kv, monkeypatch):
    """A w13 that splits K adds its slices into fp32 sums that its norm kernel zeroed, and w2 takes the SiLU-mul
    of them: one-row and four-row decode steps still match the CPU runtime, step after step on the same sums."""
    cpu = load_workspace(w4kv, RuntimeOptions(device="cpu", dtype="float32", head="int8"))
    gpu = load_workspace(w4kv, RuntimeOptions(device=str(DEV), dtype="float16", gpu_path=True))
    c, w13 = cpu.cfg, gpu.model.layers[0].w13
    for bucket in (1, 8):
        monkeypatch.setitem(*table_entry(w13, bucket), GemvConfig(32, 2))
    assert w13.accumulates(1) and w13.accumulates(4)
    cc = KVCache(c.num_layer, 4, c.kv_head_num, 64, c.size_per_head, torch.float32, cpu.device, cpu.kv_qparams)
    gc = KVCache(c.num_layer, 4, c.kv_head_num, 64, c.size_per_head, torch.float16, gpu.device, gpu.kv_qparams)
    x, pos = ids((4, 12), 40), torch.arange(12).expand(4, 12)
    cpu.model(x, pos, cc)
    gpu.model(x.to(DEV), pos.to(DEV), gc)
    bufs = DecodeBuffers.allocate(gpu.cfg, torch.float16, DEV, [1, 4], 64, burst=8)
    nxt = torch.full((4,), 12)  # each row's next position
    for step, rows in enumerate((1, 4, 1)):
        tok, p = ids((rows,), 41 + step), nxt[:rows].clone()
        want = cpu.model(tok[:, None], p[:, None], cc.rows(0, rows), last_only=True)[:, -1]
        bufs.idx[:, :rows] = torch.stack([tok, p, torch.arange(rows)]).to(DEV)
        nxt[:rows] += 1
        gpu.model.decode_step(bufs, rows, gc, RuntimeOptions(), distinct=True)
        got = bufs.logits[:rows].cpu()
        assert rel(got, want) < 5e-3 and torch.equal(got.argmax(-1), want.argmax(-1))
    assert bufs.ffn_sums[0][:1].abs().sum() > 0  # the last step's sums, zeroed by the next step's norm kernel


def stepwise(engine: Engine, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after ``prompt`` through the engine's prefill and one decode step at a time."""
    engine.reset()
    toks = [int(engine.runner.prefill([prompt], [0], [0]).argmax())]
    for i in range(n - 1):
        toks.append(int(engine.runner.decode([toks[-1]], [len(prompt) + i], [0]).argmax()))
    engine.reset()
    return toks


def stepwise_batch(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """n greedy tokens after each prompt (cache rows 0..), through packed prefill and one decode_batch step
    at a time."""
    toks = engine.runner.prefill(prompts, [0] * len(prompts), list(range(len(prompts)))).argmax(-1).tolist()
    out = [[t] for t in toks]
    for i in range(n - 1):
        toks = engine.decode_batch(toks, [len(p) + i for p in prompts]).argmax(-1).tolist()
        for o, t in zip(out, toks):
            o.append(t)
    return out


def test_engine_decode_paths(w4kv, monkeypatch):
    """The engine's decode loop, decode_batch on arbitrary rows and a server's step on a run of rows, all through
    the CUDA runner's DecodeGraphs; without CUDA its few CUDA runtime calls are stubbed and steps run eagerly.
    The qkv GEMV splits K here (its sums go through the fp32 buffer that the rope kernel zeroes). Steps of up
    to 14 keys take the short graphs (the attention splits merged in the attention kernel, no merge kernel),
    so generations cross to the general ones midway, between bursts."""
    if not CUDA:
        class Stub:
            def __init__(self, *a, **k):
                pass

            def record(self, *a):
                pass

            def synchronize(self):
                pass
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"multi_processor_count": 132}))
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
        monkeypatch.setattr(torch.cuda, "Event", Stub)
    cpu = Engine.from_workspace(w4kv, device="cpu", dtype="float32", batch_size=4, head="int8")
    # greedy bursts of 2 steps keep the interpreter quick
    opts = RuntimeOptions(device=str(DEV), dtype="float16", gpu_path=True, batch_size=4, short_context=14, burst=2,
                          cuda_graphs=CUDA)
    gpu = Engine(load_workspace(w4kv, opts), opts)
    gpu.runner = CudaRunner(gpu.model, gpu.cache, opts, with_graphs=True)
    qkv = gpu.model.layers[0].wqkv
    for bucket in (1, 8):
        monkeypatch.setitem(*table_entry(qkv, bucket), GemvConfig(32, 2))
    assert qkv.accumulates(1)
    gen = GenerationConfig(max_new_tokens=3, temperature=0.0, stop_ids=())
    prompt = ids((10,), 5).tolist()
    assert list(gpu.generate(prompt, gen)) == list(cpu.generate(prompt, gen))
    # greedy bursts (DecodeGraphs.greedy_rows, 2 steps each), against the
    # same engine's one step at a time (the same kernels: equal tokens even at a near tie, unlike the CPU):
    # longer than one burst, then cut by a stop id mid-burst, then a follow-up that reuses the cached conversation
    n = 2 * opts.burst + 3
    gen = GenerationConfig(max_new_tokens=n, temperature=0.0, stop_ids=())
    want = stepwise(gpu, prompt, n)
    assert list(gpu.generate(prompt, gen)) == want and gpu.last_stats.finish == "length"
    stop = GenerationConfig(max_new_tokens=12, temperature=0.0, stop_ids=(want[opts.burst + 2],))
    cut = want[:want.index(want[opts.burst + 2])]
    assert list(gpu.generate(prompt, stop)) == cut and gpu.last_stats.finish == "stop"
    assert gpu._cached == prompt + cut
    # the cached prefix (written by bursts, with steps computed past the stop) is what a fresh prefill writes
    follow = prompt + cut + [11, 12]
    reused = gpu.runner.prefill([follow[len(gpu._cached):]], [len(gpu._cached)], [0])
    gpu.reset()
    assert rel(reused, gpu.runner.prefill([follow], [0], [0])) < 5e-3
    gpu.reset()
    # several prompts at once: packed prefill, then device-side greedy bursts for both rows
    two = [ids((9,), 21).tolist(), ids((5,), 22).tolist()]
    assert gpu.generate_batch(two, gen) == stepwise_batch(gpu, two, n)
    assert {k[1] for k in gpu.runner.graphs.greedy_graphs} == {False, True}  # bursts of both kinds ran
    # the same with a qkv that does not split K: the bursts' rows (distinct sequences) take the fused attention,
    # and the several-row qkv the GEMV with its RMSNorm fused (one program per row)
    monkeypatch.setitem(*table_entry(qkv, 8), GemvConfig(8, 1, dot=False))
    gpu.runner = CudaRunner(gpu.model, gpu.cache, opts, with_graphs=True)
    assert not qkv.accumulates(2)
    assert gpu.generate_batch(two, gen) == stepwise_batch(gpu, two, n)
    monkeypatch.setitem(*table_entry(qkv, 8), GemvConfig(32, 2))
    # packed prefill whose steps hold 8 rows: the 9-token prompt spans two steps (its first positions go first),
    # against each prompt prefilled alone
    small = DecodeGraphs(gpu.model, gpu.cache, opts.replace(prefill_rows=2))
    assert small.pack_rows == 8
    packed = small.prefill(two, [0, 0], [0, 1])
    alone = torch.cat([gpu.runner.prefill([p], [0], [j]) for j, p in enumerate(two)])
    assert rel(packed.cpu(), alone.cpu()) < 5e-3
    # three rows prefilled, then one step with rows in another order and at their own positions
    x, pos = ids((3, 8), 6), torch.arange(8).expand(3, 8)
    cpu.model(x, pos, cpu.cache)
    gpu.model(x.to(DEV), pos.to(DEV), gpu.cache)
    want = cpu.model(torch.tensor([[7], [8], [9]]), torch.tensor([[8], [5], [3]]), cpu.cache, last_only=True)[:, -1]
    got = gpu.decode_batch([8, 9, 7], [5, 3, 8], rows=[1, 2, 0]).cpu()
    assert rel(got[[2, 0, 1]], want) < 5e-3
    # a server's step on rows 1..2, against the CPU model on those rows
    want = cpu.model(torch.tensor([[3], [4]]), torch.tensor([[6], [4]]), cpu.cache.rows(1, 3), True)[:, -1]
    got = gpu.runner.decode([3, 4], [6, 4], [1, 2]).float()
    assert rel(got.cpu(), want) < 5e-3
    assert (gpu.runner.graphs.bufs.qkv_acc == 0).all()


@cuda
def test_engine_on_cuda_uses_graphs_and_generates_like_cpu(w4kv):
    gen = GenerationConfig(max_new_tokens=8, temperature=0.0, stop_ids=())
    prompt = ids((12,), 4).tolist()
    # the CPU engine computes with the int8 head the GPU path loads by default for an int4 workspace
    want = list(Engine.from_workspace(w4kv, device="cpu", dtype="float32", head="int8").generate(prompt, gen))
    eng = Engine.from_workspace(w4kv, device="cuda", batch_size=4)
    assert eng.runner.graphs is not None and isinstance(eng.model.head, Int8Head)
    assert list(eng.generate(prompt, gen)) == want
    assert (1, True) in eng.runner.graphs.greedy_graphs  # the short-context graphs of one row were captured
    # decode_batch: three rows at once equal three single-row steps
    eng.reset()
    rows = [2, 0, 3]
    first = eng.model(torch.tensor([prompt] * 4, device="cuda"), torch.arange(12, device="cuda").expand(4, 12),
                      eng.cache, last_only=True)[:, -1].float()
    toks = first.argmax(-1).tolist()
    batch = eng.decode_batch([toks[r] for r in rows], [12] * 3, rows)
    for i, r in enumerate(rows):
        single = eng.decode_batch([toks[r]], [12], [r])
        assert rel(batch[i], single[0]) < 1e-2


@pytest.fixture(scope="module")
def online_ws(tmp_path_factory, make_tiny):
    """{mode: workspace}: a tiny llama with int4 g32 weights and an online int8 ("8") or int4 KV cache (kv_mode):
    "4" plain per-token codes (as a workspace from before the transform), "4t" int4 as convert writes it with
    K centers from a calibration (Hadamard rotation, centers, a sink position); weights drawn 5x wider than
    transformers' default, so that greedy choices are not near ties."""
    src = make_tiny("llama", seed=5, initializer_range=0.1)
    root = tmp_path_factory.mktemp("gpu-online")
    spaces = {str(bits): convert(src, root / f"kv{bits}", "--kv", f"int{bits}") for bits in (8, 4)}
    ini = spaces["4"] / "config.ini"
    ini.write_text(re.sub(r"(?m)^kv_rotation = hadamard$", "kv_rotation = none", ini.read_text()))
    update_manifest(spaces["4"], "config.ini")
    assert main(["calibrate", "--model", str(src), "--work-dir", str(root / "w"), "--calib-samples", "2",
                 "--calib-seqlen", "64"]) == 0
    spaces["4t"] = convert(src, root / "kv4t", "--kv", "int4", "--kv-params", root / "w")
    return spaces


def test_a_transformed_int4_cache_takes_the_gpu_path(online_ws):
    """int4's transform (Hadamard rotation, K centers, sink) is in the kernels: such a workspace takes the GPU path
    on CUDA like any other."""
    cfg = read_workspace_config(online_ws["4t"])
    assert (cfg.kv_rotation, cfg.kv_k_center, cfg.kv_sink) == ("hadamard", True, 1)
    assert use_gpu_path(torch.device("cuda"), torch.float16, cfg)
    assert isinstance(load_workspace(online_ws["4t"], RuntimeOptions(device=str(DEV), dtype="float16",
                                                                     gpu_path=True)).model, GpuTransformer)


def gpu_greedy(model, cache, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after ``prompt`` in cache row 0: the prefill path, then one-row decode steps (the fused
    attention kernel)."""
    logits = model(torch.tensor([prompt], device=DEV), torch.arange(len(prompt), device=DEV)[None], cache, True)
    toks = [int(logits[0, -1].argmax())]
    bufs = DecodeBuffers.allocate(model.cfg, model.dtype, DEV, [1], cache.max_len, burst=2)
    for p in range(len(prompt), len(prompt) + n - 1):
        bufs.idx[:, :1] = torch.tensor([[toks[-1]], [p], [0]], device=DEV)
        model.decode_step(bufs, 1, cache, RuntimeOptions())
        toks.append(int(bufs.logits[0].argmax()))
    return toks


@pytest.mark.parametrize("mode", ["8", "4", "4t"])
def test_gpu_model_matches_cpu_runtime_with_an_online_cache(online_ws, mode):
    """kv_mode int8 / int4: the kernels write each token's codes and (scale, zp) as the CPU cache does and attend
    over them; prefill, a cached prefix, decode steps of the three-kernel path (rows swapped, padding rows) and of
    the fused one (one row, distinct rows) match the CPU runtime; greedy tokens equal the CPU's. The CPU computes in
    float16 too: the cache quantizes K and V as rounded to the compute dtype, and int4's steps (a fifteenth of a
    head's range) turn fp16-vs-fp32 rounding into logits 3% apart. "4t": with int4's transform, whose sink
    position the kernels keep in fp16 beside its codes."""
    bits = int(mode[0])
    cpu = load_workspace(online_ws[mode], RuntimeOptions(device="cpu", dtype="float16", head="int8"))
    gpu = load_workspace(online_ws[mode], RuntimeOptions(device=str(DEV), dtype="float16", gpu_path=True))
    assert isinstance(gpu.model, GpuTransformer) and cpu.cfg.kv_mode == f"int{bits}"
    c = cpu.cfg

    def cache(ws, dt, rows=4):
        return KVCache(c.num_layer, rows, c.kv_head_num, 64, c.size_per_head, dt, ws.device, online_bits=bits,
                       **ws.kv_transform)
    cc, gc = cache(cpu, torch.float16), cache(gpu, torch.float16)
    tol = 5e-3 if bits == 8 else 2e-2  # rotary rounds apart now and then, and an int4 code then moves a step
    x, pos = ids((2, 20), 2), torch.arange(20).expand(2, 20)  # two fresh rows
    assert rel(gpu.model(x.to(DEV), pos.to(DEV), gc).cpu(), cpu.model(x, pos, cc)) < tol
    assert gc.k[0].dtype == torch.uint8 and gc.k[0].shape[-1] == c.size_per_head * bits // 8
    x, pos = ids((2, 3), 3), torch.arange(20, 23).expand(2, 3)  # after the cached prefix
    got = gpu.model(x.to(DEV), pos.to(DEV), gc, last_only=True)
    assert rel(got.cpu(), cpu.model(x, pos, cc, last_only=True)) < tol
    bufs = DecodeBuffers.allocate(gpu.cfg, torch.float16, DEV, [1, 2, 4], 64, burst=8)
    for step, distinct in enumerate((False, True)):  # rope kernel + attention kernels, then the fused kernel
        tok, p = ids((2,), 10 + step), 23 + step
        want = cpu.model(tok[:, None], torch.tensor([[p], [p]]), cc, last_only=True)[:, -1]
        bufs.idx[:, :4] = torch.tensor([[tok[1], tok[0], 7, 0], [p, p, -1, -1], [1, 0, 3, 2]], device=DEV)
        gpu.model.decode_step(bufs, 4, gc, RuntimeOptions(), distinct=distinct)
        got = bufs.logits[:2].flip(0).cpu()
        assert rel(got, want) < tol and torch.equal(got.argmax(-1), want.argmax(-1))
    assert (gc.k[0][2:].cpu() == 0).all() and (gc.kp[0][2:].cpu() == 0).all()  # padding rows wrote nothing
    assert (gc.kp[0][:2, :, :25].cpu() != 0).all() and (gc.vp[0][:2, :, 25:].cpu() == 0).all()
    if mode == "4t":  # the sink: position 0's transformed K / V in fp16, as the CPU cache holds them
        assert gc.sink == 1
        assert rel(gc.sk[0][:2].cpu(), cc.sk[0][:2]) < 1e-3 and rel(gc.sv[0][:2].cpu(), cc.sv[0][:2]) < 1e-3
    prompt = ids((9,), 4).tolist()
    want = [int(cpu.model(torch.tensor([prompt]), torch.arange(9)[None], cc.rows(0, 1), True)[0, -1].argmax())]
    for p in range(9, 14):
        want.append(int(cpu.model(torch.tensor([[want[-1]]]), torch.tensor([[p]]), cc.rows(0, 1), True)[0, -1].argmax()))
    assert gpu_greedy(gpu.model, gc, prompt, 6) == want


@cuda
@pytest.mark.parametrize("mode", ["8", "4", "4t"])
def test_engine_on_cuda_with_an_online_cache_generates_like_cpu(online_ws, mode):
    """The CUDA engine (graphs, greedy bursts) over an online cache: the CPU engine's 32 greedy tokens, the CPU
    computing in float16 too (K and V are quantized as rounded to the compute dtype: against float32, a code that
    moves a step turns a near tie at token 8 here)."""
    gen = GenerationConfig(max_new_tokens=32, temperature=0.0, stop_ids=())
    prompt = ids((12,), 4).tolist()
    cpu = Engine.from_workspace(online_ws[mode], device="cpu", dtype="float16", head="int8")
    want = list(cpu.generate(prompt, gen))
    eng = Engine.from_workspace(online_ws[mode], device="cuda", batch_size=4)
    assert eng.runner.graphs is not None and eng.cache.online
    assert list(eng.generate(prompt, gen)) == want


def test_head_formats_on_the_cpu_path(w4kv):
    """head="auto" keeps the workspace's head on the CPU path; "int8" computes with the int8 head's values
    (one scale per vocabulary row, within half a step of the weights); int4 and unknown names are refused."""
    fp = load_workspace(w4kv, RuntimeOptions(device="cpu", dtype="float32"))
    q8 = load_workspace(w4kv, RuntimeOptions(device="cpu", dtype="float32", head="int8"))
    assert torch.equal(q8.model.tok_embeddings, fp.model.tok_embeddings)  # only the head is quantized
    w = fp.model.output.float()
    step = w.abs().amax(dim=1, keepdim=True) / 127
    err = (q8.model.output.float() - w).abs()
    assert (err <= step / 2 + 1e-6).all() and err.max() > 0
    for bad in ("int4", "int3"):
        with pytest.raises(QconvError, match="head"):
            load_workspace(w4kv, RuntimeOptions(device="cpu", dtype="float32", head=bad))


def test_pdl_option_scopes_the_runners_launches(monkeypatch):
    """RuntimeOptions.pdl=False: every launch the CUDA runner makes (prefill, decode, each resume of greedy
    steps) happens inside pdl_enabled(False); with pdl=True, and outside the runner, kernels on an sm_90 device
    use PDL."""
    from qconv.runtime.cuda import kernels
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    on_gpu = type("T", (), {"device": torch.device("cuda", 0)})()
    seen = []

    def model(ids, pos, cache, last_only=False):  # what each launch of a forward would decide
        seen.append(kernels.pdl(on_gpu))
        return torch.zeros(ids.shape[0], 1, 5)
    cache = KVCache(1, 2, 1, 8, 4, torch.float32, torch.device("cpu"))
    for on in (True, False):
        seen.clear()
        runner = CudaRunner(model, cache, RuntimeOptions(pdl=on), with_graphs=False)
        runner.prefill([[1, 2]], [0], [0])
        runner.decode([3], [2], [0])
        steps = runner.greedy([3], [2], [0], 2)
        next(steps)
        assert kernels.pdl(on_gpu)  # between two resumes the caller's code is outside the runner's scope
        assert list(steps) == [[0]]
        assert seen == [on] * 4 and kernels.pdl(on_gpu)
