"""GPU check of CflowPlus: train, test, export, CUDA/CPU parity, speed and DDP on a CUDA machine, in one command.

Run from the repository root, with the package installed (``pip install .``) or ``PYTHONPATH=.``:

    python scripts/gpu_check.py [--out gpu_check_out]

Expected runtime: 2-3 minutes on one H200, an estimate from a CPU run of every step (not yet measured on a GPU);
the budget is 5 minutes on one GPU, and the run checks it. With two or more GPUs the DDP step adds about a minute.
Without a CUDA GPU it prints "gpu_check: no CUDA GPU is available ...", writes ``{"skipped": true, "reason": ...}``
and exits 0 at once (torch is the only heavy import before that check).

What it checks, each step on its own (a step that raises is recorded as failed, with its message, and the next
step runs), on a small seeded demo dataset (grass, 256 px, 32 training and 16 test images, 2 epochs):

1. ``fit_32-true`` / ``fit_16-mixed``: ``Engine(accelerator="gpu", devices=1)`` fits and tests at each precision:
   no skipped optimizer step, finite float32 decoders, image AUROC >= 0.9. The 16-mixed run keeps its weights,
   calibration and thresholds in float32 and its normalized test scores stay within 5e-3 of the 32-true run's
   (the tolerance of ``tests/integration/test_mixed_precision.py``: the two runs' decoders differ only by the
   rounding of float16 training products).
2. ``cuda_vs_cpu``: the 32-true model scores the test images on CUDA and on the CPU (the whole pipeline: pre-
   processing, model, post-processing). Normalized scores and maps must agree within 1e-3, labels must agree off
   the threshold's tie. TF32 is switched off for this step (``torch.backends.cuda.matmul.allow_tf32`` and
   ``torch.backends.cudnn.allow_tf32`` False; cuDNN convolutions use TF32 by default on Ampere and later, which
   rounds products to a 10-bit mantissa, about 1e-3 relative, a difference of rounding, not of behaviour), so that
   what remains is float32 kernels summing in another order: ~1e-6 relative on the features, at most ~1e-4 once
   normalized, so 1e-3 leaves a 10x margin. The difference with TF32 on is reported too, unchecked.
3. ``export_onnx`` / ``export_openvino``: ``Engine.export`` at 256 x 256; onnxruntime (or OpenVINO reading the ONNX
   file when onnxruntime is missing) and OpenVINO (CPU, ``INFERENCE_PRECISION_HINT=f32``) match the torch CPU
   model: scores within 1e-4, maps within 1e-3, labels off the tie (the tolerances of ``test_export.py``).
4. ``timing``: the whole pipeline (the Lightning module's ``forward`` in eval mode: pre-processing, model, post-
   processing) against the encoder alone (``model.model.encode``), batch 1 and 8 at 256² and 512², on CUDA with
   ``torch.cuda.synchronize``; warm-up calls, then the median of repeats; ms per image and frames per second. The
   512² pipeline is the 256-px model with a 512-px pre-processor (its scores are not meaningful, its speed is).
   The paper's 27 frames per second at 256 px, batch 1, is the floor for the whole pipeline.
5. ``ddp`` (two or more GPUs; skipped otherwise): ``tests/integration/test_ddp.py``'s run on two GPUs with the
   ``nccl`` backend, through anomalib's CLI: both processes hold identical decoders and calibration, each saw half
   the images, and its test AUROCs are within 0.05 (image) / 0.03 (pixel) of the single-GPU 32-true fit's.
6. ``runtime``: the whole run took under 5 minutes.

It writes ``gpu_check.json`` (every figure, each check with its value and limit) and ``gpu_check.md`` (a summary)
into ``--out``, and exits 0 when every check passed, 1 when one failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SKIP_REASON = "no CUDA GPU is available (torch.cuda.is_available() is False)"
PAPER_FPS_FLOOR = 27.0  # CFLOW-AD's frames per second at 256 px, batch 1 (Gudovskiy et al., WACV 2022)
RUNTIME_LIMIT_S = 300.0
F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # OpenVINO's CPU plugin may run FP32 models in bf16 unless told otherwise
TOLERANCES = {
    "mixed_vs_32_score": 5e-3,
    "cuda_vs_cpu_score": 1e-3,
    "cuda_vs_cpu_map": 1e-3,
    "export_score": 1e-4,
    "export_map": 1e-3,
    "mixed_auroc_drop": 0.02,
    "ddp_image_auroc_drop": 0.05,
    "ddp_pixel_auroc_drop": 0.03,
}
MIN_IMAGE_AUROC = 0.9
_METRIC_ROW = re.compile(r"(\w+)\s*[│|]\s*([-+0-9.eE]+)\s*[│|]")  # a row of anomalib's test table
_BACKEND = re.compile(r"distributed_backend=(\w+)")


@dataclass(frozen=True)
class Settings:
    """The sizes of the run; the defaults fit the 5-minute budget on one GPU."""

    image_size: int = 256
    category: str = "grass"
    n_train: int = 32
    n_test_good: int = 8
    n_test_defect: int = 2  # per defect type: 8 defective test images
    epochs: int = 2
    seed: int = 42
    train_batch_size: int = 8
    eval_batch_size: int = 8
    timing_sizes: tuple[int, ...] = (256, 512)
    timing_batches: tuple[int, ...] = (1, 8)
    warmup: int = 5
    repeats: int = 20
    accelerator: str = "gpu"  # "cpu" only to exercise the code paths on a machine without a GPU
    ddp_timeout_s: int = 240


class StepSkipped(Exception):  # noqa: N818 - a skip, not an error
    """A step that cannot run here (too few GPUs, a step it needs failed)."""


@dataclass
class Context:
    """What the steps hand on to later ones."""

    settings: Settings
    work: Path
    data_root: Path | None = None
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # precision -> model, engine, metrics, scores
    images: Any = None  # the test images (N, 3, H, W), in [0, 1]
    cpu_reference: dict[str, Any] | None = None  # the torch CPU pipeline's scores, maps and labels

    def run(self, precision: str) -> dict[str, Any]:
        """Return the fit at ``precision``, or skip the calling step when that fit failed."""
        if precision not in self.runs:
            msg = f"needs the {precision} model, whose fit failed"
            raise StepSkipped(msg)
        return self.runs[precision]


# ------------------------------------------------------------------------------------------------ pure helpers


def check(name: str, value: Any, limit: Any, passed: bool) -> dict[str, Any]:
    """One check's record: what was measured, against what, and whether it passed."""
    return {"name": name, "value": value, "limit": limit, "passed": bool(passed)}


