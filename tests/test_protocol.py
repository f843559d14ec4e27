"""Calibration and evaluation from different folders, whole-folder evaluation, and the warning
when calibration images cover few of a classifier's classes."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.coverage import ClassCounter
from lowbit.data.imagefolder import imagenet_synsets
from lowbit.errors import NarrowCalibrationWarning
from lowbit.models import get_spec
from lowbit.pipeline import build_data


def image_folder(root, classes, per_class, seed=0):
    """``root/val/<synset>/*.png``: ``per_class`` small random images of each class index."""
    rng = np.random.default_rng(seed)
    for c in classes:
        d = root / "val" / imagenet_synsets()[c]
        d.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / f"img_{i}.png")
    return root


@pytest.fixture
def folders(tmp_path):
    evaluation = image_folder(tmp_path / "eval", [1, 5, 9, 400], 3, seed=1)  # 12 images
    calib = image_folder(tmp_path / "calib", [7], 5, seed=2)  # 5 images
    return evaluation, calib


def test_calibration_from_another_folder_evaluates_every_image(folders):
    evaluation, calib = folders
    data = build_data(get_spec("resnet20"), "imagenette", evaluation, calib_root=calib,
                      calib_size=4, batch_size=4)
    info = data.protocol_info
    assert info["calibration"]["images"] == 4 and info["calibration"]["of"] == 5
    assert info["calibration"]["root"].endswith("calib/val")
    assert info["evaluation"]["images"] == 12 == len(data.eval.dataset)
    labels = {int(y) for _, y in data.calib.dataset}
    assert labels == {7}  # nothing of the evaluation folder
    assert "calibration imagenette/val" in data.protocol and "all 12 images" in data.protocol


def test_asking_for_more_calibration_images_than_the_folder_has_uses_all_and_says_so(folders):
    evaluation, calib = folders
    data = build_data(get_spec("resnet20"), "imagenette", evaluation, calib_root=calib,
                      calib_size=1024, batch_size=4)
    assert data.protocol_info["calibration"]["images"] == 5
    assert "asked for 1024, the folder has 5" in data.protocol


def test_the_same_folder_for_both_is_split_never_shared(folders):
    evaluation, _ = folders
    data = build_data(get_spec("resnet20"), "imagenette", evaluation, calib_root=evaluation,
                      calib_size=4, batch_size=4)
    calib_idx = set(data.calib.dataset.indices)
    eval_idx = set(data.eval.dataset.indices)
    assert len(calib_idx) == 4 and len(eval_idx) == 8 and not calib_idx & eval_idx
    assert "split" in data.protocol


def test_evaluation_without_calibration_takes_the_whole_split(folders):
    evaluation, _ = folders
    data = build_data(get_spec("resnet20"), "imagenette", evaluation, calibration=False,
                      batch_size=5)
    assert data.calib is None and len(data.eval.dataset) == 12
    assert "calibration" not in data.protocol_info


def test_cli_eval_scores_every_image_and_ptq_records_both_folders(folders, tmp_path, capsys):
    evaluation, calib = folders
    out = tmp_path / "e.json"
    rc = main(["eval", "-m", "resnet20", "--random-init", "-d", "imagenette", "--data-root", str(evaluation),
               "--no-progress", "--batch-size", "5", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["samples"] == 12
    out = tmp_path / "p.json"
    with warnings.catch_warnings():
        warnings.simplefilter("always", NarrowCalibrationWarning)
        rc = main(["ptq", "-m", "resnet20", "--random-init", "-d", "imagenette", "--data-root", str(evaluation),
                   "--calib-root", str(calib), "--calib-size", "5", "--method", "minmax",
                   "--no-progress", "--batch-size", "5", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["protocol_info"]["calibration"]["images"] == 5
    assert res["protocol_info"]["evaluation"]["images"] == res["quantized"]["samples"] == 12
    assert res["calib_coverage"]["images"] == 5
    assert "lowbit: warning: the float model assigns the 5 calibration images" in err


def test_eval_has_no_calibration_options(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "-m", "digits_cnn", "--calib-size", "10"])
    assert "--calib-size" in capsys.readouterr().err


def test_class_counter_measures_effective_classes():
    counter = ClassCounter()
    logits = torch.zeros(100, 1000)
    logits[torch.arange(100), torch.arange(100) % 4] = 1.0  # four classes, equally often
    counter.update(logits[:50])
    counter.update(logits[50:])
    cov = counter.result()
    assert (cov.images, cov.classes, cov.predicted) == (100, 1000, 4)
    assert cov.effective == pytest.approx(4.0)
    assert cov.narrow and "to 4 of 1000 classes" in cov.message()
    diverse = torch.eye(1000)[:100]  # 100 images, 100 different classes
    counter = ClassCounter()
    counter.update(diverse)
    assert not counter.result().narrow


def test_counter_ignores_outputs_that_are_not_logits():
    counter = ClassCounter()
    counter.update(torch.zeros(4, 3, 8, 8))  # an image, e.g. super-resolution
    assert counter.result() is None


class Biased(nn.Module):
    """A classifier whose prediction is the sign of the first input pixel: two classes of ten."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.fc(h) + torch.cat([x[:, :1, 0, 0] * 100, -x[:, :1, 0, 0] * 100,
                                       torch.zeros(x.shape[0], 8)], 1)


def test_calibrate_warns_when_images_reach_few_classes_and_records_coverage():
    torch.manual_seed(0)
    model = Biased()
    x = torch.randn(64, 1, 6, 6)
    q = lowbit.prepare(model, lowbit.QuantConfig.uniform(8, 8), x[:2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NarrowCalibrationWarning)
        lowbit.calibrate(q, [x], progress=False)
    assert any(issubclass(w.category, NarrowCalibrationWarning)
               and "to 2 of 10 classes" in str(w.message) for w in caught)
    assert q.lowbit_report.calib_coverage.predicted == 2


def test_calibrate_is_quiet_when_images_reach_the_classes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 4))
    x = torch.randn(256, 1, 6, 6)
    q = lowbit.prepare(model, lowbit.QuantConfig.uniform(8, 8, first_last="same"), x[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", NarrowCalibrationWarning)
        lowbit.calibrate(q, [x], progress=False)
    assert q.lowbit_report.calib_coverage.effective > 2
