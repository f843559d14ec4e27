"""Cost model against numbers worked out by hand and against torch's FlopCounterMode."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lowbit.config import LayerRule, QuantConfig
from lowbit.cost import measure
from lowbit.errors import ConfigError
from lowbit.prepare import prepare


class Hand(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).flatten(1))


X = torch.randn(5, 3, 8, 8)


def test_float_costs_by_hand():
    rep = measure(Hand().eval(), X)
    conv, fc = rep.layers
    assert (conv.params, conv.macs) == (108, 8 * 8 * 4 * 27)
    assert (fc.params, fc.macs) == (2570, 2560)
    assert conv.bitops == 6912 * 32 * 32
    assert rep.other_params == 8
    assert rep.weight_bits == (108 + 2570 + 8) * 32


def test_quantized_costs_by_hand():
    cfg = QuantConfig.uniform(4, 8, first_last="same", fold_bn=False)
    rep = measure(prepare(Hand().eval(), cfg, X), X)
    conv, fc = rep.layers
    assert conv.bitops == 6912 * 4 * 8
    assert fc.bitops == 2560 * 4 * 8
    assert conv.weight_bits == 108 * 4
    assert fc.weight_bits == 2560 * 4 + 10 * 32
    assert (conv.act_elems, conv.act_bits) == (192, 192 * 8)
    assert (fc.act_elems, fc.act_bits) == (256, 256 * 8)
    assert rep.max_act_bits == 2048
    assert rep.weight_bits == 108 * 4 + 2560 * 4 + 10 * 32 + 8 * 32
    assert rep.avg_weight_bits == pytest.approx((108 * 4 + 2570 * 4) / 2678)
    assert rep.bitops == 6912 * 32 + 2560 * 32


def test_mixed_precision_and_depthwise_macs():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 2, 1))
    cfg = QuantConfig.uniform(8, 8, first_last="same",
                              layers=[LayerRule(match="0", w_bits=2, a_bits=4)])
    rep = measure(prepare(model, cfg, torch.randn(1, 4, 6, 6)), torch.randn(3, 4, 6, 6))
    dw, pw = rep.layers
    assert dw.macs == 4 * 36 * 9 and dw.bitops == dw.macs * 2 * 4
    assert pw.macs == 2 * 36 * 4 and pw.bitops == pw.macs * 64


def test_table_lists_every_layer():
    text = measure(prepare(Hand().eval(), QuantConfig.uniform(4, 4), X), X).table()
    assert "conv" in text and "fc" in text and "BitOPs" in text


def _flops(model: nn.Module, *inputs) -> int:
    """What torch's own counter finds for one forward pass (train mode: no fused attention)."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    model.eval()
    return counter.get_total_flops()


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


def test_module_called_twice_costs_twice_and_its_params_count_once():
    x = torch.randn(2, 4, 8, 8)
    (row,) = measure(Twice(), x).layers
    assert (row.calls, row.params, row.macs) == (2, 148, 2 * 4 * 64 * 36)
    assert row.weight_bits == 148 * 32
    assert measure(Twice(), x).params == 148
    q = prepare(Twice(), QuantConfig.uniform(4, 8, first_last="same"), x)
    (qrow,) = measure(q, x).layers
    assert (qrow.macs, qrow.bitops, qrow.weight_bits) == (18432, 18432 * 4 * 8, 144 * 4 + 4 * 32)


def test_conv1d_by_hand():
    # L_out = (20 + 2 - 5) // 2 + 1 = 9; each output sums 3 * 5 products
    (row,) = measure(nn.Conv1d(3, 6, 5, stride=2, padding=1), torch.randn(2, 3, 20)).layers
    assert (row.type, row.params, row.macs, row.act_elems) == ("Conv1d", 96, 6 * 9 * 15, 60)


def test_conv_transpose2d_by_hand():
    # every input element meets out_channels / groups * kH * kW weights, cropped or not
    m = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    x = torch.randn(2, 4, 5, 5)
    assert m(x).shape == (2, 6, 10, 10)
    (row,) = measure(m, x).layers
    assert (row.params, row.macs) == (4 * 3 * 9 + 6, 100 * 3 * 9)
    assert _flops(m, x) == 2 * row.macs * 2


def test_linear_on_3d_input_counts_every_row():
    (row,) = measure(nn.Linear(8, 5), torch.randn(2, 7, 8)).layers
    assert (row.params, row.macs, row.act_elems) == (45, 7 * 5 * 8, 56)


class Attn(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kw)

    def forward(self, x, mem=None):
        mem = x if mem is None else mem
        return self.attn(x, mem, mem)[0]


def test_multihead_attention_projections_and_matmuls_by_hand():
    x = torch.randn(2, 6, 8)
    rep = measure(Attn(), x)
    proj, att, out = rep.layers
    assert [r.name for r in rep.layers] == ["attn.in_proj", "attn.attention", "attn.out_proj"]
    assert (proj.params, proj.macs) == (3 * 64 + 24, 6 * 8 * 24)
    assert (att.params, att.macs, att.weight_bits) == (0, 2 * 6 * 6 * 8, 0)
    assert (out.params, out.macs) == (64 + 8, 6 * 64)
    assert rep.params == sum(p.numel() for p in Attn().parameters()) and rep.other_params == 0
    assert _flops(Attn(), x) == 2 * rep.macs * 2


