"""The lowbit command: happy paths on bundled data and a clear message for each bad input."""

import json

import pytest

from lowbit.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_info_lists_and_tabulates(capsys):
    rc, out, _ = run(capsys, "info", "--list")
    assert rc == 0 and "resnet20" in out and "cifar10" in out and "mse" in out
    rc, out, _ = run(capsys, "info", "-m", "resnet20", "--w-bits", "4", "--a-bits", "4")
    assert rc == 0
    assert "layer1.0.conv1" in out and "BitOPs" in out
    assert "first layer 'conv1': 8bit" in out


def test_ptq_save_and_eval_round_trip(capsys, tmp_path):
    out_json, saved = tmp_path / "r.json", tmp_path / "q"
    rc, out, err = run(capsys, "ptq", "-m", "digits_cnn", "--method", "minmax", "--w-bits", "4",
                       "--a-bits", "8", "--calib-size", "64", "--no-progress",
                       "-o", str(out_json), "--save", str(saved))
    assert rc == 0, err
    res = json.loads(out_json.read_text())
    assert res["method"] == "minmax" and res["config"]["weight"]["bits"] == 4
    assert 0 <= res["quantized"]["top1"] <= 100
    assert res["cost"]["bitops"] < res["float_cost"]["bitops"]
    assert {p.name for p in saved.iterdir()} == {"model.safetensors", "config.yaml", "meta.json"}
    rc, out, err = run(capsys, "eval", "-m", "digits_cnn", "--quantized", str(saved),
                       "--no-progress", "-o", str(tmp_path / "e.json"))
    assert rc == 0, err
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["top1"] == pytest.approx(res["quantized"]["top1"])


def test_unknown_model_and_dataset(capsys):
    rc, _, err = run(capsys, "eval", "-m", "resnet99")
    assert rc == 2 and "unknown model 'resnet99'" in err and "resnet20" in err
    rc, _, err = run(capsys, "eval", "-m", "digits_cnn", "-d", "mnist")
    assert rc == 2 and "unknown dataset 'mnist'" in err


def test_missing_dataset_path(capsys, tmp_path):
    out = tmp_path / "r.json"
    rc, _, err = run(capsys, "ptq", "-m", "resnet20", "--random-init",
                     "--data-root", str(tmp_path / "nowhere"), "-o", str(out))
    assert rc == 2 and "CIFAR-10 not found" in err and "--data-root" in err
    assert not out.exists()


def test_corrupt_and_mismatched_checkpoints(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    rc, _, err = run(capsys, "eval", "-m", "digits_cnn", "-w", str(bad))
    assert rc == 2 and "could not read" in err
    from safetensors.torch import save_file

    from lowbit.models import get_model

    state = get_model("resnet20").state_dict()
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(other))
    rc, _, err = run(capsys, "eval", "-m", "digits_cnn", "-w", str(other))
    assert rc == 2 and "missing" in err and "unexpected" in err


def test_bad_bits_and_config(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["ptq", "-m", "digits_cnn", "--w-bits", "9"])
    assert e.value.code == 2
    assert "bits must be from 1 to 8" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("weight: {bits: 12}\n")
    rc, _, err = run(capsys, "ptq", "-m", "digits_cnn", "--config", str(cfg))
    assert rc == 2 and "bits must be from 1 to 8" in err


def test_a_quantization_flag_beside_config_is_refused_by_name(capsys, tmp_path):
    from lowbit import QuantConfig

    cfg = tmp_path / "w8a8.yaml"
    QuantConfig.uniform(8, 8).save(cfg)
    rc, _, err = run(capsys, "ptq", "-m", "digits_cnn", "--config", str(cfg), "--w-bits", "4",
                     "--dw-act-per-channel", "--no-progress")
    assert rc == 2 and "--w-bits, --dw-act-per-channel would be ignored" in err


def test_bad_calibration_size(capsys):
    rc, _, err = run(capsys, "ptq", "-m", "digits_cnn", "--calib-size", "0", "--no-progress")
    assert rc == 2 and "subset size" in err


def test_unknown_method(capsys):
    rc, _, err = run(capsys, "ptq", "-m", "digits_cnn", "--method", "magic")
    assert rc == 2 and "unknown --method 'magic'" in err


def test_ptq_dw_act_per_channel_flag_reaches_the_saved_config(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    rc, _, err = run(capsys, "ptq", "-m", "digits_cnn", "--method", "mse", "--a-bits", "4",
                     "--dw-act-per-channel", "--calib-size", "32", "--eval-size", "32",
                     "--no-progress", "-o", str(out_json))
    assert rc == 0, err
    rules = json.loads(out_json.read_text())["config"]["layers"]
    assert rules == [{"match": "type:DepthwiseConv2d", "keep_float": False, "w_bits": None,
                      "a_bits": None, "weight": None,
                      "act": {"per_channel": True, "ch_axis": 1}}]


def test_ptq_dw_w_bits_flag_reaches_the_saved_config(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    rc, _, err = run(capsys, "ptq", "-m", "digits_cnn", "--method", "mse", "--w-bits", "4",
                     "--dw-w-bits", "8", "--calib-size", "32", "--eval-size", "32",
                     "--no-progress", "-o", str(out_json))
    assert rc == 0, err
    rules = json.loads(out_json.read_text())["config"]["layers"]
    assert [(r["match"], r["w_bits"]) for r in rules] == [("type:DepthwiseConv2d", 8)]
    with pytest.raises(SystemExit) as e:
        main(["ptq", "-m", "digits_cnn", "--dw-w-bits", "9"])
    assert e.value.code == 2 and "--dw-w-bits" in capsys.readouterr().err


def test_ptq_full_range_weights_flag_reaches_the_saved_config(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    rc, _, err = run(capsys, "ptq", "-m", "digits_cnn", "--method", "mse", "--w-bits", "2",
                     "--full-range-weights", "--calib-size", "32", "--eval-size", "32",
                     "--no-progress", "-o", str(out_json))
    assert rc == 0, err
    weight = json.loads(out_json.read_text())["config"]["weight"]
    assert weight["bits"] == 2 and weight["narrow_range"] is False


def test_ptq_table_names_the_bits_of_the_config_that_ran(capsys, tmp_path):
    from lowbit import QuantConfig

    cfg = tmp_path / "w8a8.yaml"
    QuantConfig.uniform(8, 8).save(cfg)
    rc, out, err = run(capsys, "ptq", "-m", "digits_cnn", "--method", "minmax", "--config",
                       str(cfg), "--calib-size", "32", "--eval-size", "32", "--no-progress")
    assert rc == 0, err
    assert "minmax W8A8" in out and "W4A4" not in out
