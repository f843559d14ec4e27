"""The reconstruction cache: chunked evaluation and the unit walk that feeds each block."""

import copy

import torch
from torch import nn

from lowbit import QuantConfig, prepare
from lowbit.prepare import calibrate, set_mode
from lowbit.ptq.blocks import find_units, run_chunked, trace_units, walk_units
from tests.test_rapq import Block, Net, trained_like_bn


def test_run_chunked_matches_one_pass_and_keeps_channels_last():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(10, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    out = run_chunked(conv, (x,), {}, 10, 3)
    with torch.no_grad():
        ref = conv(x)
    assert out.shape == (10, 4, 6, 6)
    assert torch.allclose(out, ref, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(
        memory_format=torch.channels_last)


def test_run_chunked_unbatched_output_and_constants_pass_through():
    x = torch.randn(7, 5)
    assert run_chunked(lambda t: t.shape, (x,), {}, 7, 2) == torch.Size([7, 5])
    out = run_chunked(lambda t, k: t * k, (x, 3.0), {}, 7, 2)
    assert torch.equal(out, x * 3.0)


def test_walk_units_feeds_each_unit_its_real_inputs_and_float_outputs():
    """What a unit is given must be what the quantized model really feeds it, and the target
    what the float model really produces there, even though nothing is re-run."""
    torch.manual_seed(0)
    x = torch.randn(20, 3, 8, 8)
    model = trained_like_bn(Net(), x)
    q = prepare(model, QuantConfig.uniform(4, 4), x[:2])
    calibrate(q, [x])
    q.eval()
    fp = set_mode(copy.deepcopy(q), "float").eval()
    units = find_units(q, (Block,))
    assert units == ["stem", "block", "fc"]

    seen_q_in, seen_fp_out = {}, {}

    def grab(store, name):
        def hook(mod, inputs, out):
            store[name] = (inputs[0].detach().clone(), out.detach().clone())
        return hook

    handles = [q.get_submodule(u).register_forward_hook(grab(seen_q_in, u)) for u in units]
    handles += [fp.get_submodule(u).register_forward_hook(grab(seen_fp_out, u)) for u in units]
    with torch.no_grad():
        q(x)
        fp(x)
    for h in handles:
        h.remove()

    got = {}

    def on_unit(name, q_args, fp_out):
        got[name] = (q_args[0].clone(), fp_out.clone())

    walk_units(trace_units(q, units), units, fp, q, x, on_unit, chunk=7)
    assert list(got) == units
    for u in units:
        assert torch.allclose(got[u][0], seen_q_in[u][0], atol=1e-5), u
        assert torch.allclose(got[u][1], seen_fp_out[u][1], atol=1e-5), u
        assert not torch.allclose(seen_q_in[u][1], seen_fp_out[u][1]), "float and 4-bit differ"
