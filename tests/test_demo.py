"""The embedded default: trains on bundled digits and reports every method."""

import json

from lowbit.demo import run_demo


def test_demo_reports_every_method(tmp_path):
    lines = []
    res = run_demo(tmp_path, epochs=3, qat_epochs=1, recon_iters=10, quick_iters=5, sdq_steps=20,
                   sr_steps=0, progress=False, echo=lines.append)
    methods = {(r["method"], r["W/A"]) for r in res["rows"]}
    for m in ["ptq-minmax", "ptq-percentile", "ptq-mse"]:
        assert (m, "4/4") in methods and (m, "8/8") in methods
    for m in ["ptq-pot", "ptq-rapq-quick", "ptq-rapq", "ptq-brecq", "qat-lsq", "qat-qil"]:
        assert (m, "2/4") in methods
    sdq = [r for r in res["rows"] if r["method"] == "sdq+ebr+kd"]
    assert len(sdq) == 1 and float(sdq[0]["W/A"].split("/")[0]) <= 3.0
    rows = {(r["method"], r["W/A"]): r for r in res["rows"]}
    assert rows[("float", "32/32")]["top1"] > 60
    assert rows[("ptq-mse", "8/8")]["agree"] > 90
    assert rows[("ptq-mse", "2/4")]["size_KiB"] < rows[("ptq-mse", "8/8")]["size_KiB"]
    assert rows[("ptq-mse", "2/4")]["MBitOPs"] < rows[("ptq-mse", "8/8")]["MBitOPs"]
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    assert saved["super_resolution"] is None  # sr_steps=0 skips that part
    assert any("top1" in line for line in lines)


def test_demo_super_resolution_part(tmp_path):
    from lowbit.demo import run_sr_demo

    lines = []
    res = run_sr_demo(steps=30, recon_iters=2, progress=False, echo=lines.append)
    rows = {(r["method"], r["W/A"]): r for r in res["rows"]}
    bicubic, flt = rows[("bicubic", "-")], rows[("float", "32/32")]
    # the bicubic skip starts the net at bicubic; a few steps already improve on it
    assert flt["psnr_y"] > bicubic["psnr_y"]
    assert abs(rows[("ptq-mse", "8/8")]["drop"]) < 0.1
    assert {("ptq-mse", "4/4"), ("ptq-mse body only", "4/4"), ("ptq-brecq", "4/4")} <= set(rows)
    assert all(0 < r["ssim"] <= 1 for r in res["rows"])
    assert any("psnr_y" in line for line in lines)
