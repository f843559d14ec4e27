"""The integer reference's fast paths: float sums and float64 requantization are used only where
a bound proves them exact, and then equal integer arithmetic."""

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.errors import ExportError
from lowbit.export.exact_sums import FLOAT32_EXACT, FLOAT64_EXACT, exact_sums, plan_sums
from lowbit.export.integer import dyadic, scale_round


def _extreme_codes(shape, bound: int, gen: torch.Generator) -> torch.Tensor:
    """Codes in [-bound, bound], most of them at the ends (the worst case for the sums)."""
    pick = torch.randint(0, 4, shape, generator=gen)
    rand = torch.randint(-bound, bound + 1, shape, generator=gen)
    return torch.where(pick == 0, bound, torch.where(pick == 1, -bound, rand))


@settings(max_examples=40, deadline=None)
@given(c_in=st.integers(1, 24), c_out=st.integers(1, 6), k=st.sampled_from([1, 3]),
       depthwise=st.booleans(), x_bits=st.sampled_from([2, 8, 12, 16, 24]),
       w_bits=st.sampled_from([2, 4, 8, 16, 30]), seed=st.integers(0, 2**16))
def test_every_sum_path_equals_integer_convolution(c_in, c_out, k, depthwise, x_bits, w_bits,
                                                   seed):
    gen = torch.Generator().manual_seed(seed)
    groups, c_out = (c_in, c_in) if depthwise else (1, c_out)
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups)
    x_bound, w_bound = 2 ** (x_bits - 1), 2 ** (w_bits - 1) - 1
    codes = _extreme_codes(conv.weight.shape, w_bound, gen)
    x = _extreme_codes((2, c_in, 5, 5), x_bound, gen)
    plan = plan_sums(codes, x_bound)
    assert plan.bound == codes[0].numel() * x_bound * int(codes.abs().max())
    want = nn.functional.conv2d(x, codes, None, 1, k // 2, 1, groups)  # int64 kernels
    assert torch.equal(exact_sums(conv, x, codes, plan), want), plan
    if plan.path == "float32":
        assert plan.bound < FLOAT32_EXACT
    elif plan.path == "float64":
        assert FLOAT32_EXACT <= plan.bound < FLOAT64_EXACT
    elif plan.path == "int64":
        assert plan.bound >= FLOAT64_EXACT


def test_wide_codes_take_the_split_float64_and_int64_paths():
    """A linear layer with 1024 inputs: 8-bit codes overflow float32 in one sum but not split;
    16-bit codes need float64; 27-bit ones int64. Each path is exact on an all-maximal row,
    where float32 alone is not (the sum is odd and beyond 2**24)."""
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(1024, 3)
    for x_bound, w_bound, path in [(255, 127, "float32-split"), (2**15 - 1, 2**15 - 1, "float64"),
                                   (2**26 - 1, 2**26 - 1, "int64")]:
        codes = _extreme_codes(lin.weight.shape, w_bound, gen)
        x = _extreme_codes((8, 1024), x_bound, gen)
        codes[0], x[0], x[0, 0] = w_bound, x_bound, x_bound - 1  # an odd sum
        plan = plan_sums(codes, x_bound)
        assert plan.path == path
        want = x @ codes.T
        assert torch.equal(exact_sums(lin, x, codes, plan), want)
        naive = nn.functional.linear(x.float(), codes.float()).double()
        assert naive[0, 0] != want[0, 0].double()


def test_sums_beyond_int64_are_refused():
    with pytest.raises(ExportError, match="do not fit int64"):
        plan_sums(torch.full((1, 64), 2**31), 2**31)


@settings(max_examples=80)
@given(mult=st.floats(2.0**-30, 2.0**10, allow_nan=False, width=32),
       values=st.lists(st.integers(-(2**31), 2**31), min_size=1, max_size=8),
       offset=st.integers(-128, 255))
def test_scale_round_is_exact_on_both_paths(mult, values, offset):
    """int32 accumulators times multipliers of up to 24 significant bits cross ``2**53``, so
    both the float64 and the int64-shift path run; beyond int64 it refuses."""
    m, n = dyadic(torch.tensor([mult]))
    p = torch.tensor(values, dtype=torch.int64)
    want = [round(Fraction(v) * Fraction(mult)) + offset for v in values]
    assert scale_round(p, m, n, offset).tolist() == want
    lo, hi = -(2**20), 2**20
    assert scale_round(p, m, n, offset, lo, hi).tolist() == [min(hi, max(lo, w)) for w in want]
    with pytest.raises(ExportError, match="beyond int64"):
        scale_round(torch.tensor([2**45]), torch.tensor([2**23 + 1]), torch.tensor([0]))


@given(st.integers(0, 2**31 - 1), st.integers(-4, 0), st.integers(-12, -8), st.integers(-1, 1))
@settings(max_examples=40, deadline=None)
def test_accumulator_add_rounds_once_like_a_float_runtime(seed, ea, eb, eo):
    """Two conv accumulators on power-of-two scales added, then requantized: exactly the
    float sum rounded once (half to even), as onnxruntime computes it."""
    from lowbit.export.integer import Grid, IntValue, Stats, _add, requantize

    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-300, 300, (4, 3, 5, 5), generator=g)
    b = torch.randint(-30000, 30000, (4, 3, 5, 5), generator=g)
    zero = torch.zeros(1, dtype=torch.int64)
    va = IntValue(a, torch.tensor([2.0**ea]), zero)
    vb = IntValue(b, torch.tensor([2.0**eb]), zero)
    grid = Grid(torch.tensor([2.0**eo]), torch.tensor([128]), 8, False, 0, 255, None, True)
    got = requantize(_add(va, vb, Stats()), grid).data
    real = a.double() * 2.0**ea + b.double() * 2.0**eb
    want = (torch.round(real / 2.0**eo) + 128).clamp(0, 255).to(torch.int64)
    assert torch.equal(got, want)
