"""The shared QAT trainer: resume equals an uninterrupted run, bad runs stop with the last good
checkpoint kept, BN modes, quantizer-only training, progressive stages, DDP on gloo, the CLI."""

import os
import socket

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowbit.cli import main
from lowbit.errors import ConfigError, TrainingError
from lowbit.prepare import calibrate, prepare
from lowbit.qat import (
    Stage,
    TrainConfig,
    Trainer,
    TrainHook,
    apply_bits,
    load_checkpoint,
    lr_factor,
    method_config,
    parse_stages,
    qat,
)
from lowbit.qat.ddp import DistContext, quantizer_vector


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def dataset(n=96):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, 4:].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


def loader(seed=0, ds=None):
    return DataLoader(ds or dataset(), batch_size=16, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def prepared(method="qil", bn="fold", w=4, a=4):
    ds = dataset()
    q = prepare(net(), method_config(method, w, a, bn=bn), ds.tensors[0][:8])
    calibrate(q, [ds.tensors[0][:32]], progress=False)
    return q


CFG = dict(epochs=3, lr=0.05, progress=False, log_every=2, channels_last=False)
RUN = {"model": "toy", "method": "qil"}


class Interrupt(TrainHook):
    """Simulates a kill in the middle of ``epoch``."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_step_end(self, ctx):
        if ctx.epoch == self.epoch and ctx.step % 6 == 2:
            raise KeyboardInterrupt


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    full = prepared()
    Trainer(full, loader(), TrainConfig(**CFG), output_dir=tmp_path / "a", run_info=RUN).fit()
    part = prepared()
    with pytest.raises(KeyboardInterrupt):
        Trainer(part, loader(), TrainConfig(**CFG), output_dir=tmp_path / "b", run_info=RUN,
                hooks=[Interrupt(1)]).fit()
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1
    resumed = prepared()
    hist = Trainer(resumed, loader(), TrainConfig(**CFG), output_dir=tmp_path / "b",
                   run_info=RUN).fit(resume=True)
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "b" / "history.csv").read_text().count("\n") == 4


def test_resume_refuses_other_model_or_method(tmp_path):
    t = Trainer(prepared(), loader(), TrainConfig(**{**CFG, "epochs": 1}),
                output_dir=tmp_path, run_info=RUN)
    t.fit()
    with pytest.raises(TrainingError, match="method"):
        Trainer(prepared("lsq"), loader(), TrainConfig(**CFG), output_dir=tmp_path,
                run_info={"model": "toy", "method": "lsq"}).fit(resume=True)
    with pytest.raises(TrainingError, match="model"):
        Trainer(prepared(), loader(), TrainConfig(**CFG), output_dir=tmp_path,
                run_info={"model": "other", "method": "qil"}).fit(resume=True)
    with pytest.raises(TrainingError, match="lr"):
        Trainer(prepared(), loader(), TrainConfig(**{**CFG, "epochs": 1, "lr": 0.1}),
                output_dir=tmp_path, run_info=RUN).fit(resume=True)


class Poison(TrainHook):
    name = "poison"

    def __init__(self, epoch, what):
        self.epoch, self.what = epoch, what

    def extra_loss(self, ctx):
        if ctx.epoch == self.epoch and self.what == "nan":
            return torch.tensor(float("nan"))
        return None

    def on_step_end(self, ctx):
        if ctx.epoch == self.epoch and self.what == "collapse":
            with torch.no_grad():
                ctx.model[3].input_quant.d.fill_(-1.0)


@pytest.mark.parametrize("what,match", [("nan", "NaN"), ("collapse", "collapsed")])
def test_bad_run_stops_and_keeps_last_good_checkpoint(tmp_path, what, match):
    with pytest.raises(TrainingError, match=match) as err:
        Trainer(prepared(), loader(), TrainConfig(**CFG), output_dir=tmp_path, run_info=RUN,
                hooks=[Poison(1, what)]).fit()
    assert "last good checkpoint" in str(err.value)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_quantizer_only_training_freezes_weights():
    q = prepared()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    qv = quantizer_vector(q).clone()
    Trainer(q, loader(), TrainConfig(**{**CFG, "epochs": 1, "freeze_weights": True})).fit()
    assert torch.equal(before["0.weight"], q.state_dict()["0.weight"])
    assert torch.equal(before["8.bias"], q.state_dict()["8.bias"])
    assert not torch.equal(qv, quantizer_vector(q))


@pytest.mark.parametrize("bn", ["train", "freeze"])
def test_batchnorm_train_or_freeze(bn):
    q = prepared(bn=bn)
    assert isinstance(q[1], nn.BatchNorm2d)
    mean, weight = q[1].running_mean.clone(), q[1].weight.detach().clone()
    Trainer(q, loader(), TrainConfig(**{**CFG, "epochs": 1, "bn": bn})).fit()
    assert torch.equal(mean, q[1].running_mean) == (bn == "freeze")
    assert torch.equal(weight, q[1].weight) == (bn == "freeze")


def test_lr_schedules():
    cos = TrainConfig(schedule="cosine")
    assert lr_factor(cos, 0, 100) == 1.0 and abs(lr_factor(cos, 50, 100) - 0.5) < 1e-9
    step = TrainConfig(schedule="step", milestones=[0.5, 0.75], step_gamma=0.1)
    assert [round(lr_factor(step, s, 100), 6) for s in (0, 50, 80)] == [1.0, 0.1, 0.01]
    assert lr_factor(TrainConfig(warmup_steps=4), 1, 100) == 0.5


def test_separate_quantizer_learning_rate():
    from lowbit.qat import build_optimizer

    opt = build_optimizer(prepared(), TrainConfig(lr=0.1, quant_lr=0.01, quant_weight_decay=0.0))
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["quant"]["lr"] == 0.01 and groups["weights"]["lr"] == 0.1
    assert groups["other"]["weight_decay"] == 0.0


def test_progressive_stages_carry_parameters(tmp_path):
    ds = dataset()
    res = qat(net(), "qil", loader(), calib_data=[ds.tensors[0][:32]],
              example_inputs=ds.tensors[0][:8], stages="4/4,2/2",
              train=TrainConfig(**{**CFG, "epochs": 1}), output_dir=tmp_path, model_name="toy")
    assert [(r["stage"], r["bits"]) for r in res.history] == [(0, "W4A4"), (1, "W2A2")]
    assert res.model[3].w_bits == 2 and res.model[0].w_bits == 8 and res.model[8].a_bits == 8
    assert load_checkpoint(tmp_path / "checkpoint.pt")["stage"] == 1
    with pytest.raises(ConfigError, match="W/A"):
        parse_stages("4-4")


def test_lsq_bit_change_keeps_clipping_range():
    q = prepared("lsq")
    lsq = q[3].weight_quant
    top = lsq.scale.detach() * lsq.qrange[1]
    apply_bits(q, method_config("lsq", 2, 2))
    torch.testing.assert_close(lsq.scale.detach() * lsq.qrange[1], top)
    assert Stage(w_bits=3, a_bits=3).label == "W3A3"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.utils.data.distributed import DistributedSampler

        q = prepared()
        start = quantizer_vector(q).clone()
        ds = dataset()
        data = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, world, rank, seed=0))
        ctx = DistContext(rank, world, 0, torch.device("cpu"))
        Trainer(q, data, TrainConfig(**{**CFG, "epochs": 1, "max_steps_per_epoch": 3}),
                dist_ctx=ctx).fit()
        torch.save({"start": start, "end": quantizer_vector(q)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_keeps_quantizers_identical(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    assert torch.equal(r0["end"], r1["end"])
    assert not torch.equal(r0["start"], r0["end"])


def test_cli_qat_runs_and_resumes(tmp_path, capsys):
    args = ["qat", "--model", "digits_cnn", "--method", "qil", "--w-bits", "4", "--a-bits", "4",
            "--epochs", "1", "--max-steps", "3", "--batch-size", "32", "--calib-size", "64",
            "--eval-size", "64", "-o", str(tmp_path), "--no-progress", "--no-eval-float"]
    assert main(args) == 0
    assert (tmp_path / "results.json").is_file() and (tmp_path / "model" / "config.yaml").is_file()
    assert main(args + ["--resume"]) == 0
    assert main([*args[:4], "lsq", *args[5:], "--resume"]) == 2
    assert "belongs to method" in capsys.readouterr().err


def test_recipe_files_are_valid():
    from pathlib import Path

    from lowbit.qat import load_recipe

    folder = Path(__file__).resolve().parent.parent / "recipes"
    recipes = sorted(folder.glob("qil_*.yaml")) + sorted(folder.glob("lsq_*.yaml"))
    assert len(recipes) >= 8
    for path in recipes:
        r = load_recipe(path)
        assert r.stages and r.method in {"qil", "lsq"}


def test_bad_recipe_is_a_clear_error(tmp_path):
    from lowbit.qat import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text("model: resnet20\nmethod: qil\nstages: [{w_bits: 9}]\n")
    with pytest.raises(ConfigError, match="w_bits"):
        load_recipe(p)


def test_stage_can_unfreeze_weights():
    ds = dataset()
    stages = [Stage(w_bits=4, a_bits=4, freeze_weights=True), Stage(w_bits=4, a_bits=4)]
    res = qat(net(), "qil", loader(), calib_data=[ds.tensors[0][:32]],
              example_inputs=ds.tensors[0][:8], stages=stages,
              train=TrainConfig(**{**CFG, "epochs": 1}), model_name="toy")
    assert all(p.requires_grad for n, p in res.model.named_parameters() if n.endswith("weight")
               and "quant" not in n)


def test_stage_init_calibrate_reinitialises_quantizers_at_new_bits():
    """``stage_init: calibrate`` re-runs the range observer at the new bits on the trained
    weights: same weights as ``keep``, other quantizer parameters, lower 2-bit weight error."""
    ds = dataset()
    stages = [Stage(w_bits=4, a_bits=4), Stage(w_bits=2, a_bits=2, epochs=0)]
    models = {}
    for init in ("keep", "calibrate"):
        torch.manual_seed(0)
        models[init] = qat(net(), "qil", loader(), calib_data=[ds.tensors[0][:32]],
                           example_inputs=ds.tensors[0][:8], stages=stages,
                           train=TrainConfig(**{**CFG, "epochs": 1, "stage_init": init})).model
    keep, cal = models["keep"], models["calibrate"]
    assert torch.equal(keep[3].weight, cal[3].weight)
    assert keep[3].w_bits == cal[3].w_bits == 2
    assert not torch.equal(quantizer_vector(keep), quantizer_vector(cal))

    def werr(m):
        with torch.no_grad():
            return (m[3].quant_weight() - m[3].weight).pow(2).sum().item()

    assert werr(cal) < werr(keep)


class StopAt(TrainHook):
    """Stops the run after ``at`` steps and trains the last bias at its own learning rate."""

    def __init__(self, at):
        self.at = at

    def param_groups(self, model):
        return [dict(params=[model[8].bias], lr=0.5, name="bias")]

    def on_train_start(self, trainer):
        self.trainer = trainer

    def on_step_end(self, ctx):
        if ctx.step + 1 == self.at:
            self.trainer.stop()


def test_hook_stops_the_run_and_owns_a_parameter_group(tmp_path):
    q = prepared()
    t = Trainer(q, loader(), TrainConfig(**CFG), output_dir=tmp_path, run_info=RUN,
                hooks=[StopAt(8)])
    hist = t.fit()
    assert t.global_step == 8 and [r["steps"] for r in hist] == [6, 2]  # 6 batches an epoch
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    assert groups["bias"]["base_lr"] == 0.5 and groups["bias"]["params"] == [q[8].bias]
    assert all(p is not q[8].bias for n, g in groups.items() if n != "bias" for p in g["params"])
    assert load_checkpoint(tmp_path / "checkpoint.pt")["stopped"]
    again = prepared()
    t2 = Trainer(again, loader(), TrainConfig(**CFG), output_dir=tmp_path, run_info=RUN,
                 hooks=[StopAt(8)])
    t2.fit(resume=True)  # a stopped run trains no further
    assert t2.global_step == 8
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in q.state_dict().items())


def test_qat_trains_a_config_that_mixes_kinds_per_layer():
    """A DQSS result names a quantizer kind per layer; QAT retrains it as it is."""
    from lowbit.config import LayerRule
    from lowbit.prepare import quantizers

    base = method_config("lsq", 4, 4)
    cfg = base.model_copy(update={"layers": [LayerRule(
        match="3", weight={"kind": "qil"}, act={"kind": "pact"})]})
    res = qat(net(), "lsq", loader(), calib_data=[dataset().tensors[0][:32]],
              example_inputs=dataset().tensors[0][:8], config=cfg,
              train=TrainConfig(**{**CFG, "epochs": 1}))
    kinds = {q.name: q.kind for q in quantizers(res.model)}
    assert kinds["3.weight_quant"] == "qil" and kinds["3.input_quant"] == "pact"
    assert kinds["0.weight_quant"] == "lsq" or kinds["0.weight_quant"] == "uniform"
    assert len(res.history) == 1 and res.history[0]["loss"] == res.history[0]["loss"]
