"""Single-image super-resolution: ``(lr, hr)`` pairs, PSNR-Y / SSIM-Y with a border crop of
``scale`` pixels (the EDSR protocol), the bicubic baseline, and for a quantized model the PSNR
of its output against the float model's."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lowbit.errors import DataError
from lowbit.utils import model_device

from .base import Task, check_dataset_task, register_task
from .image_metrics import psnr, rgb_to_y, shave, to_pixels, y_metrics

log = logging.getLogger("lowbit")


@dataclass
class SRResult:
    psnr_y: float
    ssim: float
    samples: int
    scale: int
    bicubic_psnr_y: float
    bicubic_ssim: float
    psnr_vs_reference: float | None = None  # PSNR-Y of the output against the reference's
    reference_psnr_y: float | None = None
    reference_ssim: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        s = (f"PSNR-Y {self.psnr_y:.3f} dB  SSIM {self.ssim:.4f}  (x{self.scale}, "
             f"{self.samples} images; bicubic {self.bicubic_psnr_y:.3f} dB / "
             f"{self.bicubic_ssim:.4f})")
        if self.reference_psnr_y is not None:
            s += (f"\n  reference (float) PSNR-Y {self.reference_psnr_y:.3f} dB: difference "
                  f"{self.psnr_y - self.reference_psnr_y:+.3f} dB; PSNR against the float "
                  f"output {self.psnr_vs_reference:.2f} dB")
        return s


def _stats(spec, dev) -> tuple[torch.Tensor, torch.Tensor]:
    mean = spec.mean if spec is not None else (0.0, 0.0, 0.0)
    std = spec.std if spec is not None else (1.0, 1.0, 1.0)
    return (torch.tensor(mean, device=dev).view(1, -1, 1, 1),
            torch.tensor(std, device=dev).view(1, -1, 1, 1))


def _check_pair(lr: torch.Tensor, hr: torch.Tensor, out: torch.Tensor) -> int:
    """The data's scale, after checking the batch is an (lr, hr) pair the model's output fits."""
    if hr.dim() != 4:
        raise DataError(f"super-resolution needs (lr, hr) image pairs; the targets have shape "
                        f"{tuple(hr.shape)} (class labels?): give an SR dataset, e.g. -d "
                        "sr-sklearn or -d sr-folder --data-root DIR")
    scale = hr.shape[-1] // lr.shape[-1]
    if out.shape != hr.shape:
        made = out.shape[-1] / lr.shape[-1] if out.dim() == 4 else float("nan")
        raise DataError(f"the model turns {tuple(lr.shape[-2:])} inputs into outputs of shape "
                        f"{tuple(out.shape)} (x{made:g}) but the HR images have shape "
                        f"{tuple(hr.shape)} (x{scale}): use data made for the model's scale")
    return scale


@torch.no_grad()
def evaluate_sr(model, data, reference=None, *, spec=None, progress: bool = True,
                desc: str = "eval", channels_last: bool = True) -> SRResult:
    """Mean per-image PSNR-Y and SSIM of ``model`` on ``(lr, hr)`` batches; sums stay on the
    device and are read once."""
    from tqdm.auto import tqdm

    dev = model_device(model)
    model.eval()
    if reference is not None:
        reference.eval()
    mean, std = _stats(spec, dev)
    sums = torch.zeros(7, dtype=torch.float64, device=dev)
    n, scale = 0, 0
    t0 = time.perf_counter()
    for lr, hr in tqdm(data, desc=desc, disable=not progress, leave=False):
        lr, hr = lr.to(dev), hr.to(dev)
        if channels_last and lr.dim() == 4:
            lr = lr.contiguous(memory_format=torch.channels_last)
        out = model(lr)
        scale = _check_pair(lr, hr, out)
        target = to_pixels(hr, mean, std)
        sr = to_pixels(out, mean, std)
        bic = to_pixels(F.interpolate(lr, scale_factor=scale, mode="bicubic",
                                      align_corners=False), mean, std)
        terms = [*y_metrics(sr, target, scale), *y_metrics(bic, target, scale)]
        if reference is not None:
            ref = to_pixels(reference(lr), mean, std)
            terms += [*y_metrics(ref, target, scale),
                      psnr(shave(rgb_to_y(sr), scale), shave(rgb_to_y(ref), scale))]
        sums[: len(terms)] += torch.stack([t.sum() for t in terms])
        n += lr.shape[0]
    if n == 0:
        raise DataError("the evaluation set is empty: pass at least one (lr, hr) batch")
    m = (sums / n).tolist()
    res = SRResult(m[0], m[1], n, scale, m[2], m[3])
    if reference is not None:
        res.reference_psnr_y, res.reference_ssim, res.psnr_vs_reference = m[4], m[5], m[6]
    log.info("%s: PSNR-Y %.3f dB on %d images (%.1f s)", desc, res.psnr_y, n,
             time.perf_counter() - t0)
    return res


def _describe(part: dict) -> str:
    what = (f"all {part['images']}" if part["images"] == part["of"]
            else f"{part['images']} seeded (seed {part['seed']}) of {part['of']}")
    kind = f"{part['patch']} px HR patches of " if part.get("patch") else ""
    return f"{part['dataset']}/{part['split']} at {part['root']}: {kind}{what} images"


def l1_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).abs().mean()


def l2_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).square().mean()


class SuperResolution(Task):
    name = "super_resolution"
    losses = ("l1", "l2")  # L1 first: EDSR's and the low-bit SR papers' training loss
    score_keys = ("psnr_y", "ssim")

    def datasets(self) -> list[str]:
        from lowbit.data.sr import list_sr_datasets

        return list_sr_datasets()

    def build_data(self, spec, dataset=None, root=None, *, calib_dataset=None, calib_root=None,
                   calib_size=1024, eval_size=None, batch_size=64, workers=0, seed=0,
                   calibration=True):
        """Evaluation on whole test images (batch 1, sizes differ); calibration on seeded LR
        patches of the model's ``input_size`` from a training split (by default the same
        dataset's, or ``sr-imagenette``'s for a test-only set)."""
        from lowbit.data import make_loader, subset
        from lowbit.data.sr import SRDataset, sr_image_paths
        from lowbit.pipeline import DataBundle

        name = (dataset or spec.default_dataset).lower()
        check_dataset_task(spec, name)
        paths, folder = sr_image_paths(name, root, "test")
        evaluation = SRDataset(paths, spec.scale, spec.mean, spec.std)
        eval_part = {"dataset": name, "root": str(folder), "split": "test", "seed": seed,
                     "images": len(evaluation), "of": len(evaluation), "scale": spec.scale}
        if eval_size is not None and eval_size < len(evaluation):
            evaluation = subset(evaluation, eval_size, seed)
            eval_part["images"] = eval_size
        info, parts, calib_loader = {"evaluation": eval_part}, [], None
        if calibration:
            cname = (calib_dataset or self.train_dataset(name)).lower()
            check_dataset_task(spec, cname)
            croot = calib_root if calib_root is not None else (root if cname == name else None)
            cpaths, cfolder = sr_image_paths(cname, croot, "train")
            patch = spec.input_size[1] * spec.scale
            pool = SRDataset(cpaths, spec.scale, spec.mean, spec.std, patch=patch, seed=seed)
            calib = subset(pool, min(calib_size, len(pool)), seed)
            calib_part = {"dataset": cname, "root": str(cfolder), "split": "train", "seed": seed,
                          "images": len(calib), "of": len(pool), "patch": patch}
            if name == "sr-folder" and cname == name and str(cfolder) == str(folder):
                calib_part["note"] = "calibration patches come from the evaluation images"
            info["calibration"] = calib_part
            parts.append("calibration " + _describe(calib_part))
            calib_loader = make_loader(calib, batch_size, workers=workers)
        parts.append("evaluation " + _describe(eval_part) + f" (x{spec.scale}, bicubic LR)")
        eval_loader = make_loader(evaluation, 1, workers=workers)
        if calib_loader is not None:  # patches share one size; whole images do not
            pool = calib_loader.dataset
            example = torch.stack([pool[i][0] for i in range(min(len(pool), 2))])
        else:
            example = evaluation[0][0][None]
        return DataBundle(calib_loader, eval_loader, example, name, "; ".join(parts), info)

    def evaluate(self, model, data, reference, *, spec=None, progress, desc, channels_last):
        return evaluate_sr(model, data, reference, spec=spec, progress=progress, desc=desc,
                           channels_last=channels_last)

    @staticmethod
    def _row(label: str, p: float, s: float, vs: float | None) -> dict:
        return dict(model=label, psnr_y=f"{p:.3f}", ssim=f"{s:.4f}",
                    vs_float="" if vs is None else ("inf" if math.isinf(vs) else f"{vs:.2f}"))

    def ptq_rows(self, float_res, q_res, label):
        rows = [self._row("bicubic", float_res.bicubic_psnr_y, float_res.bicubic_ssim, None),
                self._row("float", float_res.psnr_y, float_res.ssim, None),
                self._row(label, q_res.psnr_y, q_res.ssim, q_res.psnr_vs_reference)]
        return rows, ["psnr_y", "ssim", "vs_float"]

    def eval_rows(self, res, label):
        rows = [self._row("float", res.reference_psnr_y, res.reference_ssim, None),
                self._row(label, res.psnr_y, res.ssim, res.psnr_vs_reference)]
        return rows, ["psnr_y", "ssim", "vs_float"]


    def loss(self, name, cfg):
        return {"l1": l1_loss, "l2": l2_loss}[name]

    def train_dataset(self, dataset):
        return "sr-imagenette" if dataset == "sr-sklearn" else dataset  # sr-sklearn: test only

    def train_set(self, spec, dataset, root, *, patch=None):
        """Random HR patches (default: the calibration patch, ``input_size`` x ``scale``) with
        the eight flips/rotations, re-drawn every epoch."""
        from lowbit.data.sr import SRDataset, sr_image_paths

        check_dataset_task(spec, dataset)
        paths, _ = sr_image_paths(dataset, root, "train")
        return SRDataset(paths, spec.scale, spec.mean, spec.std,
                         patch=patch or spec.input_size[1] * spec.scale, augment=True)

    def scores(self, res):
        return {"psnr_y": res.psnr_y, "ssim": res.ssim}

    def headline(self, scores):
        return f"PSNR-Y {scores['psnr_y']:.3f} dB, SSIM {scores['ssim']:.4f}"

    def accepts(self, inputs, targets):
        return targets.dim() == 4 and inputs.dim() == 4


register_task(SuperResolution())
