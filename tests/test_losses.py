"""Loss plug-ins: entropy-aware bin regularization and knowledge distillation."""

import math

import pytest
import torch
from torch import nn

from lowbit import ConfigError, QuantConfig, calibrate, prepare
from lowbit.losses import (
    EntropyBinRegularizer,
    KnowledgeDistillation,
    as_hook,
    bin_entropy,
    kd_loss,
    within_bin,
)
from lowbit.prepare import quant_layers


def toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                         nn.Flatten(), nn.Linear(144, 3)).eval()


def prepared(w_bits=3):
    x = torch.randn(16, 1, 8, 8)
    q = prepare(toy(), QuantConfig.uniform(w_bits, 8, kind="lsq", first_last="same"), x[:2])
    return calibrate(q, [x], progress=False), x


def test_within_bin_is_zero_exactly_on_bin_centres():
    v = torch.tensor([-3.0, -3.0, -1.0, 0.0, 0.0, 2.0, 3.0, 3.0])
    assert within_bin(v, -3, 3).item() == 0.0
    for i in range(len(v)):
        moved = v.clone()
        moved[i] += 0.01
        assert within_bin(moved, -3, 3).item() > 0.0
    clipped = torch.tensor([0.0, 5.0])  # outside the range: its bin is the end code, off centre
    assert within_bin(clipped, -3, 3).item() > 0.0


def test_within_bin_on_a_model_with_weights_on_their_centres():
    qmodel, _ = prepared()
    ebr = EntropyBinRegularizer(weight=1.0, entropy_weight=0.0)
    with torch.no_grad():
        for _, layer in quant_layers(qmodel):
            wq = layer.weight_quant
            wq.scale.fill_(2.0**-4)  # power-of-two steps: w / s is exact in floating point
            codes = torch.randint(-3, 4, layer.weight.shape).float()
            layer.weight.copy_(codes * 2.0**-4)
    assert all(ebr.layer_terms(layer)[0].item() == 0.0 for _, layer in quant_layers(qmodel))
    assert ebr(qmodel).item() == 0.0
    layer = next(iter(quant_layers(qmodel)))[1]
    with torch.no_grad():
        layer.weight.view(-1)[0] += 0.01
    assert ebr(qmodel).item() > 0.0


def test_entropy_is_largest_when_bins_are_used_evenly():
    qmin, qmax = -2, 1
    k = qmax - qmin + 1
    even = torch.arange(qmin, qmax + 1).float().repeat(25)
    h_even = bin_entropy(even, qmin, qmax, tau=0.05).item()
    assert h_even == pytest.approx(math.log(k), abs=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        counts = torch.multinomial(torch.rand(k, generator=g), 100, replacement=True,
                                   generator=g).bincount(minlength=k)
        if (counts == 25).all():
            continue
        uneven = torch.repeat_interleave(torch.arange(qmin, qmax + 1).float(), counts)
        assert bin_entropy(uneven, qmin, qmax, tau=0.05).item() < h_even
    one_bin = torch.zeros(100)
    assert bin_entropy(one_bin, qmin, qmax, tau=0.05).item() == pytest.approx(0.0, abs=1e-3)


def test_ebr_gradient_pulls_weights_to_centres():
    qmodel, x = prepared()
    ebr = EntropyBinRegularizer(weight=1.0, entropy_weight=0.1)
    weights = [layer.weight for _, layer in quant_layers(qmodel)]
    before = sum(ebr.layer_terms(m)[0].item() for _, m in quant_layers(qmodel))
    opt = torch.optim.Adam(weights, lr=3e-3)
    for _ in range(40):
        loss = ebr(qmodel, x, None, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sum(ebr.layer_terms(m)[0].item() for _, m in quant_layers(qmodel))
    assert after < 0.5 * before


def test_ebr_stays_bounded_for_a_channel_with_a_tiny_step():
    """Folded BatchNorms leave channels with steps near 1e-7; EBR must not explode on them."""
    qmodel, x = prepared()
    layer = next(iter(quant_layers(qmodel)))[1]
    with torch.no_grad():
        layer.weight_quant.scale[0] = 1e-7
        layer.weight[0].fill_(1e-3)  # ten thousand steps away from its clipped code
    ebr = EntropyBinRegularizer(weight=1.0)
    loss = ebr(qmodel, x, None, None)
    loss.backward()
    assert loss.item() < 10
    step = layer.weight_quant.scale.detach().mean()
    assert layer.weight.grad.abs().max().item() < 10 / step.item()


def test_ebr_needs_quantized_weights_and_valid_options():
    with pytest.raises(ConfigError, match="no quantized weights"):
        EntropyBinRegularizer()(toy())
    with pytest.raises(ConfigError, match="tau"):
        EntropyBinRegularizer(tau=0)


def test_kd_loss_values_and_gradients():
    teacher = toy()
    student = toy()
    x = torch.randn(8, 1, 8, 8)
    kd = KnowledgeDistillation(teacher, temperature=4.0, weight=0.5)
    assert kd(student, x, teacher(x).detach(), None).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        student[-1].bias.add_(1.0 + torch.arange(3.0))
    out = student(x)
    loss = kd(student, x, out, None)
    assert loss.item() > 0
    loss.backward()
    assert student[-1].bias.grad is not None
    assert all(p.grad is None and p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("teacher") for k in kd.state_dict())
    manual = nn.functional.kl_div(torch.log_softmax(out / 4, 1), torch.softmax(teacher(x) / 4, 1),
                                  reduction="batchmean") * 16 * 0.5
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_kd_teacher_with_other_classes_is_a_clear_error():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    kd = KnowledgeDistillation(teacher)
    with pytest.raises(ConfigError, match="same classes"):
        kd.check(toy(), torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="same classes"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 5), 2.0)
    with pytest.raises(ConfigError, match="temperature"):
        KnowledgeDistillation(teacher, temperature=0)


def test_loss_terms_plug_into_the_qat_trainer_hooks():
    hooks = pytest.importorskip("lowbit.qat.hooks")
    qmodel, x = prepared()
    hook = as_hook(EntropyBinRegularizer(weight=1.0))
    assert isinstance(hook, hooks.TrainHook) and hook.name == "ebr"
    out = qmodel(x)
    ctx = hooks.StepContext(model=qmodel, inputs=x, targets=torch.zeros(16, dtype=torch.long),
                            outputs=out, loss=out.sum(), epoch=0, step=0)
    assert torch.equal(hook.extra_loss(ctx), EntropyBinRegularizer(weight=1.0)(qmodel))
