"""SDQ search: budgets, the found config meets its budget, saved configs re-apply, Pareto sweep."""

import json

import pytest
import torch

from lowbit import ConfigError, QuantConfig, TrainingError, measure, prepare
from lowbit.cli import main
from lowbit.data import load_dataset, make_loader, subset
from lowbit.models import get_model, get_spec
from lowbit.prepare import quant_layers
from lowbit.qat import TrainHook
from lowbit.search import Budget, BudgetKind, ParetoResult, pareto_front, pareto_sweep, sdq_search
from lowbit.train import train_epochs

FAST = dict(steps=60, check_every=10, calib_batches=2, progress=False)


@pytest.fixture(scope="module")
def digits():
    """A digits CNN trained for two epochs on 512 images, its loader and an example batch."""
    torch.manual_seed(0)
    spec = get_spec("digits_cnn")
    train = subset(load_dataset("digits", split="train", mean=spec.mean, std=spec.std), 512, 0)
    loader = make_loader(train, 64, shuffle=True, seed=0)
    model = get_model("digits_cnn")
    train_epochs(model, loader, 2, lr=1e-2)
    return model.eval(), loader, next(iter(loader))[0][:2]


def layer_bits(model):
    return {n: m.w_bits for n, m in quant_layers(model)}


def test_budget_parsing_and_errors():
    assert Budget.parse("2.5") == Budget(kind=BudgetKind.AVG_WEIGHT_BITS, value=2.5)
    assert Budget.parse(3) == Budget(value=3.0)
    assert Budget.parse("bitops:1.5G").value == 1.5e9
    assert Budget.parse("weight_memory:64KiB") == Budget(kind="weight_memory", value=65536.0)
    assert Budget.parse("memory:2k").kind is BudgetKind.WEIGHT_MEMORY
    for bad, msg in [("flops:3", "unknown budget kind"), ("bitops:abc", "cannot read"),
                     ("bitops:-1", "positive"), ("2x", "cannot read")]:
        with pytest.raises(ConfigError, match=msg):
            Budget.parse(bad)


@pytest.mark.parametrize("budget", ["3.5", "bitops:9M", "weight_memory:6KiB"])
def test_found_config_meets_budget_and_reapplies(digits, budget, tmp_path):
    model, loader, example = digits
    res = sdq_search(model, loader, budget, example, a_bits=8, **FAST)
    assert res.met
    again = prepare(model, QuantConfig.load(res.save(tmp_path, plot=False)["config"]), example)
    measured = res.budget.measure(measure(again, example))
    assert res.budget.met_by(measured) and measured == pytest.approx(res.achieved)
    bits = layer_bits(again)
    assert {n: bits[n] for n in res.bits} == res.bits
    assert bits["features.0"] == 8 and bits["fc"] == 8  # first/last at 8 bits, not searched
    assert set(res.bits) == {"features.3", "features.6"}
    json_cfg = res.config.save(tmp_path / "found.json")
    assert layer_bits(prepare(model, QuantConfig.load(json_cfg), example)) == bits


def test_layers_step_down_on_their_own_before_the_step_limit(digits):
    model, loader, example = digits
    res = sdq_search(model, loader, 4.0, example, a_bits=None, steps=400, check_every=5,
                     dbp_lr=0.2, threshold=0.5, calib_batches=2, progress=False)
    assert res.met and not res.forced and res.steps < 400
    assert all(h["cost"] >= res.achieved for h in res.history)
    assert res.history[0]["cost"] > res.history[-1]["cost"]


def test_search_is_deterministic_under_a_seed(digits):
    model, loader, example = digits
    fresh = lambda: make_loader(loader.dataset, 64, shuffle=True, seed=1)  # noqa: E731
    a = sdq_search(model, fresh(), 4.0, example, a_bits=None, dbp_lr=0.1, **FAST)
    b = sdq_search(model, fresh(), 4.0, example, a_bits=None, dbp_lr=0.1, **FAST)
    assert a.bits == b.bits and a.history == b.history


