"""The graph: BN folding never changes the float function, units and chains come from the graph.

A zoo of user-style models (BN after interpolate/pool/cat/add, a conv also used raw, a conv
called twice, pre-activation residuals, ConvTranspose/Conv1d + BN, functional activations) and
hypothesis-generated graphs: the prepared model in float mode must equal the original, and every
BN that was not folded must be listed with its reason.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lowbit
from lowbit import QuantConfig
from lowbit.graph import GraphTraceWarning, trace_graph
from lowbit.prepare import float_mode
from lowbit.ptq.blocks import find_units
from tests.helpers import randomize_bn

C = 4


def conv(c_in=C, c_out=C, **kw):
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kw)


class AfterInterpolate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = conv(3), conv(), nn.BatchNorm2d(C)

    def forward(self, x):
        y = F.interpolate(torch.relu(self.a(x)), scale_factor=2.0)
        return self.bn(self.b(y)) + 0 * F.max_pool2d(y, 1)[:, :1].mean()


class InterpolateThenBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = conv(3), conv(), nn.BatchNorm2d(C)

    def forward(self, x):
        y = self.b(x[:, :1].expand(-1, C, -1, -1))
        return self.bn(F.interpolate(torch.relu(self.a(x)), scale_factor=1.0)) + y


class AfterPoolCatAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv(3), conv(3)
        self.bn_pool, self.bn_cat, self.bn_add = (nn.BatchNorm2d(C), nn.BatchNorm2d(2 * C),
                                                  nn.BatchNorm2d(C))

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        p = self.bn_pool(F.max_pool2d(a, 3, 1, 1))
        c = self.bn_cat(torch.cat([a, b], 1))
        return p + self.bn_add(a + b) + c[:, :C]


class RawAlsoUsed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv(3), nn.BatchNorm2d(C)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.bn = conv(3), conv(), nn.BatchNorm2d(C)

    def forward(self, x):
        x = self.stem(x)
        return self.bn(self.conv(x)) + self.conv(x * 0.5)


class PreActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv(3)
        self.bn1, self.conv1, self.bn2, self.conv2 = (nn.BatchNorm2d(C), conv(),
                                                      nn.BatchNorm2d(C), conv())

    def forward(self, x):
        x = self.stem(x)
        return x + self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw, self.bn_pw = conv(3), nn.BatchNorm2d(C)
        self.dw, self.bn_dw = nn.Conv2d(C, C, 3, padding=1, groups=C), nn.BatchNorm2d(C)
        self.act = nn.ReLU6()

    def forward(self, x):
        return self.bn_dw(self.dw(self.act(self.bn_pw(self.pw(x)))))


class TransposeAnd1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.bn_up = nn.ConvTranspose2d(3, C, 2, stride=2), nn.BatchNorm2d(C)
        self.c1, self.bn_1d = nn.Conv1d(C, C, 3, padding=1), nn.BatchNorm1d(C)
        self.fc, self.bn_fc = nn.Linear(C, C), nn.BatchNorm1d(C)

    def forward(self, x):
        y = self.bn_up(self.up(x))
        z = self.bn_1d(self.c1(y.flatten(2)))
        return self.bn_fc(self.fc(z.mean(2)))


class BNCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = conv(3), nn.BatchNorm2d(C)

    def forward(self, x):
        y = self.bn(self.a(x))
        return self.bn(y)


class LinearOn3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(C, C), nn.BatchNorm1d(C)

    def forward(self, x):
        return self.bn(self.fc(x.mean(2)[:, :, :C].expand(-1, C, -1)))


ZOO = {
    # model: (folded BN names, unfolded BN names)
    AfterInterpolate: ({"bn"}, set()),
    InterpolateThenBN: (set(), {"bn"}),
    AfterPoolCatAdd: (set(), {"bn_pool", "bn_cat", "bn_add"}),
    RawAlsoUsed: (set(), {"bn"}),
    CalledTwice: (set(), {"bn"}),
    PreActivation: ({"bn2"}, {"bn1"}),
    Depthwise: ({"bn_pw", "bn_dw"}, set()),
    TransposeAnd1d: ({"bn_fc"}, {"bn_up", "bn_1d"}),
    BNCalledTwice: (set(), {"bn"}),
    LinearOn3d: (set(), {"bn"}),
}


def _input(cls):
    return torch.randn(2, C if cls is LinearOn3d else 3, 6, 6)


@pytest.mark.parametrize("cls", list(ZOO), ids=lambda c: c.__name__)
@pytest.mark.parametrize("train_mode", [False, True])
def test_prepare_never_changes_the_float_function(cls, train_mode):
    torch.manual_seed(0)
    model = randomize_bn(cls())
    model.train(train_mode)
    x = _input(cls)
    q = lowbit.prepare(model, QuantConfig.uniform(8, 8), x)
    model.eval()
    with torch.no_grad(), float_mode(q):
        diff = (q.eval()(x) - model(x)).abs().max().item()
    assert diff <= 1e-5
    folded, unfolded = ZOO[cls]
    report = q.lowbit_report
    assert {bn for _, bn in report.folded} == folded
    assert set(report.unfolded) == unfolded
    for bn in unfolded:
        assert report.unfolded[bn] and report.kept_float[bn].startswith("BatchNorm not folded: ")


def test_unfolded_reasons_name_the_cause():
    x = _input(RawAlsoUsed)
    assert "also used by" in lowbit.prepare(RawAlsoUsed(), None, x).lowbit_report.unfolded["bn"]
    assert "called 2 times" in lowbit.prepare(CalledTwice(), None, x).lowbit_report.unfolded["bn"]
    why = lowbit.prepare(InterpolateThenBN(), None, x).lowbit_report.unfolded["bn"]
    assert "interpolate" in why
    why = lowbit.prepare(TransposeAnd1d(), None, x).lowbit_report.unfolded["bn_up"]
    assert "ConvTranspose2d" in why and "does not quantize" in why


def test_linear_bn_fold_needs_an_example_to_check_the_axis():
    model = randomize_bn(TransposeAnd1d())
    report = lowbit.prepare(model).lowbit_report
    assert "bn_fc" in report.unfolded and "example input" in report.unfolded["bn_fc"]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv(3), nn.BatchNorm2d(C)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if x.sum() > 0 else -y


def test_untraceable_model_warns_and_folds_nothing():
    model = randomize_bn(Untraceable())
    x = torch.rand(2, 3, 6, 6)
    with pytest.warns(GraphTraceWarning, match="left unfolded"):
        q = lowbit.prepare(model, QuantConfig.uniform(8, 8), x)
    assert q.lowbit_report.folded == [] and "could not trace" in q.lowbit_report.unfolded["bn"]
    with torch.no_grad(), float_mode(q):
        torch.testing.assert_close(q(x), model(x))


# --- hypothesis: random DAGs of convs, BNs, activations, adds and pools ------------------------

OPS = ("conv", "dwconv", "reuse", "bn", "relu", "relu6", "add", "pool", "interp", "scale")


class RandomNet(nn.Module):
    """Runs a list of (op, input indices) over a growing list of values, all [N, C, H, W]."""

    def __init__(self, program):
        super().__init__()
        self.program = program
        self.mods = nn.ModuleList()
        self.slot = []
        for op, _ in program:
            if op == "conv":
                self.mods.append(nn.Conv2d(C, C, 3, padding=1))
            elif op == "dwconv":
                self.mods.append(nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False))
            elif op == "bn":
                self.mods.append(nn.BatchNorm2d(C))
            elif op == "relu6":
                self.mods.append(nn.ReLU6())
            else:
                self.slot.append(None)
                continue
            self.slot.append(len(self.mods) - 1)
        self.first = next((s for s in self.slot if s is not None
                           and isinstance(self.mods[s], nn.Conv2d)), None)

    def forward(self, x):
        vals = [x]
        for (op, (i, j)), s in zip(self.program, self.slot, strict=True):
            a, b = vals[i % len(vals)], vals[j % len(vals)]
            if s is not None:
                y = self.mods[s](a)
            elif op == "reuse" and self.first is not None:
                y = self.mods[self.first](a)
            elif op == "relu":
                y = F.relu(a)
            elif op == "add":
                y = a + b
            elif op == "pool":
                y = F.avg_pool2d(a, 3, 1, 1)
            elif op == "interp":
                y = F.interpolate(a, scale_factor=1.0)
            else:
                y = a * 0.5
            vals.append(y)
        return sum(vals[1:]) if len(vals) > 1 else x


program = st.lists(st.tuples(st.sampled_from(OPS), st.tuples(st.integers(0, 20),
                                                             st.integers(0, 20))),
                   min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(program)
def test_generated_graphs_keep_their_float_function(prog):
    torch.manual_seed(0)
    model = randomize_bn(RandomNet(prog))
    x = torch.randn(2, C, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphTraceWarning)
        q = lowbit.prepare(model, QuantConfig.uniform(8, 8), x)
    with torch.no_grad(), float_mode(q):
        ref, out = model(x), q.eval()(x)
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    report = q.lowbit_report
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert {bn for _, bn in report.folded} | set(report.unfolded) == bns


# --- units from the graph: a user's own residual network ------------------------------------


class UserBlock(nn.Module):
    """A user-style basic block: functional ReLU, an F.pad shortcut written inside forward."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pad = (c_out - c_in) // 2
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.stride == 1 else F.pad(x[:, :, ::2, ::2],
                                                 (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(UserBlock(4, 4, 1), UserBlock(4, 4, 1))
        self.layer2 = nn.Sequential(UserBlock(4, 8, 2), UserBlock(8, 8, 1))
        self.linear = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_units_of_a_user_residual_network_are_its_blocks():
    x = torch.randn(2, 3, 8, 8)
    q = lowbit.prepare(randomize_bn(UserNet()), QuantConfig.uniform(4, 4), x)
    assert find_units(q) == ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "linear"]
    merges = trace_graph(q).residual_adds()
    assert len(merges) == 4
    assert all(m.add in m.region and m.fork not in m.region for m in merges)


class PlainStages(nn.Module):
    """Blocks with and without a skip side by side, and the stem conv inside the container."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6()),
            UserBlock(4, 8, 2), UserBlock(8, 8, 1),
            nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU6()),
        )
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_neighbours_of_blocks_in_their_container_are_units():
    q = lowbit.prepare(PlainStages(), QuantConfig.uniform(4, 4), torch.randn(2, 3, 8, 8))
    assert find_units(q) == ["features.0", "features.1", "features.2", "features.3", "fc"]


def test_a_block_called_twice_is_not_a_unit():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = UserBlock(4, 4, 1)

        def forward(self, x):
            return self.block(self.block(x))

    q = lowbit.prepare(Twice(), QuantConfig.uniform(4, 4), torch.randn(2, 4, 8, 8))
    assert find_units(q) == ["block.conv1", "block.conv2"]


def test_order_comes_from_the_graph_without_an_example():
    from tests.helpers import Tiny

    order = lowbit.prepare(Tiny()).lowbit_report
    assert (order.first_layer, order.last_layer) == ("stem", "head")


@pytest.mark.parametrize("cls", [AfterPoolCatAdd, PreActivation, Depthwise, UserNet],
                         ids=lambda c: c.__name__)
def test_measure_of_prepared_zoo_matches_torch_flop_counter(cls):
    x = torch.randn(1, 3, 8, 8)
    model = randomize_bn(cls())
    q = lowbit.prepare(model, QuantConfig.uniform(8, 8), x)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    convs_and_linears = sum(v for k, v in fc.get_flop_counts()["Global"].items()
                            if "convolution" in str(k) or "addmm" in str(k) or "mm" in str(k))
    assert lowbit.measure(q, x).macs * 2 == convs_and_linears
