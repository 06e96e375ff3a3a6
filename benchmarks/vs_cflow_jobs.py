"""Child jobs of ``vs_cflow.py``: each runs in a fresh process, so memory and threads never leak between them.

Usage (``vs_cflow.py`` does this, through ``jobs.run_job``)::

    python -m benchmarks.vs_cflow_jobs {train,latency,sizes} SPEC.json RESULT.json

``train`` fits one model on one demo texture and tests it (throughput, peak RSS, accuracy, checkpoint size);
``latency`` times every model of one backbone, eager torch and OpenVINO, interleaved round-robin, and measures
their sizes; ``sizes`` measures sizes only (for a backbone too large to time, e.g. ``wide_resnet50_2``).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch
from anomalib.models.components import AnomalibModule
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn

from benchmarks.harness import cpu_engine, demo_datamodule, extract_metrics, paired_ratio
from benchmarks.ir_job import inference_precision
from benchmarks.jobs import current_rss_mb, peak_rss_mb, peak_rss_since_reset_mb, reset_peak_rss, serve
from benchmarks.pair_models import (
    SharedSettings,
    Variant,
    build_model,
    encoder_of,
    load_shared_encoder,
    parameter_counts,
    prepare_for_inference,
    shared_encoder_weights,
    state_dict_bytes,
    training_settings,
)
from benchmarks.timing import round_robin_ms

TORCH = "torch eager"
OV_F32 = "OpenVINO f32"
OV_DEFAULT = "OpenVINO default"
ENCODER = "encoder alone"


# ----------------------------------------------------------------------------------------------- training


class TrainingMonitor(Callback):
    """Per training epoch: images, seconds from the epoch's start to its last batch's end, and peak RSS.

    The end-of-epoch validation and calibration run after the last batch, so neither the time nor
    the memory they take is counted; the peak RSS is reset at every epoch start for the same reason.
    """

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []
        self.peak_reset_works = True

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the epoch's clock and memory high-water mark."""
        del trainer, pl_module
        self.peak_reset_works = reset_peak_rss() and self.peak_reset_works
        self.epochs.append({"images": 0, "batch_images": [], "batch_end_s": [], "peak_rss_mb": 0.0})
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args) -> None:
        """Record the batch's images, its end time (from the epoch start) and the memory high-water mark."""
        del trainer, pl_module, outputs, args
        epoch = self.epochs[-1]
        epoch["batch_images"].append(len(batch.image))
        epoch["images"] += len(batch.image)
        epoch["batch_end_s"].append(time.perf_counter() - self._start)
        epoch["peak_rss_mb"] = max(epoch["peak_rss_mb"], peak_rss_since_reset_mb())


def measured_throughput(epochs: list[dict[str, Any]]) -> tuple[float, str]:
    """Training images/s after warm-up, and how it was measured.

    With two or more epochs, the first is the warm-up and the median over the others is returned; with
    one epoch, its first batch is the warm-up and the rest of the epoch is measured.
    """
    if len(epochs) >= 2:
        rates = [epoch["images"] / epoch["batch_end_s"][-1] for epoch in epochs[1:]]
        return statistics.median(rates), f"median of epochs 2..{len(epochs)} (epoch 1 is the warm-up)"
    (epoch,) = epochs
    if len(epoch["batch_end_s"]) < 2:
        return epoch["images"] / epoch["batch_end_s"][-1], "the only epoch, one batch: no warm-up"
    seconds = epoch["batch_end_s"][-1] - epoch["batch_end_s"][0]
    return (epoch["images"] - epoch["batch_images"][0]) / seconds, "one epoch after its first batch (the warm-up)"


def build_with_shared_encoder(variant: Variant, settings: SharedSettings, seed: int) -> tuple[AnomalibModule, str]:
    """``seed_everything``, build the model, load the shared encoder weights; return it and the weights' source."""
    seed_everything(seed, workers=True)
    model = build_model(variant, settings)
    state_dict, source = shared_encoder_weights(settings.backbone, seed)
    load_shared_encoder(model, state_dict, settings.backbone)
    return model, source