def timing_summary(samples_ms: Sequence[float], batch: int) -> dict[str, float]:
    """Median milliseconds per batch of ``samples_ms``, per image, and frames (images) per second."""
    median = statistics.median(samples_ms)
    return {
        "median_ms_per_batch": round(median, 4),
        "ms_per_image": round(median / batch, 4),
        "fps": round(1000.0 * batch / median, 2) if median > 0 else math.inf,
        "repeats": len(samples_ms),
    }


def compare_predictions(
    reference: dict[str, Any], actual: dict[str, Any], score_atol: float, map_atol: float
) -> dict[str, Any]:
    """Largest score and map differences of ``actual`` from ``reference``, and label disagreements off the tie.

    Both hold numpy-like ``scores (N,)``, ``maps (N, ...)`` and ``labels (N,)``. anomalib's adaptive threshold sits
    on one validation image's score (normalized to 0.5); labels of scores within ``score_atol`` of 0.5 are a tie
    that rounding may break either way and are not compared.
    """
    import numpy as np

    ref_scores = np.asarray(reference["scores"], dtype=np.float64).reshape(-1)
    scores = np.asarray(actual["scores"], dtype=np.float64).reshape(-1)
    ref_maps = np.asarray(reference["maps"], dtype=np.float64).reshape(len(ref_scores), -1)
    maps = np.asarray(actual["maps"], dtype=np.float64).reshape(len(scores), -1)
    if ref_scores.shape != scores.shape or ref_maps.shape != maps.shape:
        msg = f"shapes differ: scores {ref_scores.shape} vs {scores.shape}, maps {ref_maps.shape} vs {maps.shape}"
        raise ValueError(msg)
    off_tie = np.abs(ref_scores - 0.5) > score_atol
    ref_labels = np.asarray(reference["labels"]).reshape(-1).astype(bool)
    labels = np.asarray(actual["labels"]).reshape(-1).astype(bool)
    max_score = float(np.abs(ref_scores - scores).max()) if scores.size else 0.0
    max_map = float(np.abs(ref_maps - maps).max()) if maps.size else 0.0
    mismatches = int(((ref_labels != labels) & off_tie).sum())
    return {
        "images": len(scores),
        "max_score_diff": max_score,
        "max_map_diff": max_map,
        "label_mismatches_off_tie": mismatches,
        "checks": [
            check("max score difference", max_score, score_atol, max_score <= score_atol),
            check("max map difference", max_map, map_atol, max_map <= map_atol),
            check("labels differing off the tie", mismatches, 0, mismatches == 0),
        ],
    }


