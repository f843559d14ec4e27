"""Super-resolution: metrics against hand-computed values, the data bookkeeping, bad inputs,
the task dispatch and a quantized EDSR through the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.data.sr import SRDataset, augment_pair, bicubic_down, crop_to_scale, scan_images
from lowbit.errors import ConfigError, DataError
from lowbit.models import ModelSpec, get_model, registry
from lowbit.models.edsr import EDSR
from lowbit.ptq.blocks import find_units
from lowbit.tasks.image_metrics import psnr, rgb_to_y, shave, ssim, to_pixels
from lowbit.tasks.super_resolution import evaluate_sr


def _photo(h: int, w: int, seed: int = 0) -> Image.Image:
    """A smooth random colour image (upsampled noise), so SR has something learnable."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, max(2, h // 4), max(2, w // 4), generator=g)
    img = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    arr = (img * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(arr.numpy(), "RGB")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "hr"
    d.mkdir()
    for i, (h, w) in enumerate([(34, 41), (40, 40), (37, 52)] + [(24, 30)] * 5):
        _photo(h, w, i).save(d / f"img{i}.png")
    return d


def test_y_channel_matches_bt601() -> None:
    rgb = torch.tensor([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]],
                       dtype=torch.float64).T.reshape(1, 3, 5, 1)
    y = rgb_to_y(rgb).flatten().tolist()
    assert y == pytest.approx([16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966])


def test_psnr_and_ssim_hand_computed() -> None:
    a = torch.zeros(1, 1, 4, 4)
    b = a.clone()
    b[0, 0, 1, 2] = 10.0
    assert float(psnr(a, b)) == pytest.approx(10 * math.log10(255**2 / (100 / 16)))
    assert math.isinf(float(psnr(a, a)))
    # constant images: variances and covariance vanish, SSIM is (2ab + C1) / (a^2 + b^2 + C1)
    x, y = torch.full((1, 1, 13, 13), 100.0), torch.full((1, 1, 13, 13), 110.0)
    c1 = (0.01 * 255) ** 2
    assert float(ssim(x, y)) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1))
    noisy = x + torch.randn_like(x) * 5
    assert float(ssim(noisy, noisy)) == pytest.approx(1.0)
    assert float(ssim(noisy, x)) < 0.99


def test_border_crop_and_scale_crop() -> None:
    t = torch.arange(36.0).view(1, 1, 6, 6)
    assert torch.equal(shave(t, 2), t[..., 2:4, 2:4])
    assert crop_to_scale(Image.new("RGB", (7, 5)), 2).size == (6, 4)
    assert crop_to_scale(Image.new("RGB", (7, 5)), 3).size == (6, 3)
    assert to_pixels(torch.tensor([-3.0, 12.4, 300.0]), torch.tensor(0.0),
                     torch.tensor(1.0)).tolist() == [0.0, 12.0, 255.0]


def test_eval_items_are_whole_images_cut_to_the_scale(folder) -> None:
    ds = SRDataset(scan_images(folder), 3)
    lr, hr = ds[0]  # 34 x 41 -> 33 x 39
    assert hr.shape == (3, 33, 39) and lr.shape == (3, 11, 13)
    want = bicubic_down(crop_to_scale(Image.open(folder / "img0.png"), 3), 3)
    assert torch.equal(lr, torch.from_numpy(np.array(want)).permute(2, 0, 1).float())


def test_patches_are_aligned_crops_of_the_pair(folder) -> None:
    whole = SRDataset(scan_images(folder), 2)
    patches = SRDataset(scan_images(folder), 2, patch=16, seed=3)
    lr_full, hr_full = whole[1]
    lr, hr = patches[1]
    assert lr.shape == (3, 8, 8) and hr.shape == (3, 16, 16)
    windows = lr_full.unfold(1, 8, 1).unfold(2, 8, 1)  # [3, rows, cols, 8, 8]
    hits = (windows == lr[:, None, None]).flatten(3).all(3).all(0).nonzero()
    assert len(hits) >= 1
    top, left = hits[0].tolist()
    assert torch.equal(hr, hr_full[:, 2 * top:2 * top + 16, 2 * left:2 * left + 16])
    assert torch.equal(patches[1][0], lr)  # seeded: the same patch every time


