"""A user's workflow that never loses work: output paths checked before any work, run folders
never silently reused, and clear errors instead of random or NaN weights."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

import lowbit.models
from lowbit.cli import main
from lowbit.models import get_model
from lowbit.outputs import check_file, check_folder, default_run_dir
from lowbit.qat.trainer import truncate_steps

PTQ = ["ptq", "-m", "digits_cnn", "--method", "minmax", "--calib-size", "32", "--eval-size", "32",
       "--no-progress"]
QAT = ["qat", "-m", "digits_cnn", "--method", "lsq", "--w-bits", "4", "--epochs", "1",
       "--max-steps", "4", "--log-every", "2", "--batch-size", "32", "--calib-size", "64",
       "--eval-size", "64", "--no-progress", "--no-eval-float"]
SEARCH = ["search", "-m", "digits_cnn", "--budget", "3.5", "--a-bits", "8", "--steps", "4",
          "--train-size", "64", "--batch-size", "32", "--no-plot", "--no-progress"]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a command gets as far as building a model."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the output paths were checked")

    monkeypatch.setattr(lowbit.models, "get_model", refuse)


@pytest.fixture
def weights(tmp_path):
    """A digits_cnn weights file (seeded random weights stand in for trained ones)."""
    torch.manual_seed(1)
    path = tmp_path / "digits.safetensors"
    save_file({k: v.contiguous() for k, v in get_model("digits_cnn").state_dict().items()},
              str(path))
    return path


@pytest.mark.parametrize("case", ["o-under-file", "o-is-folder", "save-is-file", "same-path",
                                  "eval-o", "info-json", "demo"])
def test_bad_output_paths_exit_2_before_any_work(case, tmp_path, capsys, no_model_loading):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (tmp_path / "a_folder").mkdir()
    argv, expect = {
        "o-under-file": ([*PTQ, "-o", blocker / "r.json"], "is a file, not a folder"),
        "o-is-folder": ([*PTQ, "-o", tmp_path / "a_folder"], "is a folder; give a file name"),
        "save-is-file": ([*PTQ, "-o", tmp_path / "r.json", "--save", blocker],
                         "--save"),
        "same-path": ([*PTQ, "-o", tmp_path / "x", "--save", tmp_path / "x"], "same path"),
        "eval-o": (["eval", "-m", "digits_cnn", "-o", blocker / "sub" / "e.json"],
                   "is a file, not a folder"),
        "info-json": (["info", "-m", "digits_cnn", "--json", tmp_path / "a_folder"],
                      "is a folder"),
        "demo": (["demo", "--output-dir", blocker], "is a file, not a folder"),
    }[case]
    before = listing(tmp_path)
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and expect in err and str(tmp_path) in err
    assert listing(tmp_path) == before


def test_unwritable_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr("lowbit.outputs.os.access", lambda *a: False)
    with pytest.raises(lowbit.errors.OutputError, match="permission denied"):
        check_file(tmp_path / "new" / "r.json", "-o")
    with pytest.raises(lowbit.errors.OutputError, match=f"cannot write in {tmp_path}"):
        check_folder(tmp_path / "new", "--save")


def test_failed_save_leaves_no_results_file(tmp_path, capsys, monkeypatch):
    import lowbit.pipeline

    def disk_full(*a, **k):
        raise lowbit.errors.OutputError("disk full")

    monkeypatch.setattr(lowbit.pipeline, "save_quantized", disk_full)
    out = tmp_path / "r.json"
    rc, _, err = run(capsys, *PTQ, "-o", out, "--save", tmp_path / "q")
    assert rc == 2 and "disk full" in err
    assert not out.exists()


def test_saved_files_follow_the_umask(tmp_path, capsys, weights):
    old = os.umask(0o022)
    try:
        rc, _, err = run(capsys, *PTQ, "-w", weights, "-o", tmp_path / "r.json",
                         "--save", tmp_path / "q")
    finally:
        os.umask(old)
    assert rc == 0, err
    for path in [tmp_path / "r.json", *(tmp_path / "q").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_save_never_replaces_a_saved_model_without_overwrite(tmp_path, capsys, weights):
    rc, _, err = run(capsys, *PTQ, "-w", weights, "--save", tmp_path / "q")
    assert rc == 0, err
    before = (tmp_path / "q" / "model.safetensors").read_bytes()
    out = tmp_path / "r.json"
    rc, _, err = run(capsys, *PTQ, "-w", weights, "--save", tmp_path / "q", "-o", out,
                     "--method", "minmax")
    assert rc == 2 and "already holds a saved model" in err and "--overwrite" in err
    assert (tmp_path / "q" / "model.safetensors").read_bytes() == before and not out.exists()
    rc, _, err = run(capsys, *PTQ, "-w", weights, "--save", tmp_path / "q", "--overwrite",
                     "--method", "minmax")
    assert rc == 0, err


@pytest.mark.parametrize("command", ["eval", "ptq", "info", "qat", "search"])
def test_nan_weights_are_refused_by_every_command(command, tmp_path, capsys):
    state = {k: v.contiguous() for k, v in get_model("digits_cnn").state_dict().items()}
    state["fc.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    argv = {"eval": ["eval", "-m", "digits_cnn"], "ptq": PTQ, "info": ["info", "-m", "digits_cnn"],
            "qat": [*QAT, "-o", tmp_path / "run"], "search": [*SEARCH, "-o", tmp_path / "s"]}
    rc, _, err = run(capsys, *argv[command], "-w", bad)
    assert rc == 2 and "NaN or Inf" in err and "'fc.weight'" in err


@pytest.mark.parametrize("model,dataset,expect", [
    ("digits_cnn", "cifar10", "digits_cnn takes 1-channel 8x8 inputs; cifar10 gives 3x32x32"),
    ("resnet20", "digits", "resnet20 takes 3-channel 32x32 inputs; digits gives 1x8x8"),
    ("digits_cnn", "imagenette", "digits_cnn takes 1-channel 8x8 inputs; imagenette gives "
                                 "3-channel"),
])
def test_input_shape_mismatch_is_named(model, dataset, expect, capsys):
    rc, _, err = run(capsys, "eval", "-m", model, "-d", dataset, "--random-init")
    assert rc == 2 and expect in err


@pytest.mark.parametrize("command", ["eval", "ptq", "qat", "search"])
def test_pretrained_model_without_weights_is_refused(command, tmp_path, capsys):
    argv = {"eval": ["eval"], "ptq": ["ptq"], "qat": ["qat", "--method", "lsq"],
            "search": ["search", "-b", "3"]}[command]
    rc, _, err = run(capsys, *argv, "-m", "resnet20", "--data-root", tmp_path / "none")
    assert rc == 2 and "-w FILE" in err and "--random-init" in err
    assert listing(tmp_path) == []
    rc, _, err = run(capsys, "eval", "-m", "digits_cnn", "-w", tmp_path / "w", "--random-init")
    assert rc == 2 and "not both" in err


def test_model_without_known_weights_warns(capsys):
    rc, _, err = run(capsys, "info", "-m", "digits_cnn")
    assert rc == 0  # info never needs weights
    rc, _, err = run(capsys, "eval", "-m", "digits_cnn", "--eval-size", "8", "--no-progress")
    assert rc == 0 and "warning: no -w/--weights given: digits_cnn runs with random" in err
    rc, _, err = run(capsys, "eval", "-m", "digits_cnn", "--eval-size", "8", "--no-progress",
                     "--random-init")
    assert rc == 0 and "warning" not in err


def test_eval_quantized_takes_the_saved_float_weights(tmp_path, capsys, weights, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative -w, then evaluated from another folder
    rc, _, err = run(capsys, *PTQ, "-w", weights.name, "--save", "q")
    assert rc == 0, err
    assert json.loads((tmp_path / "q" / "meta.json").read_text())["weights"] == str(weights)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    rc, out, err = run(capsys, "eval", "-m", "digits_cnn", "--quantized", "../q",
                       "--no-progress", "-o", "e.json")
    assert rc == 0, err
    assert f"float reference: {weights}" in out
    lines = out.splitlines()
    float_row = next(line for line in lines if line.split()[:1] == ["float"]
                     and "reference" not in line)
    q_row = next(line for line in lines if line.split()[:1] == ["quantized"])
    res = json.loads((tmp_path / "elsewhere" / "e.json").read_text())
    assert f"{res['reference_top1']:.2f}" in float_row and f"{res['top1']:.2f}" in q_row
    assert res["agreement"] > 90  # W8A8 of the same weights, not of other random ones
    rc, _, err = run(capsys, "eval", "-m", "resnet20", "--quantized", "../q")
    assert rc == 2 and "holds a quantized digits_cnn" in err


def test_qat_refuses_another_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, *QAT, "-o", out)[0] == 0
    ckpt = (out / "checkpoint.pt").read_bytes()
    rc, _, err = run(capsys, *QAT, "--method", "qil", "-o", out)
    assert rc == 2 and "not empty" in err and "--resume" in err and "--overwrite" in err
    assert (out / "checkpoint.pt").read_bytes() == ckpt
    rc, _, err = run(capsys, *QAT, "-o", out, "--resume", "--overwrite")
    assert rc == 2 and "not both" in err
    (out / "notes.txt").write_text("mine")
    rc, _, err = run(capsys, *QAT, "--method", "qil", "-o", out, "--overwrite")
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only run files
    assert json.loads((out / "results.json").read_text())["recipe"]["method"] == "qil"
    steps = (out / "steps.csv").read_text().splitlines()
    assert len(steps) == 3  # header + steps 2 and 4 of the new run only


@pytest.mark.parametrize("command", ["qat", "search", "sweep"])
def test_resume_without_a_checkpoint_exits_2(command, tmp_path, capsys):
    argv = {"qat": QAT, "search": SEARCH, "sweep": [*SEARCH, "-b", "5"]}[command]
    rc, _, err = run(capsys, *argv, "-o", tmp_path / "new", "--resume")
    assert rc == 2 and "--resume: no checkpoint in" in err
    rc, _, err = run(capsys, *argv, "--resume")
    assert rc == 2 and "--resume needs -o" in err
    assert listing(tmp_path) == []


def test_search_refuses_another_run_folder(tmp_path, capsys):
    out = tmp_path / "s"
    assert run(capsys, *SEARCH, "-o", out)[0] == 0
    rc, _, err = run(capsys, *SEARCH, "-o", out)
    assert rc == 2 and "--resume" in err and "--overwrite" in err
    assert run(capsys, *SEARCH, "-o", out, "--resume")[0] == 0
    assert run(capsys, *SEARCH, "-o", out, "--overwrite")[0] == 0


def test_resume_extends_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, *QAT, "-o", out)[0] == 0
    first = json.loads((out / "results.json").read_text())["history"]
    longer = [a if a != "1" else "2" for a in QAT]  # --epochs 2
    rc, _, err = run(capsys, *longer, "-o", out, "--resume")
    assert rc == 0, err
    history = json.loads((out / "results.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2] and history[0] == first[0]
    steps = [int(line.split(",")[2]) for line in (out / "steps.csv").read_text().splitlines()[1:]]
    assert steps == [2, 4, 6, 8]
    rc, _, err = run(capsys, *QAT, "-o", out, "--resume")
    assert rc == 2 and "has trained 2 epochs" in err and "--epochs 2 or more" in err


def test_resume_drops_the_step_rows_of_an_interrupted_epoch(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, *QAT, "-o", out)[0] == 0
    with (out / "steps.csv").open("a") as f:  # an epoch 2 cut short after its first log line
        f.write("0,1,6,0.0001,2.0,10.0\n")
    longer = [a if a != "1" else "2" for a in QAT]
    assert run(capsys, *longer, "-o", out, "--resume")[0] == 0
    rows = [line.split(",") for line in (out / "steps.csv").read_text().splitlines()[1:]]
    assert [int(r[2]) for r in rows] == [2, 4, 6, 8]
    assert rows[2][4] != "2.0"  # step 6 as retrained, not the interrupted run's row


def test_truncate_steps_keeps_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "steps.csv"
    path.write_text("stage,epoch,step,loss\n0,0,2,1\n0,1,4,1\n1,0,2,1\n1,0,4,1\n")
    truncate_steps(path, 1, 2)
    assert path.read_text() == "stage,epoch,step,loss\n0,0,2,1\n0,1,4,1\n1,0,2,1\n"


def test_default_run_folders_are_unique(tmp_path, capsys, monkeypatch):
    a = default_run_dir("qat", "digits_cnn", tmp_path)
    a.mkdir()
    b = default_run_dir("qat", "digits_cnn", tmp_path)
    assert a != b and a.name.startswith("qat-digits_cnn-") and not b.exists()
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, *QAT)
    assert rc == 0, err
    (made,) = (tmp_path / "lowbit-runs").iterdir()
    assert made.name.startswith("qat-digits_cnn-") and (made / "results.json").is_file()
    assert f"results in {made.relative_to(tmp_path)}" in out


def test_no_progress_logs_one_line_per_stage_and_unit(tmp_path, capsys):
    rc, _, err = run(capsys, "ptq", "-m", "digits_cnn", "--method", "brecq", "--iters", "2",
                     "--calib-size", "16", "--eval-size", "16", "--no-progress")
    assert rc == 0, err
    assert "lowbit: ptq brecq: calibrating on 16 images" in err
    assert "lowbit: reconstructed unit 1/4" in err and "lowbit: eval quantized: top-1" in err
    rc, _, err = run(capsys, *QAT, "-o", tmp_path / "run")
    assert rc == 0 and "lowbit: stage 0 epoch 1/1: loss" in err
    rc, _, err = run(capsys, "eval", "-m", "digits_cnn", "--eval-size", "8")
    assert "lowbit: eval:" not in err  # progress bars on: no log lines