def train_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit one model on one texture for ``epochs`` epochs, test it, and measure it."""
    torch.set_num_threads(spec["threads"])
    settings, variant = SharedSettings(**spec["settings"]), Variant(**spec["variant"])
    model, weights_source = build_with_shared_encoder(variant, settings, spec["seed"])
    # num_workers=0: data loading in this process, so its memory and time count alike for both models
    datamodule = demo_datamodule(spec["data_root"], spec["texture"], batch_size=spec["batch_size"], num_workers=0)
    monitor = TrainingMonitor()
    engine = cpu_engine(Path(spec["run_dir"]), spec["epochs"], [monitor])
    rss_before_fit = current_rss_mb()
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = extract_metrics(engine.test(model=model, datamodule=datamodule, verbose=False))
    test_s = time.perf_counter() - start
    checkpoint = Path(spec["run_dir"]) / "benchmark.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    images_per_s, throughput_note = measured_throughput(monitor.epochs)
    return {
        "variant": variant.name,
        "texture": spec["texture"],
        "weights": weights_source,
        "training": training_settings(model),
        "metrics": metrics,
        "train_images_per_s": images_per_s,
        "throughput_measured_over": throughput_note,
        "epochs": [
            {"images": epoch["images"], "train_s": epoch["batch_end_s"][-1], "peak_rss_mb": epoch["peak_rss_mb"]}
            for epoch in monitor.epochs
        ],
        "training_peak_rss_mb": max(epoch["peak_rss_mb"] for epoch in monitor.epochs),
        "training_peak_rss_is_per_epoch": monitor.peak_reset_works,
        "rss_before_fit_mb": rss_before_fit,
        "peak_rss_mb": peak_rss_mb(),
        "fit_s": fit_s,
        "test_s": test_s,
        "checkpoint_bytes": checkpoint.stat().st_size,
        "state_dict_bytes": state_dict_bytes(model),
        "parameters": parameter_counts(model),
    }


# ------------------------------------------------------------------------------------------------ latency


class EncoderFloor(nn.Module):
    """Pre-processing and encoder alone: images ``(B, 3, H, W)`` -> the L feature maps; the latency floor."""

    def __init__(self, pre_processor: nn.Module, encoder: nn.Module) -> None:
        super().__init__()
        self.pre_processor = pre_processor
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Features ``(B, C_l, h_l, w_l)`` of each encoder level."""
        return tuple(self.encoder(self.pre_processor(images)))


def openvino_export(model: AnomalibModule, export_root: Path, image_size: int) -> tuple[Path, float]:
    """Export the whole pipeline with anomalib (through ONNX opset 18 for both models); return the .xml and seconds."""
    start = time.perf_counter()
    path = model.to_openvino(
        export_root=export_root,
        input_size=(image_size, image_size),
        onnx_kwargs={"opset_version": 18},
    )
    return Path(path), time.perf_counter() - start


def openvino_encoder_floor(floor: EncoderFloor, export_root: Path, image_size: int) -> Path:
    """Convert the encoder floor alone with ``openvino.convert_model`` (dynamic batch) and save it as IR."""
    example = torch.rand(1, 3, image_size, image_size)
    converted = ov.convert_model(floor.eval(), example_input=example, input=[-1, 3, image_size, image_size])
    path = export_root / "encoder.xml"
    ov.save_model(converted, path, compress_to_fp16=False)
    return path


def compile_openvino(path: Path, threads: int, f32: bool) -> tuple[Callable[[np.ndarray], Any], str]:
    """A compiled CPU model as a callable, with the f32 hint or at defaults (threads fixed in both).

    Returns the callable and the inference precision OpenVINO chose.
    """
    config = {"INFERENCE_NUM_THREADS": str(threads)}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = ov.Core().compile_model(path, "CPU", config)
    return (lambda images: compiled(images)), inference_precision(compiled)


