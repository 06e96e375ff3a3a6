"""INT8 (NNCF post-training quantization) against FP32 OpenVINO: accuracy on the demo data and CPU latency.

For every texture, train ``CflowPlus`` (default arguments, 3 epochs, seed 42; a checkpoint in
``out/int8/<texture>/`` is reused unless ``--retrain``), then export it with anomalib's ``Engine.export`` to
OpenVINO FP32 and to ``INT8_PTQ`` (calibrated on the training images, the scoring tail kept in FP32), and
score the test set with torch, OpenVINO FP32 (``INFERENCE_PRECISION_HINT=f32``) and OpenVINO INT8:
image AUROC, image F1 (at the exported 0.5 threshold), pixel AUROC and AUPRO. Then time, on the first
texture's exports, OpenVINO FP32 and INT8, each with the ``f32`` hint and at OpenVINO's defaults (bf16 on CPUs
that have it), round-robin (``timing.round_robin_ms``), at batch 1 and 8. ``--acq`` also times an
``INT8_ACQ`` export of the first texture (``Engine.export``'s defaults: image F1 on the validation split,
``max_drop`` 0.01).
It also exports each model to ONNX and measures parity with torch on the test split: the largest absolute
difference of ``pred_score`` and of ``anomaly_map``, and how many predicted labels agree, for ONNX Runtime and
OpenVINO FP32 (f32 hint).

Usage::

    python -m benchmarks.int8                   # brick, grass, gravel at 256 px; about 10 min on 2 cores
    python -m benchmarks.int8 --quick           # 128 px, 16 training images, 1 epoch, brick: tests the script

Writes ``benchmarks/out/int8.json`` (``int8_quick.json``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch
from anomalib.data import ImageBatch, MVTecAD
from anomalib.deploy import CompressionType, ExportType
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC, F1Score
from lightning.pytorch import seed_everything
from torch.nn import functional as F  # noqa: N812

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.data import DEMO_TEXTURES, generate_demo_dataset
from benchmarks.harness import OUT_DIR, cpu_engine, demo_datamodule, quiet_libraries
from benchmarks.timing import round_robin_ms

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
SEED = 42

Predictor = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def datamodule(root: Path, texture: str, batch_size: int) -> MVTecAD:
    """anomalib's MVTecAD over one demo texture."""
    return demo_datamodule(root, texture, batch_size=batch_size, num_workers=0)


