"""The summary table that opens BENCHMARKS.md, generated from the committed result files.

    python benchmarks/summary.py              # rewrite the marked block of BENCHMARKS.md
    python benchmarks/summary.py --check      # exit 1 if that block is out of date
    python benchmarks/summary.py --print      # print the block only

One line per model and setting: the float top-1, lowbit's recommended recipe for that setting
and its top-1 and drop from float, and the best committed peer row. Every number is read from
one row of one file under ``benchmarks/results/`` (named in the ``source`` column; the row
stores the command that produced it). The recipes are fixed below, not chosen by result, so a
new row cannot quietly change which method is recommended.

The 224 px ImageNet models are reported only on the 1000-class ``diverse`` protocol (rows with
``protocol_name``; ``benchmarks/common.py``), never on the 10-class Imagenette split, where
reconstruction can beat float; a setting without such a row says so. The drop on the
``narrow`` protocol (calibration on 10 classes) is given beside it where measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_configs import row_config  # noqa: E402
from report import unpadded  # noqa: E402

from lowbit.report.tables import format_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "BENCHMARKS.md"
START, END = "<!-- summary:start -->", "<!-- summary:end -->"
IMAGENET = ("mobilenet_v2_tflite", "efficientnet_lite0")
PROTOCOL, OTHER_PROTOCOL = "diverse", "narrow"
MISSING_1000 = "no 1000-class row yet"
NARROW = f"drop, {OTHER_PROTOCOL} calib."
COLUMNS = ["model", "setting", "float", "lowbit recipe", "top-1", "drop", NARROW, "best peer",
           "peer top-1", "source"]


@dataclass(frozen=True)
class Pick:
    """One row of one results file: the file's stem and the values the row must have."""

    file: str
    match: dict = field(default_factory=dict)
    score: str = "top1"  # the row's top-1 field


@dataclass(frozen=True)
class Entry:
    model: str
    setting: str
    recipe: str  # what the user runs, as named in the method sections of BENCHMARKS.md
    lowbit: Pick
    peers: tuple[tuple[str, Pick], ...] = ()


def _pot(model: str, w: int, a: int, method: str = "rapq") -> Entry:
    file = "rapq_protocol" if model in IMAGENET else "rapq"
    peer = Pick("brevitas_pot", {"model": model, "w_bits": w, "a_bits": a})
    return Entry(model, f"W{w}A{a} power-of-two", f"`{method}`",
                 Pick(file, {"model": model, "config": method.replace("+", "-"), "w_bits": w,
                             "a_bits": a}),
                 (("Brevitas PoT", peer),))


def _uniform8(model: str) -> Entry:
    file = "ptq_protocol" if model in IMAGENET else "ptq_baseline"
    peer = Pick("export", {"model": model, "method": "onnxruntime quantize_static U8S8"},
                "top1_ort")
    return Entry(model, "W8A8 uniform", "`mse`",
                 Pick(file, {"model": model, "method": "mse", "w_bits": 8, "a_bits": 8}),
                 (("ORT quantize_static", peer),))


# ResNet-20 only: (setting, recipe, results file, run name) of QAT, (setting, file) of SDQ
QAT = [("W4A4 QAT", "QIL, 3 epochs, distillation", "qat_runs_long", "qil_w4a4_kd"),
       ("W3A3 QAT", "QIL, 6 epochs, distillation T=1", "qat_runs_long6", "qil_w3a3_kd"),
       ("W2A2 QAT", "QIL 2/2, 3 epochs, BN trained", "qat_runs_bntrain_e3",
        "qil_w2a2_direct_bntrain")]
SDQ = [("mixed, BitOPs of W3A4", "sdq_a4_w3"), ("mixed, BitOPs of W2A4", "sdq_a4_w2"),
       ("mixed W, 3 bits avg, float A", "sdq_float_w3"),
       ("mixed W, 2 bits avg, float A", "sdq_float_w2")]
SDQ_LONG = [("mixed W, 2 bits avg, float A", "SDQ search + 30 epochs", "sdq_float_w2_e30_sdq"),
            ("mixed W, BitOPs of W2, float A", "SDQ search + 30 epochs",
             "sdq_float_w2_bitops_e30")]


def _entries() -> list[Entry]:
    out = []
    for model in ("resnet20", "resnet56", *IMAGENET):
        dw = "rapq+dw+rs" if model == "mobilenet_v2_tflite" else "rapq"
        out += [_uniform8(model), _pot(model, 8, 8), _pot(model, 4, 8)]
        if model == "mobilenet_v2_tflite":
            out.append(Entry(model, "W4A8 PoT, depthwise W8", "`rapq --dw-w-bits 8`",
                             Pick("rapq_protocol", {"model": model, "config": "rapq-dw8",
                                                    "w_bits": 4, "a_bits": 8})))
        out += [_pot(model, 4, 4, dw), _pot(model, 2, 4, dw)]
        if model == "resnet20":
            out += [Entry(model, setting, recipe, Pick(file, {"run": run}))
                    for setting, recipe, file, run in QAT]
            out += [Entry(model, setting, "SDQ search + 1 epoch", Pick(file, {"arm": "sdq"}))
                    for setting, file in SDQ]
            out += [Entry(model, setting, recipe, Pick(file, {"arm": "sdq"}))
                    for setting, recipe, file in SDQ_LONG]
    return out


ENTRIES = _entries()


def _value(row: dict, key: str):
    """``row[key]``; ``config`` is the row's named config, also for rows from before named
    configs (``rapq+dw+rs`` ran ``rapq-dw-rs``), so old and new rows of one recipe match."""
    if key == "config":
        return row_config(row) if row.get("method") or row.get("config") else None
    return row.get(key)