def step_status(record: dict[str, Any]) -> str:
    """``"failed"`` for an error or a failed check, ``"skipped"`` for a skip, else ``"passed"``."""
    if "error" in record or not all(item["passed"] for item in record.get("checks", [])):
        return "failed"
    return "skipped" if "skipped" in record else "passed"


def verdict(steps: dict[str, dict[str, Any]]) -> list[str]:
    """List the failures of a run, one line each (none: every check passed); skipped steps fail nothing."""
    failures = []
    for name, record in steps.items():
        if "error" in record:
            failures.append(f"{name}: {record['error']}")
        failures.extend(
            f"{name}: {item['name']} = {format_value(item['value'])} (limit {format_value(item['limit'])})"
            for item in record.get("checks", [])
            if not item["passed"]
        )
    return failures


def format_value(value: Any) -> str:
    """Format a figure: floats with 4 significant digits (small ones in scientific notation)."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.4g}"


def markdown_summary(result: dict[str, Any]) -> str:
    """Summarize a result in markdown: the verdict, the failures, the steps, the checks and the speed table."""
    if result.get("skipped"):
        return f"# CflowPlus GPU check\n\n**Skipped**: {result['reason']}.\n"
    lines = ["# CflowPlus GPU check", ""]
    lines.append(f"**{'PASSED' if result['passed'] else 'FAILED'}** in {format_value(result.get('wall_s', 0.0))} s.")
    environment = result.get("steps", {}).get("environment", {})
    if environment.get("devices"):
        lines.append(f"Devices: {', '.join(environment['devices'])}; torch {environment.get('torch', '?')}.")
    if result.get("failures"):
        lines += ["", "## Failures", "", *(f"- {failure}" for failure in result["failures"])]
    lines += ["", "## Steps", "", "| step | status | seconds | checks |", "| --- | --- | --- | --- |"]
    for name, record in result.get("steps", {}).items():
        checks = record.get("checks", [])
        passed = f"{sum(item['passed'] for item in checks)}/{len(checks)}" if checks else "-"
        note = record.get("skipped") or record.get("error") or passed
        lines.append(f"| {name} | {record['status']} | {format_value(record.get('seconds', 0.0))} | {note} |")
    lines += ["", "## Checks", "", "| step | check | value | limit | ok |", "| --- | --- | --- | --- | --- |"]
    for name, record in result.get("steps", {}).items():
        lines.extend(
            f"| {name} | {item['name']} | {format_value(item['value'])} | {format_value(item['limit'])} | "
            f"{'yes' if item['passed'] else '**no**'} |"
            for item in record.get("checks", [])
        )
    rows = result.get("steps", {}).get("timing", {}).get("rows", [])
    if rows:
        lines += [
            "",
            "## Speed (median; frames per second = images per second)",
            "",
            "| size | batch | pipeline ms/image | pipeline fps | encoder ms/image | encoder fps | pipeline / encoder |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in rows:
            pipeline, encoder = row["pipeline"], row["encoder"]
            ratio = pipeline["ms_per_image"] / encoder["ms_per_image"] if encoder["ms_per_image"] else math.inf
            lines.append(
                f"| {row['size']}² | {row['batch']} | {format_value(pipeline['ms_per_image'])} | "
                f"{format_value(pipeline['fps'])} | {format_value(encoder['ms_per_image'])} | "
                f"{format_value(encoder['fps'])} | {format_value(ratio)} |"
            )
        lines.append(f"\nFloor: {PAPER_FPS_FLOOR:g} fps for the whole pipeline at 256², batch 1 (the paper's).")
    lines += ["", "Tolerances: " + ", ".join(f"{key} {value:g}" for key, value in TOLERANCES.items()) + "."]
    return "\n".join(lines) + "\n"


def jsonable(value: Any) -> Any:
    """``value`` with paths as text and non-finite floats as text, so that the JSON is strict."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    """Write ``gpu_check.json`` and ``gpu_check.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(jsonable(result), indent=1, allow_nan=False) + "\n")
    (out / "gpu_check.md").write_text(markdown_summary(result))


