"""Training methods on super-resolution models: QAT (LSQ/QIL with L1/L2), the SDQ search and
DQSS, on a tiny EDSR and synthetic photos."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lowbit.cli import main
from lowbit.models import ModelSpec, registry
from lowbit.models.edsr import EDSR


def _photo(h: int, w: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, max(2, h // 4), max(2, w // 4), generator=g)
    img = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    arr = (img * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(arr.numpy(), "RGB")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "hr"
    d.mkdir()
    for i in range(8):
        _photo(24 + 2 * i, 28, i).save(d / f"img{i}.png")
    return d


@pytest.fixture
def tiny_sr(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_model(ModelSpec(
        name="edsr_test_x2", builder=lambda: EDSR(2, 2, 8), num_classes=0,
        input_size=(3, 8, 8), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        default_dataset="sr-folder", task="super_resolution", scale=2))
    return "edsr_test_x2"


def _qat(model, folder, out, *extra):
    return main(["qat", "-m", model, "--random-init", "-d", "sr-folder", "--data-root",
                 str(folder), "--no-progress", "--batch-size", "4", "--calib-size", "4",
                 "--eval-size", "2", "--max-steps", "2", "--optimizer", "adam", "--lr", "1e-3",
                 "-o", str(out), *extra])


@pytest.mark.parametrize("method,loss", [("lsq", None), ("qil", "l2")])
def test_qat_trains_an_sr_model_with_a_pixel_loss(tiny_sr, folder, tmp_path, method, loss):
    out = tmp_path / "run"
    extra = ["--loss", loss] if loss else []
    assert _qat(tiny_sr, folder, out, "--method", method, *extra) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["recipe"]["train"]["loss"] == (loss or "l1")  # l1: the SR task's default
    assert res["recipe"]["patch"] is None and res["training_data"]["dataset"] == "sr-folder"
    row = res["history"][-1]
    assert 0 < res["ssim"] <= 1 and res["psnr_y"] == row["psnr_y"]
    assert res["float_psnr_y"] > 0 and "top1" not in res and "train_acc" not in row
    # the loss is the pixel error of the output: random weights on 0..255 images give tens
    # of pixels of L1, and its square under L2
    assert row["task_loss"] > (300 if loss == "l2" else 5)
    assert (out / "model").is_dir()
    assert main(["eval", "-m", tiny_sr, "--random-init", "-d", "sr-folder", "--data-root",
                 str(folder), "--eval-size", "2", "--no-progress", "--quantized",
                 str(out / "model"), "-o", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["psnr_y"] == pytest.approx(
        res["psnr_y"])


def test_sr_qat_resumes_and_extends(tiny_sr, folder, tmp_path):
    out = tmp_path / "run"
    assert _qat(tiny_sr, folder, out, "--method", "lsq", "--patch", "12") == 0
    first = json.loads((out / "results.json").read_text())["history"]
    assert _qat(tiny_sr, folder, out, "--method", "lsq", "--patch", "12", "--epochs", "2",
                "--resume") == 0
    hist = json.loads((out / "results.json").read_text())["history"]
    assert [r["epoch"] for r in hist] == [1, 2] and hist[0] == first[0]
    # a changed loss is another run: refused on resume
    assert _qat(tiny_sr, folder, out, "--method", "lsq", "--patch", "12", "--epochs", "3",
                "--loss", "l2", "--resume") == 2


def test_losses_of_another_task_are_refused(tiny_sr, folder, tmp_path, capsys):
    assert _qat(tiny_sr, folder, tmp_path / "a", "--method", "lsq", "--loss", "ce") == 2
    assert "use --loss l1 or l2" in capsys.readouterr().err
    assert _qat(tiny_sr, folder, tmp_path / "b", "--method", "lsq", "--kd-weight", "1") == 2
    assert "distillation" in capsys.readouterr().err
    assert main(["qat", "-m", "resnet20", "--random-init", "--loss", "l1", "--no-progress",
                 "-o", str(tmp_path / "c")]) == 2
    assert "use --loss ce or kd" in capsys.readouterr().err
    assert _qat(tiny_sr, folder, tmp_path / "d", "--method", "lsq", "--patch", "13") == 2
    assert "multiple of the scale" in capsys.readouterr().err


def _search(model, folder, out, *extra):
    return main(["search", "-m", model, "--random-init", "-d", "sr-folder", "--data-root",
                 str(folder), "--no-progress", "--no-plot", "--batch-size", "4",
                 "--calib-batches", "1", "-o", str(out), *extra])


def test_sdq_search_on_an_sr_model_meets_its_budget_without_labels(tiny_sr, folder, tmp_path,
                                                                   capsys):
    from lowbit.config import QuantConfig

    out = tmp_path / "sdq"
    assert _search(tiny_sr, folder, out, "-b", "3", "--steps", "6", "--check-every", "2") == 0
    res = json.loads((out / "search.json").read_text())
    assert res["settings"]["loss"] == "l1"  # the SR task's loss, not the cross-entropy
    assert res["achieved"] <= 3.0 + 1e-9
    assert "--kd-weight" not in capsys.readouterr().out  # no logit distillation for SR
    # the found config retrains with QAT on the same model
    assert QuantConfig.load(out / "config.yaml").weight.kind == "lsq"
    assert _qat(tiny_sr, folder, tmp_path / "re", "--config", str(out / "config.yaml")) == 0
    assert _search(tiny_sr, folder, tmp_path / "bad", "-b", "3", "--loss", "ce") == 2
    assert _search(tiny_sr, folder, tmp_path / "sweep", "-b", "3", "-b", "4") == 2


def test_sdq_recipe_on_an_sr_model_reports_psnr(tiny_sr, folder, tmp_path, capsys):
    recipe = tmp_path / "sdq_sr.yaml"
    body = f"""