def test_augmentation_is_the_same_on_both_images() -> None:
    hr = torch.rand(3, 8, 8)
    lr = F.avg_pool2d(hr[None], 2)[0]
    outs = set()
    for code in range(8):
        a, b = augment_pair(lr, hr, code)
        assert torch.allclose(F.avg_pool2d(b[None], 2)[0], a)
        outs.add(tuple(b.flatten().tolist()))
    assert len(outs) == 8


def test_bad_images(tmp_path, folder) -> None:
    with pytest.raises(DataError, match="smaller than the 48 px"):
        SRDataset(scan_images(folder), 2, patch=48)
    with pytest.raises(DataError, match="multiple of the scale"):
        SRDataset(scan_images(folder), 2, patch=15)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no images"):
        scan_images(empty)
    Image.new("RGBA", (20, 20)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match="alpha channel"):
        SRDataset([tmp_path / "a.png"], 2)
    Image.new("L", (20, 20), 77).save(tmp_path / "g.png")
    with pytest.warns(lowbit.errors.LowbitWarning, match="converted to RGB"):
        ds = SRDataset([tmp_path / "g.png"], 2)
    assert ds[0][1].shape == (3, 20, 20) and float(ds[0][1].max()) == 77.0


class Bicubic(nn.Module):
    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)


def test_evaluate_sr_bookkeeping(folder) -> None:
    data = torch.utils.data.DataLoader(SRDataset(scan_images(folder), 2), batch_size=1)
    res = lowbit.evaluate(Bicubic(2), data, Bicubic(2), task="super_resolution", progress=False)
    assert res.samples == 8 and res.scale == 2
    assert res.psnr_y == pytest.approx(res.bicubic_psnr_y)
    assert res.ssim == pytest.approx(res.reference_ssim)
    assert math.isinf(res.psnr_vs_reference)
    assert 15 < res.psnr_y < 60 and 0 < res.ssim <= 1
    with pytest.raises(DataError, match="x3"):
        evaluate_sr(Bicubic(3), data, progress=False)
    labels = [(torch.zeros(1, 3, 8, 8), torch.tensor([1]))]
    with pytest.raises(DataError, match="class labels"):
        evaluate_sr(Bicubic(2), labels, progress=False)
    with pytest.raises(DataError, match="another task"):
        lowbit.evaluate(Bicubic(2), data, progress=False)


def test_edsr_checkpoint_keys_and_shapes() -> None:
    keys = set(get_model("edsr_baseline_x4").state_dict())
    for k in ["sub_mean.weight", "sub_mean.bias", "head.0.weight", "body.0.body.0.weight",
              "body.15.body.2.bias", "body.16.weight", "tail.0.0.weight", "tail.0.2.weight",
              "tail.1.weight", "add_mean.bias"]:
        assert k in keys
    for s in (2, 3):
        assert EDSR(s, 1, 4)(torch.rand(1, 3, 5, 7)).shape == (1, 3, 5 * s, 7 * s)
    assert get_model("edsr_baseline_x2").state_dict()["tail.0.0.weight"].shape == (256, 64, 3, 3)


def test_residual_blocks_are_reconstruction_units() -> None:
    q = lowbit.prepare(EDSR(2, 3, 8), lowbit.QuantConfig.uniform(4, 4), torch.rand(1, 3, 8, 8))
    units = find_units(q)
    assert units[1:4] == ["body.0", "body.1", "body.2"]
    assert "head.0" in units and "tail.1" in units