# ------------------------------------------------------------------------------------------------ the steps


def torch_device(settings: Settings):
    """Return the device the checks run on: CUDA, or the CPU when exercising the code without a GPU."""
    import torch

    return torch.device("cuda" if settings.accelerator == "gpu" else "cpu")


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_environment(context: Context) -> dict[str, Any]:
    """Versions and devices."""
    import anomalib
    import lightning
    import torch

    record: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "anomalib": anomalib.__version__}
    record["lightning"] = lightning.__version__
    record["gpu_count"] = torch.cuda.device_count()
    record["devices"] = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    record["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    record["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    record["settings"] = asdict(context.settings)
    return record


def step_data(context: Context) -> dict[str, Any]:
    """Write the seeded demo dataset; keep its test images as one tensor."""
    import torch
    from anomalib.data.utils import read_image

    from anomalib_cflow_plus.data import generate_demo_dataset

    settings = context.settings
    context.data_root = generate_demo_dataset(
        context.work / "data", textures=(settings.category,), seed=0, image_size=settings.image_size,
        n_train=settings.n_train, n_test_good=settings.n_test_good, n_test_defect=settings.n_test_defect,
    )  # fmt: skip
    paths = sorted((context.data_root / settings.category / "test").rglob("*.png"))
    context.images = torch.stack([read_image(path, as_tensor=True) for path in paths])
    return {"root": context.data_root, "test_images": len(paths), "image_shape": list(context.images.shape[1:])}


def datamodule(context: Context, train_batch_size: int | None = None):
    """Return anomalib's MVTecAD datamodule over the demo dataset."""
    from anomalib.data import MVTecAD

    if context.data_root is None:
        msg = "needs the demo dataset, whose step failed"
        raise StepSkipped(msg)
    settings = context.settings
    return MVTecAD(
        root=context.data_root, category=settings.category, num_workers=0,
        train_batch_size=train_batch_size or settings.train_batch_size, eval_batch_size=settings.eval_batch_size,
    )  # fmt: skip


def fit_and_test(context: Context, precision: str) -> dict[str, Any]:
    """Seeded fit and test at ``precision``; keep the model, engine, metrics and normalized test scores."""
    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_cflow_plus import CflowPlus

    data = datamodule(context)
    seed_everything(context.settings.seed)
    model = CflowPlus()
    engine = Engine(
        max_epochs=context.settings.epochs, default_root_dir=context.work / f"run_{precision}",
        accelerator=context.settings.accelerator, devices=1, logger=False, precision=precision,
    )  # fmt: skip
    start = time.perf_counter()
    engine.fit(model, datamodule=data)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = {name: float(value) for name, value in engine.test(model, datamodule=data)[0].items()}
    test_s = time.perf_counter() - start
    batches = engine.predict(model, datamodule=data, return_predictions=True)
    scores = torch.cat([batch.pred_score.detach().float().flatten().cpu() for batch in batches])
    context.runs[precision] = {"model": model, "engine": engine, "metrics": metrics, "scores": scores}
    skipped = model.decoder_training.skipped_steps
    decoders_finite = all(bool(torch.isfinite(p).all()) for p in model.model.decoders.parameters())
    float32 = all(p.dtype == torch.float32 for p in model.model.parameters())
    auroc = metrics.get("image_AUROC", math.nan)
    return {
        "fit_s": round(fit_s, 2),
        "test_s": round(test_s, 2),
        "precision_plugin": type(engine.trainer.precision_plugin).__name__,
        "trainer_precision": engine.trainer.precision,
        "metrics": metrics,
        "checks": [
            check("skipped optimizer steps", skipped, 0, skipped == 0),
            check("decoder weights finite", decoders_finite, True, decoders_finite),
            check("weights float32", float32, True, float32),
            check("image AUROC", auroc, MIN_IMAGE_AUROC, auroc >= MIN_IMAGE_AUROC),
        ],
    }


def step_fit_32(context: Context) -> dict[str, Any]:
    """Fit and test at 32-true."""
    return fit_and_test(context, "32-true")


def step_fit_16(context: Context) -> dict[str, Any]:
    """Fit and test at 16-mixed: float32 scoring state, scores close to the 32-true fit's."""
    import torch

    record = fit_and_test(context, "16-mixed")
    run = context.runs["16-mixed"]
    model = run["model"]
    calibration_float32 = all(
        value.dtype == torch.float32
        for value in model.model.anomaly_map.state_dict().values()
        if value.is_floating_point()
    )
    threshold_dtype = str(model.post_processor.image_threshold.dtype)
    record["checks"] += [
        check("trainer precision", record["trainer_precision"], "16-mixed", record["trainer_precision"] == "16-mixed"),
        check("calibration float32", calibration_float32, True, calibration_float32),
        check("image threshold dtype", threshold_dtype, "torch.float32", threshold_dtype == "torch.float32"),
    ]
    if "32-true" in context.runs:
        reference = context.runs["32-true"]
        difference = float((run["scores"] - reference["scores"]).abs().max())
        tolerance = TOLERANCES["mixed_vs_32_score"]
        record["checks"].append(
            check("max score difference to 32-true", difference, tolerance, difference <= tolerance)
        )
        drop = reference["metrics"]["image_AUROC"] - record["metrics"]["image_AUROC"]
        limit = TOLERANCES["mixed_auroc_drop"]
        record["checks"].append(check("image AUROC drop from 32-true", drop, limit, drop <= limit))
    else:
        record["note"] = "the 32-true fit failed: no comparison"
    return record


def predict_pipeline(module, images, device) -> dict[str, Any]:
    """Score ``images`` on ``device`` with the whole pipeline (eval-mode ``forward``): numpy scores, maps, labels."""
    import torch

    module = module.to(device).eval()
    with torch.no_grad():
        prediction = module(images.to(device))
    synchronize(device)
    return {
        "scores": prediction.pred_score.detach().float().cpu().numpy().reshape(-1),
        "maps": prediction.anomaly_map.detach().float().cpu().numpy(),
        "labels": prediction.pred_label.detach().cpu().numpy().reshape(-1),
    }


def cpu_reference(context: Context) -> dict[str, Any]:
    """Return the 32-true model's CPU predictions of the test images (computed once)."""
    import torch

    if context.cpu_reference is None:
        model = context.run("32-true")["model"]
        context.cpu_reference = predict_pipeline(model, context.images, torch.device("cpu"))
    return context.cpu_reference


def step_cuda_vs_cpu(context: Context) -> dict[str, Any]:
    """CUDA against CPU scores of the 32-true pipeline, with TF32 off; the TF32-on difference is reported."""
    import torch

    model = context.run("32-true")["model"]
    reference = cpu_reference(context)
    device = torch_device(context.settings)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        strict = predict_pipeline(model, context.images, device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        tf32 = predict_pipeline(model, context.images, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        model.cpu()
    record = compare_predictions(
        reference, strict, TOLERANCES["cuda_vs_cpu_score"], TOLERANCES["cuda_vs_cpu_map"]
    )  # fmt: skip
    with_tf32 = compare_predictions(reference, tf32, math.inf, math.inf)
    record["tf32"] = "off (torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False)"
    record["with_tf32_on"] = {key: with_tf32[key] for key in ("max_score_diff", "max_map_diff")}
    record["labels_seen"] = sorted({bool(label) for label in reference["labels"]})
    return record


def export(context: Context, export_type: str) -> Path:
    """``Engine.export`` of the 32-true model (on the CPU) at the dataset's image size."""
    from anomalib.deploy import ExportType

    run = context.run("32-true")
    model = run["model"].cpu().eval()
    size = context.settings.image_size
    return Path(
        run["engine"].export(
            model, ExportType(export_type), export_root=context.work / export_type, input_size=(size, size)
        )
    )


def predict_exported(predict: Callable[[Any], dict[str, Any]], images) -> dict[str, Any]:
    """Per-image predictions of an exported model, ``predict(image (1, 3, H, W) array) -> outputs by name``."""
    import numpy as np

    outputs = [predict(image[None].numpy()) for image in images]
    return {
        "scores": np.concatenate([np.asarray(output["pred_score"]).reshape(-1) for output in outputs]),
        "maps": np.stack([np.asarray(output["anomaly_map"]).squeeze() for output in outputs]),
        "labels": np.concatenate([np.asarray(output["pred_label"]).reshape(-1) for output in outputs]),
    }


def openvino_predict(path: Path) -> Callable[[Any], dict[str, Any]]:
    """Compile an OpenVINO model (IR or ONNX file) for the CPU at full float32 precision."""
    import openvino as ov

    compiled = ov.Core().compile_model(ov.Core().read_model(str(path)), "CPU", F32)

    def predict(image):
        outputs = compiled(image)
        return {name: outputs[name] for name in ("pred_score", "pred_label", "anomaly_map")}

    return predict


def step_export_onnx(context: Context) -> dict[str, Any]:
    """Export to ONNX; onnxruntime (else OpenVINO on the ONNX file) matches the torch CPU pipeline."""
    start = time.perf_counter()
    path = export(context, "onnx")
    export_s = time.perf_counter() - start
    try:
        import onnxruntime as ort
    except ImportError:
        runtime, predict = (
            "openvino (CPU, f32) reading the ONNX file; onnxruntime is not installed",
            openvino_predict(path),
        )
    else:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        runtime = f"onnxruntime {ort.__version__} (CPU)"

        def predict(image):
            return dict(zip(names, session.run(None, {session.get_inputs()[0].name: image}), strict=True))

    record = compare_predictions(
        cpu_reference(context), predict_exported(predict, context.images),
        TOLERANCES["export_score"], TOLERANCES["export_map"],
    )  # fmt: skip
    return {"path": path, "export_s": round(export_s, 2), "mbytes": round(path.stat().st_size / 2**20, 2),
            "runtime": runtime, **record}  # fmt: skip


def step_export_openvino(context: Context) -> dict[str, Any]:
    """Export to OpenVINO; its CPU model (f32) matches the torch CPU pipeline."""
    import openvino as ov

    start = time.perf_counter()
    path = export(context, "openvino")
    export_s = time.perf_counter() - start
    record = compare_predictions(
        cpu_reference(context), predict_exported(openvino_predict(path), context.images),
        TOLERANCES["export_score"], TOLERANCES["export_map"],
    )  # fmt: skip
    return {"path": path, "export_s": round(export_s, 2), "openvino": ov.__version__, **record}


def pipeline_at(trained, size: int, trained_size: int):
    """Copy ``trained`` (a CflowPlus) with a pre-processor that resizes to ``size`` x ``size``, for timing.

    Position statistics (if the calibration kept any) belong to the trained grid; at another size they are
    dropped, so the copy scores as ``image_calibration="layer"`` does.
    """
    from anomalib_cflow_plus import CflowPlus

    module = CflowPlus(
        backbone=trained.backbone, pre_trained=False, pre_processor=CflowPlus.configure_pre_processor((size, size)),
        evaluator=False, visualizer=False,
    )  # fmt: skip
    module.model = copy.deepcopy(trained.model)
    module.post_processor = copy.deepcopy(trained.post_processor)
    calibration = module.model.anomaly_map
    if size != trained_size and calibration.position_calibrated:
        calibration.set_calibration(
            calibration.layer_max.clone(), calibration.layer_mean.clone(), calibration.layer_std.clone()
        )
    return module.eval()


def time_ms(function: Callable[[], Any], device, warmup: int, repeats: int) -> list[float]:
    """Wall milliseconds of ``repeats`` calls of ``function`` after ``warmup`` calls, each synchronized."""
    for _ in range(warmup):
        function()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def step_timing(context: Context) -> dict[str, Any]:
    """Whole pipeline against encoder alone, per size and batch; the paper's floor at 256², batch 1."""
    import torch

    settings = context.settings
    trained = context.run("32-true")["model"]
    device = torch_device(settings)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for size in settings.timing_sizes:
        module = pipeline_at(trained, size, settings.image_size).to(device)
        for batch in settings.timing_batches:
            images = torch.rand(batch, 3, size, size, generator=generator).to(device)
            with torch.no_grad():
                features_input = module.pre_processor(images)
                pipeline = time_ms(lambda m=module, x=images: m(x), device, settings.warmup, settings.repeats)
                encoder = time_ms(
                    lambda m=module, x=features_input: m.model.encode(x), device, settings.warmup, settings.repeats
                )
            rows.append({"size": size, "batch": batch, "pipeline": timing_summary(pipeline, batch),
                         "encoder": timing_summary(encoder, batch)})  # fmt: skip
        del module
    record: dict[str, Any] = {"rows": rows, "device": str(device), "warmup": settings.warmup}
    floor_rows = [row for row in rows if row["size"] == 256 and row["batch"] == 1]
    if floor_rows:
        fps = floor_rows[0]["pipeline"]["fps"]
        record["checks"] = [check("pipeline fps at 256², batch 1", fps, PAPER_FPS_FLOOR, fps >= PAPER_FPS_FLOOR)]
    return record


def ddp_command(context: Context, devices: int) -> list[str]:
    """``tests/integration/test_ddp.py``'s CLI run, on ``devices`` GPUs with the nccl backend."""
    settings = context.settings
    anomalib = Path(sys.executable).with_name("anomalib")
    executable = str(anomalib) if anomalib.exists() else (shutil.which("anomalib") or "anomalib")
    accelerator = settings.accelerator
    backend = "nccl" if accelerator == "gpu" else "gloo"
    return [
        executable, "train", "--model", "CflowPlus",
        "--data", "anomalib.data.MVTecAD", "--data.root", str(context.data_root), "--data.category", settings.category,
        "--data.train_batch_size", str(settings.train_batch_size // devices),
        "--data.eval_batch_size", str(settings.eval_batch_size), "--data.num_workers", "0",
        "--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy",
        "--trainer.strategy.process_group_backend", backend,
        "--trainer.devices", str(devices), "--trainer.accelerator", accelerator,
        "--trainer.max_epochs", str(settings.epochs),
        "--trainer.callbacks+=tests.integration.ddp_probe.DecoderFingerprint",
        "--default_root_dir", str(context.work / "ddp"), "--seed_everything", str(settings.seed),
    ]  # fmt: skip


def run_in_session(command: Sequence[str], environment: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``command`` in its own session; on a timeout, end it and the processes it started (the DDP ranks)."""
    import signal

    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, cwd=REPO_ROOT,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return -9, f"{output}\ntimed out after {timeout} s"
    return process.returncode, output


def step_ddp(context: Context, devices: int | None = None) -> dict[str, Any]:
    """Two-GPU DDP (nccl): decoders in sync on both ranks, quality of the single-GPU fit."""
    import torch

    if devices is None:
        found = torch.cuda.device_count()
        if found < 2:
            msg = f"needs two or more GPUs, found {found}"
            raise StepSkipped(msg)
        devices = 2
    single = context.run("32-true")["metrics"]
    probe = context.work / "ddp_probe"
    command = ddp_command(context, devices)
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "DDP_PROBE_DIR": str(probe), "PYTHONPATH": pythonpath}
    start = time.perf_counter()
    returncode, output = run_in_session(command, environment, context.settings.ddp_timeout_s)
    record: dict[str, Any] = {"seconds_cli": round(time.perf_counter() - start, 2), "returncode": returncode}
    if returncode != 0:
        record["error"] = f"anomalib train (DDP) exited with {returncode}: {output[-3000:]}"
        return record
    ranks = [json.loads((probe / f"rank{rank}.json").read_text()) for rank in range(devices)]
    rows = _METRIC_ROW.findall(output)
    metrics = {name: float(value) for name, value in rows if name.startswith(("image_", "pixel_"))}
    backends = sorted(set(_BACKEND.findall(output)))
    expected_backend = "nccl" if context.settings.accelerator == "gpu" else "gloo"
    expected_images = context.settings.epochs * (context.settings.n_train // devices)
    first = ranks[0]
    keys = ("decoder_sum", "decoder_norm", "layer_max", "layer_mean")
    same = {key: all(rank[key] == first[key] for rank in ranks) for key in keys}
    image_drop = single["image_AUROC"] - metrics.get("image_AUROC", math.nan)
    pixel_drop = single["pixel_AUROC"] - metrics.get("pixel_AUROC", math.nan)
    record.update(ranks=ranks, metrics=metrics, single_device_metrics=single)
    record["checks"] = [
        check("world sizes", [rank["world_size"] for rank in ranks], [devices] * devices,
              all(rank["world_size"] == devices for rank in ranks)),
        check("images seen per rank", [rank["images_seen"] for rank in ranks], expected_images,
              all(rank["images_seen"] == expected_images for rank in ranks)),
        check("process group backend (logged)", backends, [expected_backend], backends == [expected_backend]),
        *(check(f"{key} equal on all ranks", equal, True, equal) for key, equal in same.items()),
        check("skipped optimizer steps", first["skipped_steps"], 0, first["skipped_steps"] == 0),
        check("image AUROC drop from single device", image_drop, TOLERANCES["ddp_image_auroc_drop"],
              image_drop <= TOLERANCES["ddp_image_auroc_drop"]),
        check("pixel AUROC drop from single device", pixel_drop, TOLERANCES["ddp_pixel_auroc_drop"],
              pixel_drop <= TOLERANCES["ddp_pixel_auroc_drop"]),
    ]  # fmt: skip
    return record


STEPS: tuple[tuple[str, Callable[[Context], dict[str, Any]]], ...] = (
    ("environment", step_environment),
    ("data", step_data),
    ("fit_32-true", step_fit_32),
    ("fit_16-mixed", step_fit_16),
    ("cuda_vs_cpu", step_cuda_vs_cpu),
    ("export_onnx", step_export_onnx),
    ("export_openvino", step_export_openvino),
    ("timing", step_timing),
    ("ddp", step_ddp),
)


def run_step(name: str, function: Callable[[Context], dict[str, Any]], context: Context) -> dict[str, Any]:
    """Run one step; an exception becomes the step's error (the run goes on), a skip its reason."""
    import torch

    print(f"gpu_check: {name} ...", flush=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        record = function(context)
    except StepSkipped as skip:
        record = {"skipped": str(skip)}
    except Exception as error:  # every failure is recorded, and the next step runs
        record = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=-6)}
    record["seconds"] = round(time.perf_counter() - start, 2)
    if cuda:
        record["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    record["status"] = step_status(record)
    print(f"gpu_check: {name}: {record['status']} ({record['seconds']} s)", flush=True)
    return record


def run_checks(settings: Settings, work: Path, steps=STEPS) -> dict[str, Any]:
    """Run every step; return the result (steps, failures, verdict, wall time)."""
    start = time.perf_counter()
    context = Context(settings=settings, work=work)
    records = {name: run_step(name, function, context) for name, function in steps}
    wall = time.perf_counter() - start
    runtime: dict[str, Any] = {"seconds": round(wall, 1)}
    runtime["checks"] = [check("wall seconds", round(wall, 1), RUNTIME_LIMIT_S, wall <= RUNTIME_LIMIT_S)]
    runtime["status"] = step_status(runtime)
    records["runtime"] = runtime
    failures = verdict(records)
    return {"skipped": False, "passed": not failures, "failures": failures, "wall_s": round(wall, 1),
            "tolerances": TOLERANCES, "steps": records}  # fmt: skip


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU."""
    import torch

    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, skip without a GPU or run the checks, write the JSON and markdown; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder for the JSON and markdown")
    args = parser.parse_args(argv)
    if not cuda_available():
        print(f"gpu_check: {SKIP_REASON}; nothing to check.", flush=True)
        write_outputs(args.out, {"skipped": True, "reason": SKIP_REASON, "passed": None})
        return 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        result = run_checks(Settings(), Path(work))
    write_outputs(args.out, result)
    print(f"gpu_check: {'PASSED' if result['passed'] else 'FAILED'} in {result['wall_s']} s; see {args.out}/")
    for failure in result["failures"]:
        print(f"gpu_check: failed: {failure}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