def export_and_compile(
    models: dict[str, AnomalibModule],
    floor: EncoderFloor,
    export_dir: Path,
    image_size: int,
    threads: int,
) -> dict[str, Any]:
    """Export every model and the encoder floor to OpenVINO, compile each with the f32 hint and at defaults.

    Returns ``runners`` (backend -> name -> callable on NCHW arrays), ``sizes`` (state dict, IR .bin,
    parameters and export time per model), the ``precisions`` OpenVINO chose and per-model ``errors``.
    """
    sizes: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for name, model in models.items():
        sizes[name] = {"state_dict_bytes": state_dict_bytes(model), "parameters": parameter_counts(model)}
        try:
            paths[name], sizes[name]["openvino_export_s"] = openvino_export(model, export_dir / name, image_size)
        except Exception as err:  # one model's failed export must not cost the other measurements
            errors[name] = f"OpenVINO export failed: {type(err).__name__}: {err}"
            print(errors[name], file=sys.stderr, flush=True)
            continue
        sizes[name]["openvino_bin_bytes"] = paths[name].with_suffix(".bin").stat().st_size
    paths[ENCODER] = openvino_encoder_floor(floor, export_dir, image_size)
    sizes[ENCODER] = {"openvino_bin_bytes": paths[ENCODER].with_suffix(".bin").stat().st_size}
    runners: dict[str, dict[str, Callable[[np.ndarray], Any]]] = {OV_F32: {}, OV_DEFAULT: {}}
    precisions: dict[str, str] = {}
    for name, path in paths.items():
        runners[OV_F32][name], precisions[OV_F32] = compile_openvino(path, threads, f32=True)
        runners[OV_DEFAULT][name], precisions[OV_DEFAULT] = compile_openvino(path, threads, f32=False)
    return {"runners": runners, "sizes": sizes, "precisions": precisions, "errors": errors}


def batch_runners(
    models: dict[str, AnomalibModule],
    floor: EncoderFloor,
    compiled: dict[str, dict[str, Callable[[np.ndarray], Any]]],
    images: torch.Tensor,
) -> dict[Hashable, Callable[[], Any]]:
    """One zero-argument call per (backend, model or encoder floor), all on the same ``images`` ``(B, 3, H, W)``."""
    array = images.numpy()
    runners: dict[Hashable, Callable[[], Any]] = {
        (TORCH, name): (lambda model=model: model(images)) for name, model in models.items()
    }
    runners[TORCH, ENCODER] = lambda: floor(images)
    for backend, by_name in compiled.items():
        for name, run in by_name.items():
            runners[backend, name] = lambda run=run: run(array)
    return runners