def test_bad_budgets_and_bounds_are_clear_errors(digits):
    model, loader, example = digits
    with pytest.raises(ConfigError, match="cannot be met"):
        sdq_search(model, loader, 1.5, example, **FAST)
    with pytest.raises(ConfigError, match="already met"):
        sdq_search(model, loader, 8.0, example, **FAST)
    with pytest.raises(ConfigError, match="reversed"):
        sdq_search(model, loader, 3.0, example, min_bits=6, max_bits=4, **FAST)
    with pytest.raises(ConfigError, match="no layer is left"):
        two = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(),
                                  torch.nn.Linear(144, 10))
        sdq_search(two, loader, 3.0, example, **FAST)


def test_search_result_files(digits, tmp_path):
    pytest.importorskip("matplotlib")
    model, loader, example = digits
    res = sdq_search(model, loader, 3.0, example, a_bits=4, **FAST)
    files = res.save(tmp_path)
    assert files["plot"].stat().st_size > 1000
    data = json.loads(files["json"].read_text())
    assert data["met"] and data["bits"] == res.bits and data["cost"]["avg_weight_bits"] <= 3.0
    assert "features.3" in files["table"].read_text()


def test_binary_weights_reach_a_budget_below_two_bits(digits, tmp_path):
    from lowbit.cli import build_parser
    from lowbit.search.cli import _settings

    args = build_parser().parse_args(["search", "-m", "digits_cnn", "-b", "1.9", "--min-bits", "1"])
    assert _settings(args).min_bits == 1
    model, loader, example = digits
    with pytest.raises(ConfigError, match="cannot be met"):
        sdq_search(model, loader, 1.9, example, a_bits=None, first_last="same", **FAST)
    res = sdq_search(model, loader, 1.9, example, min_bits=1, max_bits=3, a_bits=None,
                     first_last="same", **FAST)
    assert res.met and res.achieved <= 1.9 and min(res.bits.values()) == 1
    again = prepare(model, QuantConfig.load(res.config.save(tmp_path / "c.yaml")), example)
    assert measure(again, example).avg_weight_bits == pytest.approx(res.achieved)


def test_pareto_front_and_sweep(digits, tmp_path):
    assert pareto_front([(1, 50), (2, 60), (2, 55), (3, 60), (0.5, 40)]) == [0, 1, 4]
    model, loader, example = digits
    sweep = pareto_sweep(model, loader, ["3", "5"], example, lambda r: 10 * r.achieved,
                         output_dir=tmp_path, a_bits=None, **FAST)
    assert isinstance(sweep, ParetoResult) and len(sweep.rows) == 2
    assert all(r["on_front"] for r in sweep.rows)  # more bits, more (fake) accuracy
    lines = (tmp_path / "pareto.csv").read_text().splitlines()
    assert lines[0].startswith("label,method,budget_kind") and len(lines) == 3
    assert all(line.split(",")[1] == "sdq" for line in lines[1:])
    assert len(list(tmp_path.glob("0*/config.yaml"))) == 2


