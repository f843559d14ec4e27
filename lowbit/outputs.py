"""Output paths, checked before any work: a path that cannot be written is found in a second,
not after an hour of compute, and a run folder is never silently reused by another run.

The checks write nothing (a failed check leaves the disk as it was); folders are created later
by whatever writes into them.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputError

RUNS_ROOT = Path("lowbit-runs")

# what a lowbit run writes into its folder (qat, search, sweeps, recipes); --overwrite removes
# these and nothing else, so `-o .` with --overwrite cannot delete a user's own files
RUN_FILES = {"checkpoint.pt", "steps.csv", "history.csv", "results.json", "sweep.json",
             "pareto.csv", "pareto.png", "config.yaml", "search.json", "bits.txt", "bits.png"}
RUN_FOLDERS = {"model", "search", "qat", "tensorboard"}
_SWEEP_POINT = re.compile(r"^\d{2}_[a-z_]+_")


def _writable_base(folder: Path, path: Path, flag: str) -> None:
    """The nearest existing folder at or above ``folder`` must be a writable folder."""
    base = folder
    while not base.exists():
        if base.parent == base:
            break
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"{flag} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: cannot write in {base} (permission denied); "
                          "choose another path")


def check_file(path: str | os.PathLike[str], flag: str) -> Path:
    """``path`` can be written as a file: not a folder, and its folder exists or can be made."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name, e.g. {p / 'results.json'}")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"{flag} {path} exists and is not writable (permission denied)")
    _writable_base(p.parent, p, flag)
    return p


def check_folder(path: str | os.PathLike[str], flag: str) -> Path:
    """``path`` can be written into as a folder: not a file, and it exists or can be made."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; give a folder name")
    _writable_base(p, p, flag)
    return p


SAVED_MODEL_FILES = ("model.safetensors", "config.yaml", "meta.json")


def check_save_folder(path: str | os.PathLike[str] | None, flag: str = "--save",
                      overwrite: bool = False) -> Path | None:
    """A folder for ``save_quantized``: writable, and not holding another saved model unless
    ``overwrite`` (a saved model is never replaced silently)."""
    if path is None:
        return None
    p = check_folder(path, flag)
    held = [f for f in SAVED_MODEL_FILES if (p / f).exists()]
    if held and not overwrite:
        raise OutputError(f"{flag} {path} already holds a saved model ({', '.join(held)}); give "
                          "a new folder, or add --overwrite to replace it")
    return p


def check_outputs(files: dict[str, str | None] | None = None,
                  folders: dict[str, str | None] | None = None) -> None:
    """Check every given ``{flag: path}`` (None: not given) and that no two are the same path."""
    seen: dict[Path, str] = {}
    for kind, paths in ((check_file, files or {}), (check_folder, folders or {})):
        for flag, path in paths.items():
            if path is None:
                continue
            p = kind(path, flag).resolve()
            if p in seen:
                raise OutputError(f"{seen[p]} and {flag} are the same path ({path}); give two")
            seen[p] = flag


def default_run_dir(command: str, model: str, root: str | Path = RUNS_ROOT) -> Path:
    """``lowbit-runs/<command>-<model>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``... when two runs
    start in the same second: a run without ``-o`` never lands in another run's folder."""
    stem = Path(root) / f"{command}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path


def _run_entries(folder: Path) -> list[Path]:
    return sorted(e for e in folder.iterdir()
                  if (e.is_file() and e.name in RUN_FILES)
                  or (e.is_dir() and (e.name in RUN_FOLDERS or _SWEEP_POINT.match(e.name))))


def claim_run_dir(
    path: str | os.PathLike[str],
    *,
    resume: bool,
    overwrite: bool,
    checkpoints: Iterable[str] = ("checkpoint.pt",),
    flag: str = "--output-dir/-o",
    main_process: bool = True,
) -> Path:
    """Check the folder a training run or search will write, before any work.

    ``resume``: the folder must hold one of ``checkpoints`` (relative paths; globs allowed).
    Otherwise the folder must be new or empty; ``overwrite`` first removes what an earlier
    lowbit run wrote there (only on the ``main_process``, so DDP ranks do not race).
    """
    p = check_folder(path, flag)
    if resume and overwrite:
        raise OutputError("give --resume (continue the run in the folder) or --overwrite "
                          "(replace it), not both")
    names = list(checkpoints)
    if resume:
        if not (p.is_dir() and any(any(p.glob(c)) for c in names)):
            raise OutputError(f"--resume: no checkpoint in {path} (looked for "
                              f"{', '.join(names)}); start without --resume, or pass the folder "
                              "of the run to continue with -o")
        return p
    entries = sorted(p.iterdir()) if p.is_dir() else []
    if not entries:
        return p
    if not overwrite:
        shown = ", ".join(e.name for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise OutputError(f"{flag} {path} is not empty (it holds {shown}): continue the run in "
                          "it with --resume, replace it with --overwrite, or give another folder")
    if main_process:
        for e in _run_entries(p):
            shutil.rmtree(e) if e.is_dir() else e.unlink()
    return p


__all__ = ["RUNS_ROOT", "check_file", "check_folder", "check_outputs", "claim_run_dir",
           "default_run_dir"]
