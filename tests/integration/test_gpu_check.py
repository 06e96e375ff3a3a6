"""``scripts/gpu_check.py`` on a machine without a GPU: it skips, says why, and records the skip; its helpers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from .cli import run_unchecked

REPO = Path(__file__).resolve().parents[2]
GPU_CHECK = REPO / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (``scripts`` is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_without_a_gpu_it_skips_with_a_clear_message_and_a_json(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    status, output, stdout = run_unchecked(
        sys.executable, str(GPU_CHECK), "--out", str(out), timeout=300,
        env={"CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": pythonpath}, cwd=tmp_path,
    )  # fmt: skip
    assert status == 0, output
    assert "gpu_check: no CUDA GPU is available (torch.cuda.is_available() is False); nothing to check." in stdout
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["skipped"] is True
    assert result["reason"] == "no CUDA GPU is available (torch.cuda.is_available() is False)"
    assert "Skipped" in (out / "gpu_check.md").read_text()
    assert not (tmp_path / "gpu_check_out").exists()  # --out was honoured


def test_timing_summary_gives_the_median_per_image_and_frames_per_second(gpu_check) -> None:
    summary = gpu_check.timing_summary([40.0, 10.0, 20.0, 1000.0, 30.0], batch=8)
    assert summary == {"median_ms_per_batch": 30.0, "ms_per_image": 3.75, "fps": pytest.approx(266.67), "repeats": 5}
    assert gpu_check.timing_summary([50.0], batch=1)["fps"] == 20.0


def predictions(scores, labels, offset=0.0):
    scores = np.asarray(scores, dtype=np.float32)
    maps = np.tile(scores[:, None, None], (1, 4, 4)) + offset
    return {"scores": scores, "maps": maps, "labels": np.asarray(labels, dtype=bool)}


def test_compare_predictions_applies_the_tolerances_and_ignores_the_threshold_tie(gpu_check) -> None:
    reference = predictions([0.1, 0.5, 0.9], [False, True, True])
    # within tolerance, and the tie (the image scored 0.5) may flip its label
    close = predictions([0.1 + 5e-4, 0.5 - 5e-4, 0.9], [False, False, True])
    record = gpu_check.compare_predictions(reference, close, score_atol=1e-3, map_atol=1e-3)
    assert record["max_score_diff"] == pytest.approx(5e-4, abs=1e-6)
    assert record["label_mismatches_off_tie"] == 0
    assert all(item["passed"] for item in record["checks"])

    far = predictions([0.1, 0.5, 0.9 - 2e-3], [True, True, True], offset=0.01)
    record = gpu_check.compare_predictions(reference, far, score_atol=1e-3, map_atol=1e-3)
    failed = {item["name"] for item in record["checks"] if not item["passed"]}
    assert failed == {"max score difference", "max map difference", "labels differing off the tie"}
    assert record["label_mismatches_off_tie"] == 1
    assert record["max_map_diff"] == pytest.approx(0.01, abs=1e-6)  # the maps are the scores plus 0.01

    with pytest.raises(ValueError, match="shapes differ"):
        gpu_check.compare_predictions(reference, predictions([0.1, 0.5], [False, True]), 1e-3, 1e-3)


def test_a_step_fails_on_an_error_or_a_failed_check_and_skips_fail_nothing(gpu_check) -> None:
    check = gpu_check.check
    steps = {
        "good": {"checks": [check("a", 1.0, 2.0, True)]},
        "slow": {"checks": [check("fps", 12.5, 27.0, False), check("b", 0, 0, True)]},
        "broken": {"error": "RuntimeError: CUDA out of memory"},
        "ddp": {"skipped": "needs two or more GPUs, found 1"},
    }
    assert [gpu_check.step_status(record) for record in steps.values()] == ["passed", "failed", "failed", "skipped"]
    assert gpu_check.verdict(steps) == ["slow: fps = 12.5 (limit 27)", "broken: RuntimeError: CUDA out of memory"]
    assert gpu_check.verdict({"good": steps["good"], "ddp": steps["ddp"]}) == []


def test_run_checks_records_each_step_and_goes_on_after_a_failure(gpu_check, tmp_path: Path) -> None:
    calls = []

    def failing(context):
        calls.append("failing")
        raise RuntimeError("export broke")

    def skipping(context):
        calls.append("skipping")
        return context.run("32-true")  # no fit ran: skips

    def passing(context):
        calls.append("passing")
        return {"checks": [gpu_check.check("x", 1, 1, True)], "figure": 3.5}

    steps = (("failing", failing), ("skipping", skipping), ("passing", passing))
    result = gpu_check.run_checks(gpu_check.Settings(), tmp_path, steps)
    assert calls == ["failing", "skipping", "passing"]
    records = result["steps"]
    assert records["failing"]["status"] == "failed"
    assert records["failing"]["error"] == "RuntimeError: export broke"
    assert "export broke" in records["failing"]["traceback"]
    assert records["skipping"]["status"] == "skipped"
    assert "32-true" in records["skipping"]["skipped"]
    assert records["passing"]["status"] == "passed" and records["passing"]["figure"] == 3.5
    assert records["runtime"]["status"] == "passed"  # the fake steps take no time
    assert result["passed"] is False
    assert result["failures"] == ["failing: RuntimeError: export broke"]


def fake_result(gpu_check, passed: bool) -> dict:
    check = gpu_check.check
    fps = 120.0 if passed else 12.0
    summary = gpu_check.timing_summary
    rows = [
        {"size": 256, "batch": 1, "pipeline": summary([1000 / fps], 1), "encoder": summary([2.0], 1)},
        {"size": 512, "batch": 8, "pipeline": summary([80.0], 8), "encoder": summary([20.0], 8)},
    ]
    timing = {"rows": rows, "checks": [check("pipeline fps at 256², batch 1", fps, 27.0, fps >= 27.0)]}
    steps = {
        "environment": {"devices": ["NVIDIA H200"], "torch": "2.9.0"},
        "cuda_vs_cpu": {"checks": [check("max score difference", 2.5e-5, 1e-3, True)], "max_score_diff": math.nan},
        "timing": timing,
        "ddp": {"skipped": "needs two or more GPUs, found 1"},
    }
    for record in steps.values():
        record["status"] = gpu_check.step_status(record)
        record["seconds"] = 1.5
    failures = gpu_check.verdict(steps)
    return {"skipped": False, "passed": not failures, "failures": failures, "wall_s": 150.0, "steps": steps}


def test_markdown_summary_states_the_verdict_failures_checks_and_speed(gpu_check) -> None:
    text = gpu_check.markdown_summary(fake_result(gpu_check, passed=False))
    assert "**FAILED** in 150 s." in text
    assert "Devices: NVIDIA H200; torch 2.9.0." in text
    assert "- timing: pipeline fps at 256², batch 1 = 12 (limit 27)" in text
    assert "| timing | pipeline fps at 256², batch 1 | 12 | 27 | **no** |" in text
    assert "| cuda_vs_cpu | max score difference | 2.50e-05 | 1.00e-03 | yes |" in text
    assert "| ddp | skipped | 1.5 | needs two or more GPUs, found 1 |" in text
    # 256² batch 1: 83.33 ms per image (12 fps) against an encoder of 2 ms; 512² batch 8: 10 ms against 2.5 ms
    assert "| 256² | 1 | 83.33 | 12 | 2 | 500 | 41.67 |" in text
    assert "| 512² | 8 | 10 | 100 | 2.5 | 400 | 4 |" in text
    passed = gpu_check.markdown_summary(fake_result(gpu_check, passed=True))
    assert "**PASSED**" in passed and "## Failures" not in passed
    skipped = gpu_check.markdown_summary({"skipped": True, "reason": "no CUDA GPU"})
    assert "**Skipped**: no CUDA GPU." in skipped


def test_main_exits_1_on_a_failed_check_and_0_when_all_pass(gpu_check, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: True)
    for passed, code in ((False, 1), (True, 0)):
        monkeypatch.setattr(gpu_check, "run_checks", lambda settings, work, p=passed: fake_result(gpu_check, p))
        out = tmp_path / str(passed)
        assert gpu_check.main(["--out", str(out)]) == code
        result = json.loads((out / "gpu_check.json").read_text())  # strict JSON: NaN is written as text
        assert result["passed"] is passed and result["skipped"] is False
        assert result["steps"]["cuda_vs_cpu"]["max_score_diff"] == "nan"
        assert (out / "gpu_check.md").read_text().startswith("# CflowPlus GPU check")