def test_cli_search_and_errors(digits, tmp_path, capsys):
    model, _, _ = digits
    weights = tmp_path / "digits.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "found"
    rc = main(["search", "-m", "digits_cnn", "-w", str(weights), "--budget", "3.5",
               "--a-bits", "float", "--steps", "40", "--train-size", "256", "--batch-size", "64",
               "--calib-batches", "2", "--no-plot", "--no-progress", "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "--config" in captured.out and (out / "config.yaml").is_file()
    assert not (out / "bits.png").exists()
    rc = main(["search", "-m", "digits_cnn", "--budget", "1", "--steps", "5", "--train-size",
               "128", "--no-progress", "-o", str(tmp_path / "x")])
    assert rc == 2 and "cannot be met" in capsys.readouterr().err
    rc = main(["search", "-m", "digits_cnn", "--budget", "3", "--min-bits", "5", "--max-bits",
               "3", "--no-progress", "--train-size", "128", "-o", str(tmp_path / "y")])
    assert rc == 2 and "reversed" in capsys.readouterr().err


def test_recipe_runs_search_then_retraining(digits, tmp_path, capsys):
    pytest.importorskip("lowbit.qat")
    model, _, _ = digits
    weights = tmp_path / "digits.pt"
    torch.save(model.state_dict(), weights)
    recipe = tmp_path / "sdq.yaml"
    recipe.write_text(f"""
model: digits_cnn
weights: {weights}
budget: "3.5"
search: {{steps: 40, check_every: 10, calib_batches: 2, a_bits: 8, observer: minmax}}
search_train_size: 256
ebr: {{weight: 0.01}}
kd: {{teacher: same, temperature: 2.0}}
train: {{epochs: 1, max_steps_per_epoch: 3, progress: false, logger: none}}
batch_size: 64
calib_size: 64
eval_size: 100
""")
    out = tmp_path / "run"
    rc = main(["search", "--recipe", str(recipe), "-o", str(out), "--no-plot"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads((out / "results.json").read_text())
    assert res["search"]["met"] and 0 <= res["top1"] <= 100
    assert {"loss_kd", "loss_ebr"} <= set(res["history"][-1])
    assert (out / "search" / "config.yaml").is_file() and (out / "model" / "config.yaml").is_file()
    assert json.loads((out / "model" / "meta.json").read_text())["weights"] == str(weights)
    assert main(["search", "--recipe", str(recipe), "-o", str(out)]) == 2  # never reused
    assert "--overwrite" in capsys.readouterr().err
    assert main(["search", "--recipe", str(recipe), "-o", str(tmp_path / "new"), "--resume"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_retrain_scorer_with_loss_plugins(digits):
    from lowbit.losses import EntropyBinRegularizer, KnowledgeDistillation
    from lowbit.qat import TrainConfig
    from lowbit.search import RetrainScorer

    model, loader, example = digits
    res = sdq_search(model, loader, 3.5, example, a_bits=8, **FAST)
    calls = []
    ebr = EntropyBinRegularizer(1e-2)
    seen = lambda m, x, out, y: calls.append(x.shape[0]) or out.sum() * 0  # noqa: E731
    score = RetrainScorer(model, loader, loader, example, calib_batches=2, progress=False,
                          train=TrainConfig(max_steps_per_epoch=3, progress=False, logger="none"),
                          loss_terms=[ebr, KnowledgeDistillation(model), seen])
    top1 = score(res)
    assert 0 <= top1 <= 100 and len(calls) == 3
    row = score.last.history[-1]  # the shared trainer's epoch row, with each plug-in's loss
    assert row["steps"] == 3 and {"loss_kd", "loss_ebr"} <= set(row)
    assert all(p.requires_grad for p in model.parameters())  # the teacher is not frozen


def test_cli_sweep_retrains_each_config_with_the_qat_trainer(digits, tmp_path, capsys,
                                                            monkeypatch):
    import lowbit.qat.api
    from lowbit.prepare import quantizers

    model, _, example = digits
    weights = tmp_path / "digits.pt"
    torch.save(model.state_dict(), weights)
    runs = []
    real_qat = lowbit.qat.api.qat

    def spy(*args, **kwargs):
        runs.append((kwargs, real_qat(*args, **kwargs)))
        return runs[-1][1]

    monkeypatch.setattr(lowbit.qat.api, "qat", spy)
    out = tmp_path / "sweep"
    rc = main(["search", "-m", "digits_cnn", "-w", str(weights), "-b", "3.5", "-b", "5",
               "--a-bits", "8", "--steps", "40", "--check-every", "10", "--train-size", "256",
               "--batch-size", "64", "--calib-batches", "2", "--eval-size", "100",
               "--retrain-steps", "2", "--retrain-lr", "1e-3", "--ebr", "--no-plot",
               "--no-progress", "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert len(rows) == 2 and all(0 <= r["top1"] <= 100 for r in rows)
    assert len((out / "pareto.csv").read_text().splitlines()) == 3
    assert len(runs) == 2
    for kwargs, result in runs:
        cfg = kwargs["train"]
        assert (cfg.optimizer, cfg.lr, cfg.quant_lr, cfg.max_steps_per_epoch) == (
            "adam", 1e-3, None, 2)
        assert result.history[-1]["steps"] == 2 and "loss_ebr" in result.history[-1]
        start = prepare(model, kwargs["config"], example)
        qids = {id(p) for q in quantizers(start) for p in q.parameters()}
        trained = dict(result.model.named_parameters())
        moved = [n for n, p in start.named_parameters()
                 if id(p) not in qids and not torch.equal(p, trained[n])]
        assert moved, "retraining left every weight where it started"


def test_nan_during_search_is_a_training_error(digits):
    from lowbit import TrainingError

    model, loader, example = digits
    batches = list(loader)
    data = batches[:1] + [(torch.full_like(x, float("nan")), y) for x, y in batches[1:]]
    with pytest.raises(TrainingError, match="NaN"):  # calibrated on the clean first batch
        sdq_search(model, data, 3.5, example, a_bits=None, calib_batches=1, steps=20,
                   check_every=5, progress=False)


class Interrupt(TrainHook):
    """Simulates a kill after ``at`` search steps."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, ctx):
        if ctx.step + 1 == self.at:
            raise KeyboardInterrupt


def test_interrupted_search_resumes_to_the_uninterrupted_result(digits, tmp_path):
    from lowbit.qat import load_checkpoint

    model, loader, example = digits
    opts = dict(a_bits=None, dbp_lr=0.1, steps=30, check_every=5, calib_batches=2,
                progress=False)
    fresh = lambda: make_loader(loader.dataset, 64, shuffle=True, seed=3)  # noqa: E731
    full = sdq_search(model, fresh(), 4.5, example, output_dir=tmp_path / "a", **opts)
    assert full.steps > len(loader) + 2, "the run must cross a pass over the data"
    with pytest.raises(KeyboardInterrupt):
        sdq_search(model, fresh(), 4.5, example, output_dir=tmp_path / "b",
                   hooks=[Interrupt(len(loader) + 2)], **opts)
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert ckpt["global_step"] == len(loader) and not ckpt["stopped"]
    resumed = sdq_search(model, fresh(), 4.5, example, output_dir=tmp_path / "b", resume=True,
                         **opts)
    assert (resumed.bits, resumed.steps, resumed.forced) == (full.bits, full.steps, full.forced)
    assert resumed.history == full.history
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = sdq_search(model, fresh(), 4.5, example, output_dir=tmp_path / "b", resume=True,
                       **opts)  # a finished search resumes to its result without training
    assert again.history == full.history and again.steps == full.steps
    with pytest.raises(TrainingError, match="other settings"):
        sdq_search(model, fresh(), 4.0, example, output_dir=tmp_path / "b", resume=True, **opts)


def test_cost_plugin_pulls_bits_down_until_the_budget_is_met(digits):
    from lowbit.search.sdq_hooks import ExpectedCost

    model, loader, example = digits
    qs = [prepare(model, QuantConfig.uniform(4, None, kind="sdq"), example).features[3]
          .weight_quant]
    qs[0].searching = True
    term = ExpectedCost(qs, 1.0, [0.5], Budget(value=2.0), weight=3.0)
    term(None, None, None, None).backward()
    assert float(term.expected) == pytest.approx(1.0 + 0.5 * 4)
    assert float(qs[0].dbp.grad) == pytest.approx(-3.0 * 0.5 / 2.0)  # more p, fewer bits
    # with a strong cost term every layer settles and steps down on its own, to the budget
    res = sdq_search(model, loader, 3.5, example, a_bits=None, steps=300, check_every=5,
                     cost_weight=20.0, threshold=0.5, calib_batches=2, progress=False)
    assert res.met and not res.forced and res.steps < 300
    costs = [h["expected_cost"] for h in res.history]
    assert costs[-1] < costs[0] and res.history[-1]["cost"] <= 3.5


def test_search_registry_and_any_search_in_the_sweep(digits, monkeypatch, tmp_path):
    from lowbit.search import (
        SDQSettings,
        SearchResult,
        get_search,
        register_search,
        registry,
        run_search,
        search_names,
    )

    assert "sdq" in search_names() and get_search("sdq").fn is sdq_search
    assert get_search("sdq").settings is SDQSettings
    with pytest.raises(ConfigError, match="unknown search method 'nope'; registered: .*sdq"):
        get_search("nope")
    model, loader, example = digits
    monkeypatch.setattr(registry, "_SEARCHES", dict(registry._SEARCHES))

    @register_search("uniform")
    def uniform(model, data, budget, example_inputs, settings=None, *, progress=True,
                output_dir=None, resume=False, **kw):
        cfg = QuantConfig.uniform(int(budget.value), None)
        cost = measure(prepare(model, cfg, example_inputs), example_inputs)
        return SearchResult(cfg, cost, [{"step": 0}], budget, "uniform")

    with pytest.raises(ConfigError, match="already registered"):
        register_search("uniform")(lambda *a, **k: None)
    sweep = pareto_sweep(model, loader, ["3", "5"], example, lambda r: r.budget.value,
                         method="uniform", output_dir=tmp_path, plot=False)
    assert [r["budget"] for r in sweep.rows] == [3.0, 5.0]
    assert sweep.rows[0]["avg_weight_bits"] < sweep.rows[1]["avg_weight_bits"]
    assert all(isinstance(r, SearchResult) for r in sweep.results)
    saved = json.loads((tmp_path / "00_avg_weight_bits_3" / "search.json").read_text())
    assert saved["method"] == "uniform" and saved["history"] == [{"step": 0}]
    register_search("broken")(lambda *a, **k: {"bits": {}})
    with pytest.raises(ConfigError, match="not a SearchResult"):
        run_search("broken", model, loader, Budget(value=3), example)


def test_sdq_result_is_a_search_result(digits):
    from lowbit.search import SearchResult

    model, loader, example = digits
    res = sdq_search(model, loader, 3.5, example, a_bits=8, **FAST)
    assert isinstance(res, SearchResult) and res.method == "sdq"
    assert res.achieved == res.budget.measure(res.cost) and res.met
    row = res.summary()
    assert row["steps"] == res.steps and row["bitops"] == res.cost.totals()["bitops"]
    assert res.to_dict()["bits"] == res.bits


def _ddp_search_worker(rank, world, port, out):
    """One rank of a two-process SDQ search on CPU (gloo): each rank sees its own half."""
    import os

    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from lowbit.qat.ddp import DistContext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        spec = get_spec("digits_cnn")
        train = subset(load_dataset("digits", split="train", mean=spec.mean, std=spec.std),
                       256, 0)
        model = get_model("digits_cnn").eval()
        data = DataLoader(train, batch_size=32, sampler=DistributedSampler(train, world, rank,
                                                                           seed=0))
        ctx = DistContext(rank, world, 0, torch.device("cpu"))
        res = sdq_search(model, data, "3.5", next(iter(data))[0][:2], a_bits=8, dist_ctx=ctx,
                         steps=24, check_every=8, calib_batches=2, progress=False)
        torch.save({"bits": res.bits, "achieved": res.achieved}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_search_ranks_agree_on_every_layer(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_search_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    assert r0["bits"] == r1["bits"] and r0["achieved"] == r1["achieved"]
    assert r0["achieved"] <= 3.5