def trained_model(root: Path, texture: str, run_dir: Path, epochs: int, image_size: int, retrain: bool) -> Any:
    """A CflowPlus fitted on ``texture``: the checkpoint in ``run_dir`` if it loads, else a fresh fit (saved)."""
    checkpoint = run_dir / "model.ckpt"
    if checkpoint.is_file() and not retrain:
        try:
            return CflowPlus.load_from_checkpoint(checkpoint).eval()
        except RuntimeError as error:  # the model changed since the checkpoint was written
            print(f"retraining {texture}: {str(error).splitlines()[0]}")
    seed_everything(SEED, workers=True)
    pre_processor = True if image_size == 256 else CflowPlus.configure_pre_processor((image_size, image_size))
    model = CflowPlus(pre_processor=pre_processor)
    engine = cpu_engine(run_dir, epochs)
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule(root, texture, 16))
    print(f"{texture}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    engine.trainer.save_checkpoint(checkpoint)
    return model.eval()


def exported_outputs(outputs: Any) -> dict[str, torch.Tensor]:
    """``pred_score``, ``pred_label`` and ``anomaly_map`` of an exported model's outputs (name -> array) as tensors."""
    return {name: torch.from_numpy(np.asarray(outputs[name])) for name in ("pred_score", "pred_label", "anomaly_map")}


def openvino_predictor(path: Path, config: dict[str, str]) -> Predictor:
    """An exported model compiled for the CPU, as a function of images ``(B, 3, H, W)``."""
    compiled = ov.Core().compile_model(path, "CPU", config)

    def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = compiled(images.numpy())
        return exported_outputs(outputs)

    return predict


def torch_predictor(model: Any) -> Predictor:
    """The torch model (pre-processing, model, post-processing) as a function of images ``(B, 3, H, W)``."""

    def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            output = model(images)
        return {"pred_score": output.pred_score, "pred_label": output.pred_label, "anomaly_map": output.anomaly_map}

    return predict


def evaluate(predict: Predictor, data: MVTecAD) -> dict[str, float]:
    """Image AUROC and F1, pixel AUROC and AUPRO of ``predict`` on the test split (masks resized to the maps)."""
    metrics = {
        "image_auroc": AUROC(fields=["pred_score", "gt_label"]),
        "image_f1": F1Score(fields=["pred_label", "gt_label"]),
        "pixel_auroc": AUROC(fields=["anomaly_map", "gt_mask"], strict=False),
        "aupro": AUPRO(fields=["anomaly_map", "gt_mask"], strict=False),
    }
    for batch in data.test_dataloader():
        output = predict(batch.image)
        anomaly_map = output["anomaly_map"]
        gt_mask = F.interpolate(batch.gt_mask[:, None].float(), size=anomaly_map.shape[-2:], mode="nearest")[:, 0]
        scored = ImageBatch(
            image=batch.image,
            gt_label=batch.gt_label,
            gt_mask=gt_mask.bool(),
            pred_score=output["pred_score"].flatten(),
            pred_label=output["pred_label"].flatten().bool(),
            anomaly_map=anomaly_map,
        )
        for metric in metrics.values():
            metric.update(scored)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def onnx_predictor(path: Path) -> Predictor:
    """An exported ONNX model in ONNX Runtime (CPU), as a function of images ``(B, 3, H, W)``."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]

    def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
        return exported_outputs(outputs)

    return predict


def parity(reference: Predictor, candidates: dict[str, Predictor], data: MVTecAD) -> dict[str, dict[str, float]]:
    """Largest |difference| to ``reference`` of scores and maps, and agreeing labels, over the test split."""
    result = {name: {"max_score_diff": 0.0, "max_map_diff": 0.0, "labels_equal": 0, "images": 0} for name in candidates}
    for batch in data.test_dataloader():
        expected = reference(batch.image)
        for name, predict in candidates.items():
            actual, row = predict(batch.image), result[name]
            score_diff = (actual["pred_score"].flatten() - expected["pred_score"].flatten()).abs().max()
            map_diff = (actual["anomaly_map"].reshape(expected["anomaly_map"].shape) - expected["anomaly_map"]).abs()
            same = actual["pred_label"].flatten().bool() == expected["pred_label"].flatten().bool()
            row["max_score_diff"] = max(row["max_score_diff"], float(score_diff))
            row["max_map_diff"] = max(row["max_map_diff"], float(map_diff.max()))
            row["labels_equal"] += int(same.sum())
            row["images"] += len(batch.image)
    return result


def export(
    model: Any,
    root: Path,
    image_size: int,
    data: MVTecAD,
    compression: CompressionType | None,
    export_type: ExportType = ExportType.OPENVINO,
) -> tuple[Path, float]:
    """Export through ``Engine.export`` (OpenVINO unless told); return the model file's path and the wall seconds."""
    start = time.perf_counter()
    path = Engine(logger=False).export(
        model,
        export_type,
        export_root=root,
        input_size=(image_size, image_size),
        compression_type=compression,
        datamodule=data,
    )
    return Path(path), time.perf_counter() - start


def latency(paths: dict[str, Path], image_size: int, batches: list[int], repeats: int, threads: int) -> list[dict]:
    """ms/img of FP32 and INT8, each with the f32 hint and at OpenVINO's defaults, round-robin per batch size."""
    threads_config = {"INFERENCE_NUM_THREADS": str(threads)}
    compiled = {
        f"{name} {hint}": ov.Core().compile_model(path, "CPU", {**config, **threads_config})
        for name, path in paths.items()
        for hint, config in (("f32", F32), ("default", {}))
    }
    rows = []
    for batch in batches:
        images = np.random.default_rng(SEED).random((batch, 3, image_size, image_size), dtype=np.float32)
        samples = round_robin_ms(
            {name: (lambda c=c, images=images: c(images)) for name, c in compiled.items()}, repeats
        )
        ms = {name: statistics.median(values) / batch for name, values in samples.items()}
        ratios = {
            hint: statistics.median(
                fp32 / int8 for fp32, int8 in zip(samples[f"FP32 {hint}"], samples[f"INT8 {hint}"], strict=True)
            )
            for hint in ("f32", "default")
        }
        rows.append({"batch": batch, "ms_per_image": ms, "int8_speedup": ratios})
    return rows


def main() -> None:
    """Train or load, export, evaluate, time; print tables and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--textures", nargs="+", default=list(DEMO_TEXTURES), choices=DEMO_TEXTURES)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retrain", action="store_true", help="fit again even if a checkpoint loads")
    parser.add_argument("--acq", action="store_true", help="also time an INT8_ACQ export of the first texture")
    parser.add_argument("--quick", action="store_true", help="128 px, 16 training images, 1 epoch, brick only")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.textures, args.epochs, args.repeats, args.batch = ["brick"], 1, 3, [1]
    image_size = 128 if args.quick else 256
    suffix = "_quick" if args.quick else ""
    data_root = OUT_DIR / f"data{suffix}"
    sizes = {"image_size": 128, "n_train": 16, "n_test_good": 4, "n_test_defect": 2} if args.quick else {}
    generate_demo_dataset(data_root, textures=args.textures, **sizes)

    accuracy: dict[str, dict[str, dict[str, float]]] = {}
    exports: dict[str, dict[str, float]] = {}
    parities: dict[str, dict[str, dict[str, float]]] = {}
    work = Path(tempfile.mkdtemp(prefix="cflow_plus_int8_"))
    first_paths: dict[str, Path] = {}
    for texture in args.textures:
        model = trained_model(
            data_root, texture, OUT_DIR / f"int8{suffix}" / texture, args.epochs, image_size, args.retrain
        )
        data = datamodule(data_root, texture, 16)
        data.setup()
        fp32_path, fp32_s = export(model, work / texture / "fp32", image_size, data, None)
        int8_path, int8_s = export(model, work / texture / "int8", image_size, data, CompressionType.INT8_PTQ)
        onnx_path, onnx_s = export(model, work / texture / "onnx", image_size, data, None, ExportType.ONNX)
        exports[texture] = {"fp32_export_s": fp32_s, "int8_ptq_export_s": int8_s, "onnx_export_s": onnx_s}
        parities[texture] = parity(
            torch_predictor(model),
            {"ONNX Runtime": onnx_predictor(onnx_path), "OpenVINO FP32 (f32)": openvino_predictor(fp32_path, F32)},
            data,
        )
        accuracy[texture] = {
            "torch": evaluate(torch_predictor(model), data),
            "OpenVINO FP32 (f32)": evaluate(openvino_predictor(fp32_path, F32), data),
            "OpenVINO INT8": evaluate(openvino_predictor(int8_path, {}), data),
            "OpenVINO INT8 (f32)": evaluate(openvino_predictor(int8_path, F32), data),
        }
        print(f"{texture}: exports FP32 {fp32_s:.0f} s, INT8_PTQ {int8_s:.0f} s", flush=True)
        if not first_paths:
            first_paths = {"FP32": fp32_path, "INT8": int8_path}
            if args.acq:
                _, acq_s = export(model, work / texture / "acq", image_size, data, CompressionType.INT8_ACQ)
                exports[texture]["int8_acq_export_s"] = acq_s
                print(f"{texture}: INT8_ACQ export {acq_s:.0f} s", flush=True)

    timing = latency(first_paths, image_size, args.batch, args.repeats, args.threads)
    report = {"accuracy": accuracy, "parity": parities, "exports": exports, "latency": timing, "threads": args.threads}
    report["mean"] = {
        backend: {
            metric: statistics.mean(accuracy[texture][backend][metric] for texture in args.textures)
            for metric in next(iter(accuracy.values()))[backend]
        }
        for backend in next(iter(accuracy.values()))
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / f"int8{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_tables(report, args.textures, image_size))


def format_tables(report: dict[str, Any], textures: list[str], image_size: int) -> str:
    """Markdown: accuracy per backend (mean and per texture), then latency and INT8 speed-up."""
    lines = [
        f"Accuracy ({', '.join(textures)}, {image_size} px; mean, then per texture image AUROC/AUPRO):",
        "",
        "| backend | image AUROC | image F1 | pixel AUROC | AUPRO | per texture |",
        "|---|---|---|---|---|---|",
    ]
    for backend, mean in report["mean"].items():
        per_texture = ", ".join(
            f"{texture} {report['accuracy'][texture][backend]['image_auroc']:.3f}/"
            f"{report['accuracy'][texture][backend]['aupro']:.3f}"
            for texture in textures
        )
        lines.append(
            f"| {backend} | {mean['image_auroc']:.3f} | {mean['image_f1']:.3f} | {mean['pixel_auroc']:.3f} "
            f"| {mean['aupro']:.3f} | {per_texture} |"
        )
    lines += ["", "Parity with torch on the test split (largest |difference|; labels equal / images):", ""]
    lines += ["| texture | backend | pred_score | anomaly_map | labels |", "|---|---|---|---|---|"]
    for texture, by_backend in report["parity"].items():
        for backend, row in by_backend.items():
            lines.append(
                f"| {texture} | {backend} | {row['max_score_diff']:.2e} | {row['max_map_diff']:.2e} "
                f"| {row['labels_equal']}/{row['images']} |"
            )
    lines += ["", f"Export seconds: {json.dumps(report['exports'])}"]
    lines += ["", f"Latency, {textures[0]} exports, {report['threads']} threads (ms/img; INT8 speed-up over FP32):", ""]
    lines += ["| batch | FP32 f32 | INT8 f32 | speed-up | FP32 default | INT8 default | speed-up |", "|---" * 7 + "|"]
    for row in report["latency"]:
        ms, speedup = row["ms_per_image"], row["int8_speedup"]
        lines.append(
            f"| {row['batch']} | {ms['FP32 f32']:.1f} | {ms['INT8 f32']:.1f} | {speedup['f32']:.2f}x "
            f"| {ms['FP32 default']:.1f} | {ms['INT8 default']:.1f} | {speedup['default']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
