"""Search cost of DQSS-QAT: a training step of the strategy-mixture model against an LSQ step,
and the efficient convolution against the pairwise DARTS sum it replaces.

ResNet-20 (CIFAR-10 shapes, random inputs: the cost does not depend on the values), W4A4, one
thread. ``step``: forward, backward and an Adam step on a batch, for the model prepared with
LSQ everywhere and for the same model with a 4-way mixture in every searched slot.
``layer``: one mixed conv of layer2 (32 channels, 16x16), forward and backward, as lowbit runs
it (one convolution on the mixed weight and input) and as the pairwise sum of
``K_w * K_a`` convolutions. Median of ``--repeats`` timings after a warm-up, in process CPU time (the wall time, which
on a shared machine includes other jobs' turns, is recorded beside it).
Results: benchmarks/results/dqss_cost.json.

    python benchmarks/dqss_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, provenance  # noqa: E402

CANDIDATES = ["mse", "lsq", "qil", "pact"]


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of ``fn`` after a warm-up. On a shared machine the
    wall time includes waiting for other jobs' turns on the cores; one thread's CPU time does
    not, so ratios are taken on it."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "dqss_cost.json"))
    args = ap.parse_args()

    import warnings

    import torch
    import torch.nn.functional as F

    from lowbit import QuantConfig, calibrate, prepare
    from lowbit.errors import NarrowCalibrationWarning
    from lowbit.models import get_model
    from lowbit.report import write_json
    from lowbit.search.dqss import DQSSSettings, add_mixtures, searchable

    warnings.filterwarnings("ignore", category=NarrowCalibrationWarning)  # random weights
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    net = get_model("resnet20").eval()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    cfg = QuantConfig.uniform(4, 4, kind="lsq", observer="minmax")
    cfg = cfg.model_copy(update={"act": cfg.act.model_copy(update={"symmetric": True})})

    def model(mixed: bool):
        q = prepare(net, cfg, x[:2])
        if mixed:
            add_mixtures(searchable(q, cfg), DQSSSettings(
                w_candidates=CANDIDATES, a_candidates=CANDIDATES, observer="minmax"))
        calibrate(q, [x], progress=False)
        return q.train()

    def stepper(q):
        opt = torch.optim.Adam(q.parameters(), lr=1e-4)

        def step():
            loss = F.cross_entropy(q(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    lsq, mix = model(False), model(True)
    (w_lsq, t_lsq), (w_mix, t_mix) = timed(stepper(lsq), args.repeats), timed(stepper(mix), args.repeats)

    layer = mix.get_submodule("layer2.1.conv1")
    a = torch.randn(args.batch, 32, 16, 16).relu().requires_grad_()
    wm, am = layer.weight_quant, layer.input_quant

    def efficient():
        layer(a).sum().backward()

    def pairwise():
        pa, pw = am.probabilities(), wm.probabilities()
        out = sum(pw[i] * pa[j] * layer._conv_forward(qa.quantize(a), qw.quantize(layer.weight),
                                                        layer.bias)
                  for i, qw in enumerate(wm.candidates) for j, qa in enumerate(am.candidates))
        out.sum().backward()

    (w_eff, t_eff), (w_pair, t_pair) = timed(efficient, args.repeats), timed(pairwise, args.repeats)
    row = dict(model="resnet20", batch=args.batch, candidates=CANDIDATES, clock="process CPU",
               lsq_step_s=t_lsq, dqss_step_s=t_mix, step_ratio=t_mix / t_lsq,
               layer="layer2.1.conv1", efficient_s=t_eff, pairwise_s=t_pair,
               layer_ratio=t_pair / t_eff, wall_s=dict(lsq_step=w_lsq, dqss_step=w_mix,
                                                       efficient=w_eff, pairwise=w_pair),
               load_avg_start=load, repeats=args.repeats,
               threads=torch.get_num_threads(), command="python " + " ".join(sys.argv),
               **provenance())
    write_json(args.out, {"rows": [row]})
    print(f"step: LSQ {t_lsq:.3f} s, DQSS (4x4 candidates) {t_mix:.3f} s ({t_mix / t_lsq:.2f}x); "
          f"layer: efficient {t_eff * 1e3:.1f} ms, pairwise {t_pair * 1e3:.1f} ms "
          f"({t_pair / t_eff:.1f}x)")


if __name__ == "__main__":
    main()
