"""OpenVINO-only jobs of ``deploy_speed.py`` and ``front.py``: processes that import nothing but OpenVINO and NumPy.

A deployed model is an IR and a runtime; these jobs time and measure exactly that, without torch or anomalib in
the process (their import alone is over 1 GB of RSS and adds threads).

Usage (``jobs.run_job`` does this)::

    python -m benchmarks.ir_job time SPEC.json RESULT.json
    python -m benchmarks.ir_job rss SPEC.json RESULT.json
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from benchmarks.jobs import peak_rss_since_reset_mb, serve
from benchmarks.timing import round_robin_ms

__all__ = ["compile_ir", "inference_precision", "rss_job", "summarize_rounds", "time_job", "with_batch"]

F32, DEFAULT = "f32", "default"


def with_batch(model: ov.Model, batch: int) -> ov.Model:
    """Set ``model``'s input batch to ``batch``, in place; ``RuntimeError`` where the graph fixes it."""
    shape = model.inputs[0].get_partial_shape()
    shape[0] = batch
    model.reshape({model.inputs[0].get_any_name(): shape})
    return model


def compile_ir(core: ov.Core, path: str, batch: int, threads: int, precision: str) -> ov.CompiledModel:
    """Compile an IR for ``batch`` images on the CPU, with ``INFERENCE_PRECISION_HINT=f32`` or at OpenVINO's default.

    The input's batch dimension is set to ``batch`` (every model gets the same treatment; an export that fixed it,
    as anomalib's PatchCore does, is reshaped like the others); its height and width stay as exported.
    """
    model = with_batch(core.read_model(path), batch)
    config = {"INFERENCE_NUM_THREADS": str(threads)}
    if precision == F32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return core.compile_model(model, "CPU", config)


def inference_precision(compiled: ov.CompiledModel) -> str:
    """The precision OpenVINO chose for a compiled CPU model (``f32``, ``bf16``, ``f16``)."""
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    return hint.get_type_name() if isinstance(hint, ov.Type) else str(hint)


def input_array(compiled: ov.CompiledModel, seed: int = 0) -> np.ndarray:
    """Random images in ``[0, 1]`` of the compiled model's input shape."""
    shape = list(compiled.inputs[0].get_shape())
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def summarize_rounds(samples: dict[str, list[float]], batch: int, reference: str | None) -> dict[str, Any]:
    """Per model: median ms per image and its spread (quartiles over rounds); medians of per-round ratios.

    ``vs_reference`` is each model's time over ``reference``'s in the same round (``> 1``: slower than it).
    """
    summary: dict[str, Any] = {}
    for name, times in samples.items():
        per_image = [t / batch for t in times]
        quartiles = statistics.quantiles(per_image, n=4) if len(per_image) > 1 else [per_image[0]] * 3
        entry: dict[str, Any] = {"ms_per_image": quartiles[1], "q1": quartiles[0], "q3": quartiles[2]}
        if reference is not None and reference in samples:
            ratios = [t / r for t, r in zip(times, samples[reference], strict=True)]
            ratio_quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            entry["vs_reference"] = ratio_quartiles[1]
            entry["vs_reference_q1"], entry["vs_reference_q3"] = ratio_quartiles[0], ratio_quartiles[2]
        summary[name] = entry
    return summary


def time_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Time every IR of ``spec["irs"]`` side by side, once per round in a rotating order, for each configuration.

    ``spec``: ``irs`` (name -> {batch: IR path}), ``configs`` (a list of ``{"precision": "f32" | "default",
    "batch": B}``), ``repeats``, ``warmup``, ``threads`` and ``reference`` (the name every ratio is taken against).
    Models that fail to compile are reported in ``errors`` and left out of the rounds.
    """
    core = ov.Core()
    results = []
    errors: dict[str, str] = {}
    for config in spec["configs"]:
        batch, precision = config["batch"], config["precision"]
        runners, precisions = {}, {}
        for name, by_batch in spec["irs"].items():
            try:
                compiled = compile_ir(core, by_batch[str(batch)], batch, spec["threads"], precision)
            except RuntimeError as err:
                errors[f"{name} {precision} b{batch}"] = str(err).splitlines()[0]
                continue
            images = input_array(compiled)
            request = compiled.create_infer_request()
            runners[name] = lambda request=request, images=images: request.infer([images])
            precisions[name] = inference_precision(compiled)
        samples = round_robin_ms(runners, spec["repeats"], spec["warmup"])
        summary = summarize_rounds(samples, batch, spec.get("reference"))
        results.append({**config, "precisions": precisions, "summary": summary, "samples": samples})
        line = ", ".join(f"{name} {entry['ms_per_image']:.1f}" for name, entry in summary.items())
        print(f"{precision} batch {batch}: {line}", flush=True)
        del runners
    return {"results": results, "errors": errors}


def rss_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of a process that loads one IR, compiles it at OpenVINO's default precision and runs it.

    ``spec``: ``irs`` (batch -> IR path; each batch runs ``runs`` times), ``threads``. The peak is the process's
    ``VmHWM``: ``ru_maxrss`` would carry over the parent's high-water mark through ``fork`` and ``exec``.
    """
    core = ov.Core()
    for batch, path in spec["irs"].items():
        compiled = compile_ir(core, path, int(batch), spec["threads"], DEFAULT)
        images = input_array(compiled)
        request = compiled.create_infer_request()
        for _ in range(spec.get("runs", 3)):
            request.infer([images])
        del request, compiled
    path = Path(next(iter(spec["irs"].values())))
    ir_bytes = path.stat().st_size + path.with_suffix(".bin").stat().st_size
    return {"peak_rss_mb": peak_rss_since_reset_mb(), "ir_mb": ir_bytes / 2**20}


if __name__ == "__main__":
    serve({"time": time_job, "rss": rss_job})
