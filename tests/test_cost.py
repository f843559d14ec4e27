"""Cost model against numbers worked out by hand."""

import pytest
import torch
from torch import nn

from lowbit.config import LayerRule, QuantConfig
from lowbit.cost import measure
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