class Results:
    """The committed result files, read once each."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._cache: dict[str, tuple[dict, list[dict]]] = {}

    def load(self, stem: str) -> tuple[dict, list[dict]]:
        if stem not in self._cache:
            path = self.folder / f"{stem}.json"
            data = json.loads(path.read_text()) if path.is_file() else {"rows": []}
            self._cache[stem] = (data, data["rows"])
        return self._cache[stem]

    def find(self, pick: Pick, protocol: str | None) -> dict | None:
        """The one row matching ``pick`` (under ``protocol`` for an ImageNet model), or None.

        Two matching rows are an error: a cell must name exactly one measurement."""
        data, rows = self.load(pick.file)
        found = [r for r in rows if all(_value(r, k) == v for k, v in pick.match.items())
                 and r.get("protocol_name") in ((protocol,) if protocol else (None, "cifar10"))]
        if len(found) > 1:
            raise SystemExit(f"{pick.file}.json: {len(found)} rows match {pick.match} "
                             f"(protocol {protocol}); the summary needs exactly one")
        if not found:
            return None
        row = found[0]
        if "float_top1" not in row and "float_top1" in data:
            row = {**row, "float_top1": data["float_top1"]}
        return row

    def float_row(self, model: str, protocol: str | None) -> tuple[str, dict | None]:
        """The float model's row in the baseline file of its protocol, and that file."""
        stem = "ptq_protocol" if protocol else "ptq_baseline"
        return stem, self.find(Pick(stem, {"model": model, "method": "float"}), protocol)


def _drop(row: dict, float_top1: float | None) -> str:
    if row.get("drop") is not None:
        drop = row["drop"]
    elif float_top1 is not None:
        drop = float_top1 - row["top1"]
    else:
        return ""
    se = row.get("drop_se")
    return f"{drop:.2f} ± {se:.2f}" if se is not None else f"{drop:.2f}"


def line(res: Results, e: Entry) -> dict:
    protocol = PROTOCOL if e.model in IMAGENET else None
    missing = MISSING_1000 if protocol else "not run"
    tag = f" ({protocol})" if protocol else ""
    row = res.find(e.lowbit, protocol)
    out = {"model": e.model, "setting": e.setting, "lowbit recipe": e.recipe, "top-1": missing}
    sources = []
    float_top1 = (row or {}).get("float_top1")
    if float_top1 is None:
        stem, frow = res.float_row(e.model, protocol)
        if frow is not None:
            float_top1 = frow["top1"]
            if stem != e.lowbit.file or row is None:
                sources.append(f"{stem}.json{tag} (float)")
    out["float"] = float_top1
    if row is not None:
        out["top-1"], out["drop"] = f"{row['top1']:.2f}", _drop(row, float_top1)
        sources.insert(0, f"{e.lowbit.file}.json{tag}")
        narrow = res.find(e.lowbit, OTHER_PROTOCOL) if protocol else None
        if narrow is not None:
            out[NARROW] = _drop(narrow, narrow.get("float_top1"))
    peers = [(name, r, p) for name, p in e.peers if (r := res.find(p, protocol)) is not None]
    if peers:
        name, r, p = max(peers, key=lambda t: t[1][t[2].score])
        out["best peer"], out["peer top-1"] = name, f"{r[p.score]:.2f}"
        sources.append(f"{p.file}.json")
    elif e.peers:
        out["best peer"] = " / ".join(name for name, _ in e.peers)
        out["peer top-1"] = missing
    out["source"] = "; ".join(sources)
    return out


def block(folder: Path = RESULTS) -> str:
    res = Results(folder)
    table = unpadded(format_table([line(res, e) for e in ENTRIES], COLUMNS, markdown=True))
    return "\n".join([
        START,
        "<!-- generated by `python benchmarks/summary.py` from benchmarks/results/; do not edit -->",
        "",
        table,
        "",
        "CIFAR-10 models: the 10,000 test images. MobileNetV2 and EfficientNet-Lite0: the "
        f"1000-class `{PROTOCOL}` protocol (calibrate on 650 of `imagenet-val-1300`, evaluate on "
        f"the other 649), drop from float on the same images ± its paired standard error; "
        f"`{OTHER_PROTOCOL} calib.`: calibrated on 10 Imagenette classes instead. "
        f"\"{MISSING_1000}\": measured only on the 10-class Imagenette split (the method "
        "sections below), which does not predict 1000-class accuracy. Each row of a `source` "
        "file stores the command that produced it.",
        END,
    ])


def rewrite(doc: str, new_block: str) -> str:
    """``doc`` with its summary block replaced by ``new_block`` (or put first, under the title)."""
    if START in doc and END in doc:
        head, rest = doc.split(START, 1)
        return head + new_block + rest.split(END, 1)[1]
    title, _, body = doc.partition("\n")
    return f"{title}\n\n{new_block}\n{body}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the block is out of date")
    ap.add_argument("--print", action="store_true", help="print the block, write nothing")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result files")
    ap.add_argument("--doc", type=Path, default=DOC, help="the markdown file holding the block")
    args = ap.parse_args(argv)
    new = block(args.results)
    if args.print:
        print(new)
        return 0
    doc = args.doc.read_text()
    updated = rewrite(doc, new)
    if args.check:
        if updated != doc:
            print(f"{args.doc}: the summary block is out of date; run python benchmarks/summary.py")
            return 1
        print(f"{args.doc}: summary up to date")
        return 0
    if updated != doc:
        args.doc.write_text(updated)
    print(f"{args.doc}: summary {'rewritten' if updated != doc else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