def latency_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Time every model of one backbone, eager torch and OpenVINO, interleaved; measure the models' sizes.

    Every round times each model's whole pipeline (pre-processing, model, post-processing) and the
    encoder floor (pre-processing and encoder) once per backend, in a rotating order.
    """
    torch.set_num_threads(spec["threads"])
    settings = SharedSettings(**spec["settings"])
    variants = [Variant(**variant) for variant in spec["variants"]]
    size = settings.image_size
    models: dict[str, AnomalibModule] = {}
    for variant in variants:
        model, weights_source = build_with_shared_encoder(variant, settings, spec["seed"])
        models[variant.name] = prepare_for_inference(model, size)
    first = models[variants[0].name]
    # The floor is the encoder at its fastest in eager torch: channels-last (CflowPlus's layout; Cflow runs NCHW).
    encoder = copy.deepcopy(encoder_of(first)).to(memory_format=torch.channels_last)
    floor = EncoderFloor(first.pre_processor, encoder).eval()

    results = []
    with tempfile.TemporaryDirectory() as export_dir:  # compiled models may map their IR files: time inside
        exported = export_and_compile(models, floor, Path(export_dir), size, spec["threads"])
        torch.manual_seed(spec["seed"])
        for batch in spec["batches"]:
            runners = batch_runners(models, floor, exported["runners"], torch.rand(batch, 3, size, size))
            with torch.no_grad():
                samples = round_robin_ms(runners, spec["repeats"], spec["warmup"])
            results.append(summarize_latency(batch, samples, variants[0].name))
            print(f"batch {batch}: {json.dumps(results[-1]['ms_per_image'])}", flush=True)
    return {
        "weights": weights_source,
        "threads": spec["threads"],
        "openvino_precision": exported["precisions"],
        "sizes": exported["sizes"],
        "latency": results,
        "errors": exported["errors"],
    }


def summarize_latency(batch: int, samples: dict[Hashable, list[float]], reference: str) -> dict[str, Any]:
    """Median ms per image, ratio to ``reference`` (Cflow) and to the encoder alone, per backend and model.

    Ratios are medians of per-round ratios: both sides were timed in the same round.
    """
    backends = dict.fromkeys(backend for backend, _ in samples)
    ms_per_image: dict[str, dict[str, float]] = {}
    vs_reference: dict[str, dict[str, float]] = {}
    vs_encoder: dict[str, dict[str, float]] = {}
    for backend in backends:
        names = [name for other, name in samples if other == backend]
        ms_per_image[backend] = {name: statistics.median(samples[backend, name]) / batch for name in names}
        vs_encoder[backend] = {
            name: paired_ratio(samples[backend, name], samples[backend, ENCODER]) for name in names if name != ENCODER
        }
        if (backend, reference) in samples:
            vs_reference[backend] = {
                name: paired_ratio(samples[backend, name], samples[backend, reference])
                for name in names
                if name not in (ENCODER, reference)
            }
    return {
        "batch": batch,
        "ms_per_image": ms_per_image,
        "ratio_vs_cflow": vs_reference,
        "ratio_vs_encoder": vs_encoder,
        "samples_ms": {f"{backend} | {name}": values for (backend, name), values in samples.items()},
    }


# -------------------------------------------------------------------------------------------------- sizes


def sizes_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Sizes of randomly initialised models: parameters, state dict, checkpoint, OpenVINO IR (if ``spec["openvino"]``).

    The checkpoint is written after a single training step on ``spec["batch_size"]`` images, so that it
    holds the optimizer state as a trained checkpoint does; the encoder stays random (no download).
    """
    torch.set_num_threads(spec["threads"])
    settings = SharedSettings(**spec["settings"])
    sizes: dict[str, dict[str, Any]] = {}
    for variant in [Variant(**variant) for variant in spec["variants"]]:
        seed_everything(spec["seed"], workers=True)
        model = build_model(variant, settings)
        run_dir = Path(spec["run_dir"]) / variant.name.replace(" ", "_")
        datamodule = demo_datamodule(spec["data_root"], spec["texture"], batch_size=spec["batch_size"], num_workers=0)
        engine = cpu_engine(run_dir, 1, max_steps=1, limit_val_batches=0)
        engine.fit(model=model, datamodule=datamodule)
        checkpoint = run_dir / "benchmark.ckpt"
        engine.trainer.save_checkpoint(checkpoint)
        entry: dict[str, Any] = {
            "parameters": parameter_counts(model),
            "state_dict_bytes": state_dict_bytes(model),
            "checkpoint_bytes": checkpoint.stat().st_size,
        }
        if not spec["openvino"]:
            sizes[variant.name] = entry
            continue
        prepare_for_inference(model, settings.image_size)
        try:
            path, entry["openvino_export_s"] = openvino_export(model, run_dir / "export", settings.image_size)
            entry["openvino_bin_bytes"] = path.with_suffix(".bin").stat().st_size
        except Exception as err:  # report the other sizes even if the export fails
            entry["error"] = f"OpenVINO export failed: {type(err).__name__}: {err}"
        sizes[variant.name] = entry
        print(f"{variant.name}: {entry}", flush=True)
    return {"weights": "random init (sizes only)", "sizes": sizes}


# --------------------------------------------------------------------------------------------------- main

JOBS = {"train": train_job, "latency": latency_job, "sizes": sizes_job}

if __name__ == "__main__":
    serve(JOBS)