model: {tiny_sr}
dataset: sr-folder
budget: "3"
search: {{steps: 4, check_every: 2, calib_batches: 1, a_bits: 8, observer: minmax}}
ebr: {{weight: 0.01}}
train: {{epochs: 1, max_steps_per_epoch: 2, progress: false, logger: none, optimizer: adam,
         lr: 0.001}}
batch_size: 4
calib_size: 4
eval_size: 2
"""
    recipe.write_text(body + "kd: null\n")
    out = tmp_path / "run"
    args = ["search", "--recipe", str(recipe), "--random-init", "--data-root", str(folder),
            "-o", str(out), "--no-plot"]
    assert main(args) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["search"]["settings"]["loss"] == "l1" and res["recipe"]["train"]["loss"] == "l1"
    assert res["float_psnr_y"] > 0 and 0 < res["ssim"] <= 1 and "top1" not in res
    assert res["psnr_y"] == res["history"][-1]["psnr_y"]
    assert "PSNR-Y" in capsys.readouterr().out
    recipe.write_text(body)  # distillation on by default: compares class logits, refused
    args[-2] = str(tmp_path / "kd")
    assert main(args) == 2 and "distillation" in capsys.readouterr().err
    assert not (tmp_path / "kd").exists()


def test_dqss_ptq_and_qat_on_an_sr_model(tiny_sr, folder, tmp_path, capsys):
    out = tmp_path / "dqss"
    assert _search(tiny_sr, folder, out, "--method", "dqss", "--mode", "ptq", "--iters", "2",
                   "--finetune-iters", "1", "--eval-size", "2") == 0
    assert "searched model: PSNR-Y" in capsys.readouterr().out
    assert (out / "config.yaml").is_file()
    q = tmp_path / "q"
    assert _search(tiny_sr, folder, q, "--method", "dqss", "--mode", "qat", "--steps", "3",
                   "--check-every", "1", "--eval-size", "2") == 0
    assert "searched model: PSNR-Y" in capsys.readouterr().out
    assert json.loads((q / "search.json").read_text())["settings"]["loss"] == "l1"
    assert _search(tiny_sr, folder, tmp_path / "ce", "--method", "dqss", "--mode", "qat",
                   "--loss", "ce") == 2


@torch.no_grad()
def test_builtin_x4_weights_load_and_beat_an_untrained_net() -> None:
    from lowbit.models import get_model, get_spec

    assert get_spec("edsr_small_x4").weight_sources["builtin"]().stat().st_size < 1_000_000
    model = get_model("edsr_small_x4", weights="builtin")
    hr = F.interpolate(torch.rand(1, 3, 6, 6) * 255, size=(48, 48), mode="bicubic",
                       align_corners=False).clamp(0, 255)
    lr = F.avg_pool2d(hr, 4)
    assert model(lr).shape == hr.shape
    err = lambda m: float((m(lr) - hr).abs().mean())  # noqa: E731
    assert err(model) < 0.5 * err(EDSR(4, 8, 32))


def test_qat_with_the_pams_policy_keeps_the_edges_float(tiny_sr, folder, tmp_path):
    """Only the body's blocks quantized: the first/last layers are float, which the stage's
    bit setting must resolve exactly as prepare did."""
    cfg = tmp_path / "pams.yaml"
    cfg.write_text("weight: {kind: lsq, bits: 4}\nact: {kind: lsq, bits: 4}\n"
                   "first_layer: float\nlast_layer: float\n"
                   "layers:\n  - {match: 'tail.*', keep_float: true}\n"
                   "  - {match: 'body.2', keep_float: true}\n")
    out = tmp_path / "run"
    assert _qat(tiny_sr, folder, out, "--config", str(cfg)) == 0
    from safetensors.torch import load_file

    assert json.loads((out / "results.json").read_text())["recipe"]["method"] == "lsq"
    keys = load_file(out / "model" / "model.safetensors").keys()
    quantized = {k.split(".weight_quant")[0] for k in keys if ".weight_quant" in k}
    assert quantized == {f"body.{b}.body.{c}" for b in (0, 1) for c in (0, 2)}


def _python_qat(tiny_sr, folder, **kw):
    """``lowbit.qat.qat`` from Python on the tiny SR model, two steps, scored on two images."""
    from lowbit.data import make_loader
    from lowbit.models import get_model, get_spec
    from lowbit.pipeline import build_data
    from lowbit.qat import TrainConfig, qat
    from lowbit.tasks import get_task

    spec = get_spec(tiny_sr)
    data = build_data(spec, "sr-folder", folder, calib_size=4, eval_size=2, batch_size=4)
    train = make_loader(get_task(spec.task).train_set(spec, "sr-folder", folder), 4,
                        shuffle=True, seed=0)
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, max_steps_per_epoch=2, optimizer="adam", lr=1e-3, loss="l1",
                      progress=False, channels_last=False)
    return qat(get_model(tiny_sr), "lsq", train, calib_data=data.calib,
               example_inputs=data.example, train=cfg, eval_data=data.eval, **kw), data


def test_python_qat_scores_an_sr_model_by_its_task(tiny_sr, folder):
    """No classification default: the registered model's task, or the data's, picks PSNR/SSIM."""
    named, _ = _python_qat(tiny_sr, folder, model_name=tiny_sr)
    unnamed, _ = _python_qat(tiny_sr, folder)  # an unregistered model: the data's task
    for res in (named, unnamed):
        row = res.history[-1]
        assert "top1" not in row and row["psnr_y"] > 0 and 0 < row["ssim"] <= 1
    assert unnamed.history[-1]["psnr_y"] == pytest.approx(named.history[-1]["psnr_y"])


def test_python_qat_explicit_metrics_and_mismatches(tiny_sr, folder):
    from lowbit.errors import ConfigError, DataError

    res, data = _python_qat(tiny_sr, folder, task="super_resolution")
    assert res.history[-1]["psnr_y"] > 0
    res, _ = _python_qat(tiny_sr, folder, eval_fn=lambda m: {"calls": 1.0})
    assert res.history[-1]["calls"] == 1.0 and "psnr_y" not in res.history[-1]
    with pytest.raises(ConfigError, match="super-resolution model.*task='super_resolution'"):
        _python_qat(tiny_sr, folder, model_name=tiny_sr, task="classification")
    with pytest.raises(DataError, match="not classification data.*top1"):
        _python_qat(tiny_sr, folder, task="classification")
    with pytest.raises(ConfigError, match="eval_fn or task, not both"):
        _python_qat(tiny_sr, folder, task="super_resolution", eval_fn=lambda m: {})