class Cross(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, **kw)

    def forward(self, q, k, v):
        return self.attn(q, k, v)[0]


@pytest.mark.parametrize("kw, q, kv, batch", [
    (dict(kdim=5, vdim=3, batch_first=True), (3, 4, 8), [(3, 7, 5), (3, 7, 3)], 3),
    (dict(add_bias_kv=True, add_zero_attn=True), (4, 3, 8), [(7, 3, 8)] * 2, 3),
    (dict(), (4, 8), [(7, 8)] * 2, 1),
])
def test_cross_attention_matches_torch_flop_counter(kw, q, kv, batch):
    model = Cross(**kw)
    inputs = (torch.randn(q), *(torch.randn(s) for s in kv))
    rep = measure(model, inputs, batch=batch)
    assert rep.params == sum(p.numel() for p in model.parameters()) and rep.other_params == 0
    assert _flops(model, *inputs) == 2 * rep.macs * batch


def test_layer_kept_float_still_counts_at_32_bits():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(2), nn.Conv1d(4, 4, 1))
    x = torch.randn(2, 3, 6, 6)
    cfg = QuantConfig.uniform(4, 8, first_last="same", layers=[LayerRule(match="0", keep_float=True)])
    first, conv1d = measure(prepare(model, cfg, x), x).layers
    assert (first.w_bits, first.a_bits, first.macs) == (32, 32, 4 * 16 * 27)
    assert first.bitops == first.macs * 32 * 32 and first.weight_bits == 112 * 32
    assert (conv1d.type, conv1d.w_bits, conv1d.macs) == ("Conv1d", 32, 4 * 16 * 4)


def test_layer_never_called_adds_its_params_to_the_size():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.spare = nn.Linear(4, 2), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    rep = measure(Unused(), torch.randn(2, 4))
    assert [r.name for r in rep.layers] == ["fc"] and rep.other_params == 15
    assert rep.params == 25


def test_batch_size_does_not_change_per_sample_costs():
    one, five = measure(Hand().eval(), X[:1]), measure(Hand().eval(), X)
    assert one.to_dict() == five.to_dict()
    assert measure(nn.Linear(3, 2), torch.randn(3)).macs == 6


def test_batch_that_cannot_be_read_is_an_error():
    with pytest.raises(ConfigError, match="batch=N"):
        measure(nn.Identity(), [torch.randn(2, 3)])
    with pytest.raises(ConfigError, match="positive integer"):
        measure(nn.Linear(3, 2), torch.randn(2, 3), batch=0)


class Zoo(nn.Module):
    """Conv2d, depthwise, ConvTranspose, Conv1d, Linear on 3-D input and attention in one graph."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.seq = nn.Conv1d(4, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.up(torch.relu(self.dw(self.stem(x))))
        t = self.seq(y.flatten(2)).permute(2, 0, 1)
        again = self.dw(self.stem(x)).flatten(2).transpose(1, 2)
        return self.fc(self.attn(t, t, t)[0]).mean() + self.fc(again).mean()


def test_zoo_matches_torch_flop_counter():
    x = torch.randn(2, 3, 8, 8)
    rep = measure(Zoo(), x)
    calls = {r.name: r.calls for r in rep.layers}
    assert calls["stem"] == calls["dw"] == calls["fc"] == 2 and calls["up"] == 1
    assert _flops(Zoo(), x) == 2 * rep.macs * 2


@settings(max_examples=40, deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]), transposed=st.booleans(), groups=st.sampled_from([1, 2]),
    c_in=st.integers(1, 3), c_out=st.integers(1, 3), k=st.integers(1, 3), stride=st.integers(1, 3),
    padding=st.integers(0, 2), dilation=st.integers(1, 2), size=st.integers(5, 9),
    batch=st.integers(1, 3),
)
def test_any_conv_matches_torch_flop_counter(dims, transposed, groups, c_in, c_out, k, stride,
                                             padding, dilation, size, batch):
    kind = [[nn.Conv1d, nn.Conv2d, nn.Conv3d], [nn.ConvTranspose1d, nn.ConvTranspose2d,
                                                nn.ConvTranspose3d]][transposed][dims - 1]
    extra = {"output_padding": stride - 1} if transposed and stride > dilation else {}
    m = kind(c_in * groups, c_out * groups, k, stride=stride, padding=padding,
             dilation=dilation, groups=groups, **extra)
    x = torch.randn(batch, c_in * groups, *[size] * dims)
    try:
        m(x)
    except RuntimeError:
        assume(False)  # the shape has no valid output
    (row,) = measure(m, x).layers
    assert _flops(m, x) == 2 * row.macs * batch
