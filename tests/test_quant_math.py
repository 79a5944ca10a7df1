"""Pure quantization maths against hand computations."""
import pytest
import torch

from qconv.convert import quant as Q
from qconv.pipelines.stats import ChannelStats, head_minmax, kv_stats, merge_minmax


def test_kv_qparams_asym_by_hand():
    # zp = (min+max)/2, scale = (max-min)/255
    scale, zp = Q.kv_qparams(torch.tensor([-1.0, 0.0]), torch.tensor([3.0, 2.55]), torch.tensor([3.0, 2.55]), sym=False)
    assert torch.allclose(scale, torch.tensor([4.0 / 255, 0.01]))
    assert torch.allclose(zp, torch.tensor([1.0, 1.275]))


def test_kv_qparams_sym_by_hand():
    scale, zp = Q.kv_qparams(torch.tensor([-2.54]), torch.tensor([1.0]), torch.tensor([2.54]), sym=True)
    assert torch.allclose(scale, torch.tensor([0.02]))
    assert zp.item() == 0.0


def test_kv_scale_floor_on_constant_channel():
    c = torch.tensor([0.7, 0.0])
    for sym in (False, True):
        scale, zp = Q.kv_qparams(c, c, c.abs(), sym=sym)
        assert torch.all(scale > 0) and torch.all(torch.isfinite(scale))
        q = Q.kv_quantize(torch.tensor([0.7, 0.0]), scale, zp)
        x = Q.kv_dequantize(q, scale, zp, torch.float32)
        assert torch.allclose(x, torch.tensor([0.7, 0.0]), atol=1e-3)


def test_kv_quantize_round_trip_and_clamp():
    scale, zp = torch.tensor(0.5), torch.tensor(1.0)
    x = torch.tensor([1.0, 1.24, 1.26, 1000.0, -1000.0])
    q = Q.kv_quantize(x, scale, zp)
    assert q.tolist() == [0, 0, 1, 127, -128]  # round((x - 1) / 0.5), clamped to int8
    assert Q.kv_dequantize(q, scale, zp, torch.float32).tolist() == [1.0, 1.0, 1.5, 64.5, -63.0]


def test_kv_reduce_head_and_layer_with_tp():
    lo = torch.tensor([[-1.0, -2.0], [-3.0, 0.0], [-0.5, -0.125], [-4.0, -1.0]])  # [H=4, D=2]
    hi = torch.tensor([[1.0, 5.0], [2.0, 0.5], [0.25, 0.375], [1.0, 1.5]])
    l, h, a = Q.kv_reduce(lo, hi, "head")
    assert l.tolist() == [-2.0, -3.0, -0.5, -4.0] and h.tolist() == [5.0, 2.0, 0.375, 1.5]
    assert a.tolist() == [5.0, 3.0, 0.5, 4.0]
    l, h, _ = Q.kv_reduce(lo, hi, "layer", num_tp=2)  # shards: heads {0,1} and {2,3}
    assert l.tolist() == [-3.0, -3.0, -4.0, -4.0] and h.tolist() == [5.0, 5.0, 1.5, 1.5]
    l, h, _ = Q.kv_reduce(lo, hi, "layer", num_tp=1)
    assert l.tolist() == [-4.0] * 4 and h.tolist() == [5.0] * 4


def test_channel_stats_by_hand_and_merge():
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0], [-5.0, 0.0]])  # 3 tokens, 2 channels
    s = ChannelStats.of(x).finalize()
    assert s["max"].tolist() == [3.0, 4.0] and s["min"].tolist() == [-5.0, -2.0]
    assert s["mean"].tolist() == pytest.approx([-1 / 3, 2 / 3])
    assert s["absmax"].tolist() == [5.0, 4.0]
    assert s["absmean"].tolist() == pytest.approx([3.0, 2.0])
    merged = ChannelStats.of(x[:1]).merge(ChannelStats.of(x[1:])).finalize()
    for k in s:
        assert torch.allclose(merged[k], s[k])


def test_head_minmax_by_hand():
    k = torch.arange(16.0).reshape(1, 2, 4, 2) - 8  # [B=1, H=2, S=4, D=2]
    lo, hi = head_minmax(k)
    assert lo.tolist() == [[-8, -7], [0, 1]] and hi.tolist() == [[-2, -1], [6, 7]]
    both = merge_minmax(merge_minmax(None, head_minmax(k[:, :, :2])), head_minmax(k[:, :, 2:]))
    assert kv_stats(both)["absmax"].tolist() == [[8, 7], [6, 7]]


def test_group_quant_asym_by_hand():
    w = torch.tensor([[0.0, 1.5, 3.0, -1.5]])  # one row, one group of 4
    scale, zero = Q.group_qparams(w, bits=4, group_size=4)
    assert scale.item() == pytest.approx(4.5 / 15) and zero.item() == 5  # zero = -round(-1.5/0.3)
    q = Q.quantize(w, scale, zero, bits=4)
    assert q.tolist() == [[5, 10, 15, 0]]
    assert torch.allclose(Q.dequantize(q, scale, zero), w, atol=1e-6)


def test_awq_pack_order_and_round_trip():
    codes = torch.arange(8, dtype=torch.int32)[None]  # columns 0..7 hold values 0..7
    packed = Q.pack_int4_awq(codes)
    nibbles = [(packed.item() >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i holds column AWQ_ORDER[i]
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.int32)
    assert torch.equal(Q.unpack_int4_awq(Q.pack_int4_awq(codes)), codes)
