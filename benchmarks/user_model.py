"""A user's own ResNet class against lowbit's, same weights: does PTQ find the same structure?

``UserResNet`` is how a user writes a CIFAR ResNet: functional ReLUs, the option-A shortcut as
``F.pad`` inside ``forward``, no lowbit block classes. Its state-dict keys match lowbit's
``resnet20`` so the same checkpoint loads. Both models are quantized by the same method with
the same calibration images and seed, and evaluated on the same test images; the row states
each top-1, the paired difference and its standard error, and the reconstruction units found.

    python benchmarks/user_model.py --threads 1
    python benchmarks/user_model.py --threads 1 --method brecq --settings W2A4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, load_rows, protocol_data, provenance, save_rows, weights  # noqa: E402

SETTINGS = {"W4A4": (4, 4), "W2A4": (2, 4)}
FIELDS = ["model", "method", "w_bits", "a_bits", "iters", "lowbit_top1", "user_top1",
          "difference", "difference_se", "agreement", "lowbit_units", "user_units",
          "eval_images", "calib_images", "threads", "seconds", "torch", "commit", "command",
          "note"]


class UserBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pad = (c_out - c_in) // 2
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.stride != 1 or self.pad:
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + x)


class UserResNet(nn.Module):
    def __init__(self, n: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, c_in = [], 16
        for c, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [UserBlock(c_in, c, stride)] + [UserBlock(c, c, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def run(method: str, w_bits: int, a_bits: int, args) -> dict:
    from lowbit import QuantConfig, evaluate, ptq
    from lowbit.models import get_model

    t0 = time.perf_counter()
    data = protocol_data("resnet20", "diverse", calib_size=args.calib_size,
                         eval_size=args.eval_size, batch_size=64)
    ours = get_model("resnet20", weights("resnet20")).eval()
    user = UserResNet().eval()
    user.load_state_dict(ours.state_dict(), strict=True)
    config = QuantConfig.uniform(w_bits, a_bits)
    opts = {"iters": args.iters, "progress": False}
    quantized = []
    for net in (ours, user):
        torch.manual_seed(0)
        quantized.append(ptq(net, method, data.calib, config, data.example, **opts))
    q_ours, q_user = quantized
    res = evaluate(q_user, data.eval, reference=q_ours, progress=False)
    return dict(
        model="resnet20", method=method, w_bits=w_bits, a_bits=a_bits, iters=args.iters,
        lowbit_top1=res.reference_top1, user_top1=res.top1,
        difference=res.top1 - res.reference_top1, difference_se=res.delta_se,
        agreement=res.agreement,
        lowbit_units=len(q_ours.lowbit_rapq.get("units") or []),
        user_units=len(q_user.lowbit_rapq.get("units") or []),
        eval_images=res.samples, calib_images=q_ours.lowbit_rapq["calib_images"],
        threads=torch.get_num_threads(), seconds=time.perf_counter() - t0, **provenance())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="rapq", choices=["rapq", "brecq"])
    ap.add_argument("--settings", nargs="+", default=["W2A4"], choices=list(SETTINGS))
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "user_model"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = load_rows(out)
    command = "python benchmarks/user_model.py " + " ".join(
        a for a in sys.argv[1:] if not a.startswith("--out") and a != args.out)
    for s in args.settings:
        row = run(args.method, *SETTINGS[s], args)
        row["command"] = command
        print({k: row[k] for k in ("method", "w_bits", "a_bits", "lowbit_top1", "user_top1",
                                   "difference", "difference_se", "lowbit_units", "user_units")})
        rows = [r for r in rows if (r["method"], r["w_bits"], r["a_bits"], r["iters"])
                != (row["method"], row["w_bits"], row["a_bits"], row["iters"])] + [row]
        save_rows(out, rows, FIELDS)


if __name__ == "__main__":
    main()
