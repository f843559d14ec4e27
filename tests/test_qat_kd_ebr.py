"""SDQ retraining through ``lowbit qat``: --config/--ebr/--kd-* flags, the shared KD/EBR loss
terms, a teacher with other classes refused before training, self-distillation that keeps the
student trainable, and the search -> qat flow end to end on the digits CNN."""

import dataclasses
import functools
import json
import math
from argparse import Namespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowbit.cli import build_parser, main
from lowbit.errors import ConfigError
from lowbit.losses import (
    EntropyBinRegularizer,
    KnowledgeDistillation,
    as_hook,
    build_loss_terms,
    load_teacher,
)
from lowbit.models import registry
from lowbit.models.small import digits_cnn
from lowbit.qat import TrainConfig, load_recipe, qat
from lowbit.qat.cli import build_recipe

FAST = ["--epochs", "1", "--batch-size", "32", "--calib-size", "64", "--eval-size", "64",
        "--no-progress", "--no-eval-float"]


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    """A mixed-precision LSQ config written by ``lowbit search`` on the digits CNN."""
    out = tmp_path_factory.mktemp("found")
    rc = main(["search", "-m", "digits_cnn", "--budget", "3.5", "--a-bits", "8", "--steps", "20",
               "--check-every", "10", "--train-size", "128", "--batch-size", "64",
               "--calib-batches", "1", "--no-plot", "--no-progress", "-o", str(out)])
    assert rc == 0
    return out / "config.yaml"


def recipe_of(*flags):
    return build_recipe(build_parser().parse_args(["qat", "-m", "digits_cnn", *flags]))


def test_flags_parse_into_the_recipe(found):
    r = recipe_of("--config", str(found), "--ebr", "--kd-teacher", "digits_cnn",
                  "--kd-teacher-weights", "t.pt", "--kd-weight", "0.5", "--kd-temperature", "2")
    assert r.quant_config == str(found) and r.method == "lsq"  # method from the config's kind
    assert (r.ebr, r.kd_teacher, r.kd_teacher_weights) == (1e-2, "digits_cnn", "t.pt")
    assert (r.kd_weight, r.kd_temperature, r.kd) == (0.5, 2.0, True)
    r = recipe_of("--ebr", "0.3", "--ebr-entropy", "0.2", "--distill", "2")
    assert (r.ebr, r.ebr_entropy_weight, r.kd_weight, r.kd_teacher) == (0.3, 0.2, 2.0, None)
    r = recipe_of()
    assert r.ebr is None and not r.kd and r.method == "qil"
    with pytest.raises(ConfigError, match="kd_weight"):
        recipe_of("--kd-weight", "0")
    with pytest.raises(ConfigError, match="kd_temperature"):
        recipe_of("--kd-weight", "1", "--kd-temperature", "-1")
    with pytest.raises(ConfigError, match="kd_teacher_weights needs"):
        recipe_of("--kd-teacher-weights", "t.pt")


def test_deprecated_distill_field_is_kd_weight(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: digits_cnn\nstages: [{w_bits: 4, a_bits: 4}]\ndistill: 0.7\n")
    with pytest.warns(DeprecationWarning, match="kd_weight"):
        r = load_recipe(p)
    assert r.kd_weight == 0.7 and r.kd_teacher is None and "distill" not in r.model_dump()


def test_teacher_with_other_classes_fails_before_training(tmp_path, monkeypatch, capsys):
    spec = dataclasses.replace(registry.get_spec("digits_cnn"), name="digits_cnn5",
                               builder=functools.partial(digits_cnn, 5), num_classes=5)
    monkeypatch.setitem(registry._REGISTRY, "digits_cnn5", spec)

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr("lowbit.qat.recipes.qat", no_training)
    rc = main(["qat", "-m", "digits_cnn", "--kd-teacher", "digits_cnn5", "--max-steps", "1",
               "-o", str(tmp_path), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "5 output classes" in err and "student has 10" in err
    assert not (tmp_path / "checkpoint.pt").exists()


def toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def test_self_distillation_keeps_the_student_trainable():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    model = toy()
    before = model[0].weight.detach().clone()
    terms = build_loss_terms(model, x[:2], teacher=load_teacher(None, None, model))
    assert [type(t) for t in terms] == [KnowledgeDistillation]
    res = qat(model, "lsq", DataLoader(TensorDataset(x, y), batch_size=16), calib_data=[x],
              example_inputs=x[:2], hooks=[as_hook(t) for t in terms],
              train=TrainConfig(epochs=1, max_steps_per_epoch=1, lr=0.1, progress=False,
                                logger="none", channels_last=False))
    student = dict(res.model.named_parameters())["0.weight"]
    assert student.requires_grad and not torch.equal(student.detach(), before)
    assert all(p.requires_grad for p in model.parameters())  # the teacher is untouched too
    assert torch.equal(model[0].weight, before)
    assert {"loss_kd"} <= set(res.history[-1])


def test_search_sweep_builds_the_same_terms():
    from lowbit.search.cli import _loss_terms

    model, x = toy(), torch.randn(2, 1, 8, 8)
    args = Namespace(ebr=1e-2, ebr_entropy=0.1, kd_teacher=None, kd_teacher_weights=None,
                     kd_weight=0.5, kd_temperature=2.0)
    kd, ebr = _loss_terms(args, model, x)
    assert isinstance(ebr, EntropyBinRegularizer) and ebr.weight == 1e-2
    assert kd.__dict__["teacher"] is model and (kd.weight, kd.temperature) == (0.5, 2.0)


def test_search_then_qat_with_ebr_and_self_distillation(found, tmp_path):
    out = tmp_path / "run"
    rc = main(["qat", "-m", "digits_cnn", "--config", str(found), "--ebr", "--kd-weight", "1",
               "--max-steps", "2", "-o", str(out), *FAST])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    last = res["history"][-1]
    assert last["steps"] == 2 and 0 <= res["top1"] <= 100
    assert math.isfinite(last["loss_ebr"]) and last["loss_ebr"] > 0
    assert math.isfinite(last["loss_kd"])
    assert res["recipe"]["method"] == "lsq" and res["recipe"]["ebr"] == 1e-2
    assert (out / "model" / "config.yaml").is_file()


def test_qat_on_a_config_file_is_labelled_with_its_bits(tmp_path, capsys):
    cfg = tmp_path / "w2a4.yaml"
    cfg.write_text("weight: {kind: lsq, bits: 2, per_channel: true}\n"
                   "act: {kind: lsq, bits: 4}\n")
    out = tmp_path / "run"
    rc = main(["qat", "-m", "digits_cnn", "--config", str(cfg), "--max-steps", "2",
               "-o", str(out), *FAST])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [(s["w_bits"], s["a_bits"]) for s in res["recipe"]["stages"]] == [(2, 4)]
    assert res["history"][-1]["bits"] == "W2A4"
    rc = main(["qat", "-m", "digits_cnn", "--config", str(cfg), "--w-bits", "4",
               "-o", str(tmp_path / "run2"), *FAST])
    assert rc == 2
    assert "--config sets the bits; drop --w-bits" in capsys.readouterr().err