def test_trainer_trains_a_float_model_with_an_image_loss() -> None:
    from lowbit.qat.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    lr = torch.rand(16, 3, 4, 4) * 255
    hr = F.interpolate(lr, scale_factor=2, mode="nearest")
    data = torch.utils.data.DataLoader(list(zip(lr, hr, strict=True)), batch_size=4)
    model = EDSR(2, 1, 8)
    cfg = TrainConfig(epochs=4, optimizer="adam", lr=1e-2, weight_decay=0.0, logger="none",
                      progress=False, channels_last=False)
    l1 = lambda o, t: (o - t).abs().mean()  # noqa: E731
    with pytest.raises(ConfigError, match="no quantizers"):
        Trainer(model, data, cfg, criterion=l1)
    rows = Trainer(model, data, cfg, criterion=l1, float_ok=True).fit()
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]


@pytest.fixture
def tiny_sr(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_model(ModelSpec(
        name="edsr_test_x2", builder=lambda: EDSR(2, 2, 8), num_classes=0,
        input_size=(3, 8, 8), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        default_dataset="sr-folder", task="super_resolution", scale=2))
    return "edsr_test_x2"


def test_task_and_dataset_mismatch_exit_2(tiny_sr, folder, capsys) -> None:
    assert main(["eval", "-m", tiny_sr, "--random-init", "-d", "cifar10", "--no-progress"]) == 2
    assert "cifar10 is a classification dataset" in capsys.readouterr().err
    assert main(["eval", "-m", "resnet20", "--random-init", "-d", "sr-folder",
                 "--data-root", str(folder), "--no-progress"]) == 2
    assert "super-resolution dataset but resnet20" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["mse", "brecq"])
def test_quantized_sr_model_round_trips_through_the_cli(tiny_sr, folder, tmp_path, method):
    save, out, out2 = tmp_path / "q", tmp_path / "ptq.json", tmp_path / "eval.json"
    common = ["-m", tiny_sr, "-d", "sr-folder", "--data-root", str(folder), "--no-progress",
              "--eval-size", "2"]
    extra = ["--iters", "2"] if method == "brecq" else []
    assert main(["ptq", *common, "--random-init", "--method", method, *extra, "--w-bits", "4",
                 "--a-bits", "4", "--calib-size", "8", "--batch-size", "8", "--save", str(save),
                 "-o", str(out)]) == 0
    res = json.loads(out.read_text())
    q, f = res["quantized"], res["float"]
    assert q["reference_psnr_y"] == pytest.approx(f["psnr_y"])
    assert 0 < q["psnr_vs_reference"] < 100 and 0 < q["ssim"] <= 1
    assert res["protocol_info"]["calibration"]["patch"] == 16
    assert main(["eval", *common, "--random-init", "--quantized", str(save), "-o", str(out2)]) == 0
    assert json.loads(out2.read_text())["psnr_y"] == pytest.approx(q["psnr_y"])


@torch.no_grad()
def test_builtin_weights_ship_small_and_load() -> None:
    from lowbit.models.registry import get_spec

    path = get_spec("edsr_small_x2").weight_sources["builtin"]()
    assert path.stat().st_size < 1_000_000
    model = get_model("edsr_small_x2", weights="builtin")
    lr = torch.rand(1, 3, 12, 12) * 255
    assert model(lr).shape == (1, 3, 24, 24)
    # trained: on a smooth image it beats a random EDSR by far
    hr = F.interpolate(torch.rand(1, 3, 6, 6) * 255, size=(48, 48), mode="bicubic",
                       align_corners=False).clamp(0, 255)
    lr = F.avg_pool2d(hr, 2)
    err = lambda m: float((m(lr) - hr).abs().mean())  # noqa: E731
    assert err(model) < 0.5 * err(EDSR(2, 8, 32))


@given(st.floats(0.5, 40.0), st.integers(0, 3))
def test_psnr_of_a_constant_offset(offset: float, border: int) -> None:
    a = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 200
    b = a + offset
    ya, yb = shave(rgb_to_y(a), border), shave(rgb_to_y(b), border)
    dy = offset * (65.481 + 128.553 + 24.966) / 255  # Y is linear in RGB
    assert psnr(ya, yb).tolist() == pytest.approx([10 * math.log10(255**2 / dy**2)] * 2)
