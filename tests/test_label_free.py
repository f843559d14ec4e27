"""Label-free QAT: the KD loss reads no targets, it pulls the quantized model toward the float
model's predictions, unlabeled image folders (nested or flat) feed it, and bad inputs (an empty
folder, a file that is no image, cross-entropy on unlabeled images) stop with a message."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowbit.cli import main
from lowbit.data import UNLABELED, UnlabeledImageFolder, is_labeled, load_dataset
from lowbit.errors import ConfigError, DataError
from lowbit.losses import KnowledgeDistillation, as_hook
from lowbit.prepare import calibrate, prepare
from lowbit.qat import TrainConfig, Trainer, method_config

CFG = dict(epochs=2, lr=0.02, quant_lr=0.02, progress=False, log_every=4, channels_last=False,
           loss="kd")


def inputs(n=128, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def net():
    """A random float teacher whose top-1 spreads over its 4 classes (scaled, centred logits)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()
    with torch.no_grad():
        model[-1].weight.mul_(8)
        model[-1].bias.sub_(model(inputs(512, seed=3)).mean(0))
    return model


def loader(targets):
    return DataLoader(TensorDataset(inputs(), targets), batch_size=16, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def quantized(teacher, bits=2):
    q = prepare(teacher, method_config("qil", bits, bits, first_last="same"), inputs(8))
    calibrate(q, [inputs(32)], progress=False)
    return q


def train(teacher, targets, **cfg):
    q = quantized(teacher)
    hook = as_hook(KnowledgeDistillation(teacher))
    history = Trainer(q, loader(targets), TrainConfig(**{**CFG, **cfg}), hooks=[hook]).fit()
    return q, history


def agreement(model, reference, x):
    with torch.no_grad():
        return (model(x).argmax(1) == reference(x).argmax(1)).float().mean().item()


def test_kd_loss_reads_no_labels():
    teacher = net()
    with torch.no_grad():
        right = teacher(inputs()).argmax(1)
    garbage = torch.randint(0, 4, (128,), generator=torch.Generator().manual_seed(5))
    a, hist_a = train(teacher, right)
    b, _ = train(teacher, garbage)
    c, hist_c = train(teacher, torch.full((128,), UNLABELED))
    for other in (b, c):
        for (k, va), vb in zip(a.state_dict().items(), other.state_dict().values(), strict=True):
            assert torch.equal(va, vb), k
    assert hist_a[-1]["task_loss"] == 0.0 and hist_a[-1]["loss"] == hist_a[-1]["loss_kd"] > 0
    assert hist_a[-1]["train_acc"] > 0 and "train_acc" not in hist_c[-1]  # no labels: no accuracy


def test_label_free_training_moves_predictions_toward_the_float_model():
    teacher, held_out = net(), inputs(256, seed=9)
    before = quantized(teacher)
    after, _ = train(teacher, torch.full((128,), UNLABELED), epochs=6)

    def kl(model):
        with torch.no_grad():
            return KnowledgeDistillation(teacher)(model, held_out, model(held_out)).item()

    assert agreement(after, teacher, held_out) > agreement(before, teacher, held_out) + 0.1
    assert kl(after) < 0.3 * kl(before)


def test_trainer_refuses_a_loss_it_cannot_compute():
    teacher = net()
    unlabeled = UnlabeledImageFolder([], [0.0], [1.0], resize=8, crop=8, channels=1)
    with pytest.raises(ConfigError, match="no labels.*--loss kd"):
        Trainer(quantized(teacher), DataLoader(unlabeled), TrainConfig(progress=False)).fit()
    with pytest.raises(ConfigError, match="no KD hook"):
        Trainer(quantized(teacher), loader(torch.zeros(128, dtype=torch.long)),
                TrainConfig(**CFG)).fit()
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(loss="kd", label_smoothing=0.1)


def write_images(folder, n=6, seed=0, sizes=((40, 30), (24, 48), (32, 32))):
    """PNG and JPEG files of several sizes, flat and in nested folders without class meaning."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = folder / ("" if i % 3 == 0 else f"a/b{i % 2}")
        sub.mkdir(parents=True, exist_ok=True)
        w, h = sizes[i % len(sizes)]
        path = sub / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return sorted(paths)


def test_unlabeled_folder_any_layout_resized_and_normalised(tmp_path):
    paths = write_images(tmp_path)
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / ".hidden" / "skip.png")
    (tmp_path / "notes.txt").write_text("not an image")
    mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
    ds = load_dataset("images", tmp_path, "train", mean=mean, std=std, crop=16)
    assert not is_labeled("images") and is_labeled("cifar10") and not ds.labeled
    assert ds.paths == paths and len(ds) == 6
    x, y = ds[1]
    assert y == UNLABELED and x.shape == (3, 16, 16)
    with Image.open(paths[1]) as im:  # 24x48: short side to 16, then the centre 16x16
        ref = np.asarray(im.convert("RGB").resize((16, 32), Image.BILINEAR).crop((0, 8, 16, 24)))
    expect = (torch.from_numpy(ref.copy()).permute(2, 0, 1).float()
              - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(x, expect)
    grey = load_dataset("images", tmp_path, mean=[0.0], std=[255.0], resize=20, crop=12)
    assert grey[0][0].shape == (1, 12, 12) and 0 <= grey[0][0].min() <= grey[0][0].max() <= 1


def test_bad_image_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset("images", tmp_path / "missing", crop=8)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images .* found in"):
        load_dataset("images", tmp_path, crop=8)
    write_images(tmp_path, n=2)
    (tmp_path / "sub" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="1 of 3 files .* not readable images.*broken.png"):
        load_dataset("images", tmp_path, crop=8)


QAT = ["qat", "-m", "digits_cnn", "--random-init", "--w-bits", "4", "--a-bits", "4",
       "--epochs", "1", "--max-steps", "3", "--batch-size", "4", "--calib-size", "4",
       "--eval-size", "64", "--no-progress", "--no-eval-float"]


def test_cli_label_free_end_to_end(tmp_path):
    images = tmp_path / "photos"
    write_images(images, n=10)
    out = tmp_path / "run"
    assert main([*QAT, "--loss", "kd", "--train-root", str(images), "--augment", "crop-flip",
                 "-o", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["training_data"] == {"dataset": "images", "root": str(images), "images": 10,
                                    "labels_read": False}
    assert "calibration images/train" in res["protocol"] and "4 seeded (seed 0) of 10" in (
        res["protocol"])
    row = res["history"][-1]
    assert row["task_loss"] == 0.0 and row["loss_kd"] > 0 and "train_acc" not in row
    assert res["recipe"]["train"]["loss"] == "kd" and res["recipe"]["kd_teacher"] is None
    assert (out / "model" / "config.yaml").is_file()
    # calibration from another folder of images
    other = tmp_path / "calib"
    write_images(other, n=3, seed=1)
    out2 = tmp_path / "run2"
    assert main([*QAT, "--loss", "kd", "--train-root", str(images), "--calib-root", str(other),
                 "--calib-dataset", "images", "-o", str(out2)]) == 0
    protocol = json.loads((out2 / "results.json").read_text())["protocol"]
    assert f"images/train at {other}: all 3 images" in protocol


@pytest.mark.parametrize("setup, flags, match", [
    ("empty", ["--loss", "kd"], "no images"),
    ("broken", ["--loss", "kd"], "not readable images"),
    ("photos", [], "no labels.*--loss kd"),
    ("photos", ["--loss", "ce"], "no labels.*--loss kd"),
    ("photos", ["--loss", "kd", "--label-smoothing", "0.1"], "label_smoothing"),
])
def test_cli_bad_label_free_inputs_exit_2(tmp_path, capsys, setup, flags, match):
    folder = tmp_path / "data"
    folder.mkdir()
    if setup != "empty":
        write_images(folder, n=3)
    if setup == "broken":
        (folder / "x.jpg").write_bytes(b"\x00" * 20)
    assert main([*QAT, "--train-root", str(folder), *flags, "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "error" in err
    assert pytest.importorskip("re").search(match, err.replace("\n", " "))


def test_unlabeled_images_cannot_be_the_evaluation_set(tmp_path, capsys):
    write_images(tmp_path, n=3)
    assert main(["eval", "-m", "digits_cnn", "--random-init", "-d", "images",
                 "--data-root", str(tmp_path), "--no-progress"]) == 2
    assert "no labels, so it cannot be evaluated" in capsys.readouterr().err


def test_resume_refuses_another_loss_and_old_checkpoints_still_match(tmp_path):
    from lowbit.errors import TrainingError

    assert "loss" not in TrainConfig().identity()  # as in checkpoints from before the option
    assert TrainConfig(loss="kd").identity()["loss"] == "kd"
    teacher = net()
    targets = torch.zeros(128, dtype=torch.long)
    Trainer(quantized(teacher), loader(targets), TrainConfig(**{**CFG, "epochs": 1}),
            hooks=[as_hook(KnowledgeDistillation(teacher))], output_dir=tmp_path).fit()
    with pytest.raises(TrainingError, match="train.loss"):
        Trainer(quantized(teacher), loader(targets),
                TrainConfig(**{**CFG, "epochs": 1, "loss": "ce"}),
                output_dir=tmp_path).fit(resume=True)


def test_loss_kd_flags_parse_into_the_recipe():
    from lowbit.cli import build_parser
    from lowbit.losses import SAME_TEACHER
    from lowbit.qat.cli import build_recipe

    def recipe(*flags):
        return build_recipe(build_parser().parse_args(["qat", "-m", "digits_cnn", *flags]))

    r = recipe("--loss", "kd", "--train-dataset", "images", "--calib-dataset", "images")
    assert r.train.loss == "kd" and r.kd and (r.train_dataset, r.calib_dataset) == ("images",) * 2
    spec = r.kd_spec()
    assert (spec.teacher, spec.weight, spec.temperature) == (SAME_TEACHER, 1.0, 1.0)
    assert recipe("--loss", "kd", "--teacher", "resnet20").kd_spec().teacher == "resnet20"
    assert not recipe().kd and recipe().train.loss == "ce"
