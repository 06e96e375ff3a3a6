"""Deployment speed: CflowPlus against every model a user could pick, as exported OpenVINO IRs, side by side.

Each model is built at anomalib's default configuration (its default backbone, layers and pre-processor for the
input size), with random weights (latency does not depend on them; the hub is unreachable), given the state a
fitted model has (PatchCore a memory bank the size of a 10% coreset of 200 training images, PaDiM a Gaussian,
CflowPlus its calibration), and exported with anomalib's own ``to_openvino``. Where the model allows it, it is
also built on CflowPlus's encoder (``efficientnet_lite1``, at the strides it uses by default). The encoder alone
(pre-processing and ``efficientnet_lite1``) is the floor.

Then, in fresh processes that import only OpenVINO (``ir_job.py``): every IR timed side by side, one call each
per round in a rotating order, at ``INFERENCE_PRECISION_HINT=f32`` and at OpenVINO's default precision (bf16 on
CPUs that have it), batch 1 and 8, 256 x 256 and, for the three fastest models and the floor, 512 x 512; and, for
each IR, the peak RSS of a process that only loads and runs it.

Usage::

    python -m benchmarks.deploy_speed                 # about 25 minutes on a 2-core CPU
    python -m benchmarks.deploy_speed --repeats 5 --sizes 256 --models CflowPlus PaDiM   # a quick look
    python -m benchmarks.deploy_speed --report benchmarks/out/deploy_speed.json

Writes ``benchmarks/out/deploy_speed.json`` (every round's time) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import openvino as ov
import timm
import torch
from anomalib.models import Cflow, EfficientAd, Fastflow, Padim, Patchcore
from anomalib.models.components import AnomalibModule

from anomalib_cflow_plus import CflowPlus
from benchmarks.ir_job import with_batch
from benchmarks.jobs import OUT_DIR, run_job
from benchmarks.pair_models import prepare_for_inference
from benchmarks.real_data_job import modules_at_strides
from benchmarks.vs_cflow_jobs import EncoderFloor, openvino_encoder_floor

__all__ = ["BUILDERS", "ENCODER", "export_irs", "time_irs"]

ENCODER = "encoder alone (lite1)"
CFLOW_PLUS = "CflowPlus"
LITE1 = "efficientnet_lite1"
CORESET_IMAGES = 200  # PatchCore's memory bank: a 10% coreset of this many training images' patches
PADIM_LITE1_FEATURES = 100  # anomalib's n_features for resnet18; lite1's three levels have 176 channels
IR_DIR = OUT_DIR / "deploy_speed" / "ir"
JOB_DIR = OUT_DIR / "deploy_speed" / "jobs"


def _pre_processor(model_class: type[AnomalibModule], size: int) -> Any:
    return model_class.configure_pre_processor((size, size))


def _patchcore(size: int, backbone: str | None = None) -> AnomalibModule:
    kwargs = {"backbone": backbone, "layers": modules_at_strides(backbone, (8, 16))} if backbone else {}
    model = Patchcore(pre_trained=False, pre_processor=_pre_processor(Patchcore, size), **kwargs)
    with torch.no_grad():  # one training forward gives the embedding's width and patches per image
        model.model.train()
        embedding = model.model(model.pre_processor(torch.rand(1, 3, size, size)))
        model.model.embedding_store.clear()
    patches = round(0.1 * CORESET_IMAGES * embedding.shape[0])
    model.model.memory_bank = torch.randn(patches, embedding.shape[1], generator=torch.Generator().manual_seed(0))
    return model


def _padim(size: int, backbone: str | None = None) -> AnomalibModule:
    kwargs = {}
    if backbone:
        kwargs = {
            "backbone": backbone,
            "layers": modules_at_strides(backbone, (4, 8, 16)),
            "n_features": PADIM_LITE1_FEATURES,
        }
    model = Padim(pre_trained=False, pre_processor=_pre_processor(Padim, size), **kwargs)
    with torch.no_grad():  # fit its Gaussian on a few random images: the shapes are a fitted model's
        model.model.train()
        model.model(model.pre_processor(torch.rand(4, 3, size, size)))
        model.model.fit()
    return model


def _fastflow(size: int, backbone: str | None = None) -> AnomalibModule:
    if not backbone:
        return Fastflow(pre_trained=False, pre_processor=_pre_processor(Fastflow, size))
    # FastFlow takes only resnet18 / wide_resnet50_2 / CaiT / DeiT by name: build the resnet18 form with timm's
    # factory answering with our encoder, so that every other part (norms, flows) is anomalib's, sized for it.
    create_model = timm.create_model
    with mock.patch.object(timm, "create_model", lambda _name, **kwargs: create_model(backbone, **kwargs)):
        return Fastflow(backbone="resnet18", pre_trained=False, pre_processor=_pre_processor(Fastflow, size))


def _cflow(size: int, backbone: str | None = None) -> AnomalibModule:
    kwargs = {"backbone": backbone, "layers": modules_at_strides(backbone, (8, 16, 32))} if backbone else {}
    return Cflow(pre_trained=False, pre_processor=_pre_processor(Cflow, size), **kwargs)


def cflow_plus(size: int, **kwargs: Any) -> AnomalibModule:
    """CflowPlus (defaults, or ``kwargs``), untrained but shaped and calibrated like a trained model."""
    model = CflowPlus(pre_trained=False, pre_processor=_pre_processor(CflowPlus, size), **kwargs)
    return prepare_for_inference(model, size)


# name -> builder(size). "(lite1)": the model on CflowPlus's encoder, at its own default strides.
BUILDERS: dict[str, Callable[[int], AnomalibModule]] = {
    CFLOW_PLUS: cflow_plus,
    "PatchCore": _patchcore,
    "PaDiM": _padim,
    "FastFlow": _fastflow,
    "EfficientAD-S": lambda size: EfficientAd(model_size="small", pre_processor=_pre_processor(EfficientAd, size)),
    "Cflow": _cflow,
    "PatchCore (lite1)": lambda size: _patchcore(size, LITE1),
    "PaDiM (lite1)": lambda size: _padim(size, LITE1),
    "FastFlow (lite1)": lambda size: _fastflow(size, LITE1),
    "Cflow (lite1)": lambda size: _cflow(size, LITE1),
}


def slug(name: str) -> str:
    """A folder name for a model name."""
    return "".join(character if character.isalnum() else "_" for character in name).strip("_")


def export_encoder_floor(size: int, export_dir: Path) -> Path:
    """Pre-processing and CflowPlus's encoder (channels-last, as CflowPlus runs it) as an IR with a dynamic batch."""
    model = CflowPlus(pre_trained=False, pre_processor=_pre_processor(CflowPlus, size))
    encoder = copy.deepcopy(model.model.encoder.feature_extractor).to(memory_format=torch.channels_last)
    export_dir.mkdir(parents=True, exist_ok=True)
    return openvino_encoder_floor(EncoderFloor(model.pre_processor, encoder), export_dir, size)


def _export(model: AnomalibModule, export_dir: Path, size: int, batch: int | None) -> str:
    """anomalib's ``to_openvino`` through ONNX opset 18 (torch's native one; anomalib's default, 14, goes through a
    version converter), with a dynamic batch, or a static ``batch``."""
    onnx_kwargs: dict[str, Any] = {"opset_version": 18}
    if batch is not None:
        onnx_kwargs["dynamic_shapes"] = [{0: batch}]
    shutil.rmtree(export_dir, ignore_errors=True)
    return str(model.to_openvino(export_root=export_dir, input_size=(size, size), onnx_kwargs=onnx_kwargs))


def _reshapes(path: str, batch: int) -> bool:
    """Whether an IR's input takes ``batch`` images (anomalib's PatchCore export fixes the batch it traced with)."""
    try:
        with_batch(ov.Core().read_model(path), batch)
    except RuntimeError:
        return False
    return True


def export_irs(
    builders: dict[str, Callable[[int], AnomalibModule]],
    size: int,
    root: Path,
    batches: Sequence[int] = (1,),
    encoder: bool = True,
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Build and export every model (and the encoder floor) at ``size``; ``{name: {batch: IR path}}`` and errors.

    Each model is exported once with a dynamic batch; where that IR does not take a batch size, the model is
    exported again with that batch fixed. One model's failure does not stop the others; it is reported.
    """
    paths: dict[str, dict[str, str]] = {}
    errors: dict[str, str] = {}
    for name, build in builders.items():
        export_dir = root / str(size) / slug(name)
        start = time.perf_counter()
        try:
            model = build(size).eval()
            dynamic = _export(model, export_dir / "dynamic", size, None)
            paths[name] = {
                str(batch): dynamic
                if _reshapes(dynamic, batch)
                else _export(model, export_dir / f"b{batch}", size, batch)
                for batch in batches
            }
        except Exception as err:  # a peer's failed export must not cost the others
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"  {name} at {size} px: export failed: {errors[name]}", flush=True)
            continue
        print(f"  {name} at {size} px: exported in {time.perf_counter() - start:.0f} s", flush=True)
    if encoder:
        floor = str(export_encoder_floor(size, root / str(size) / "encoder"))
        paths[ENCODER] = dict.fromkeys(map(str, batches), floor)
    return paths, errors


def time_irs(
    paths: dict[str, str],
    configs: list[dict[str, Any]],
    args: argparse.Namespace,
    name: str,
    reference: str = CFLOW_PLUS,
) -> dict[str, Any]:
    """Time the IRs side by side in one OpenVINO-only process (``ir_job time``), ratios against ``reference``.

    ``args`` gives ``repeats``, ``warmup`` and ``threads``; ``name`` names the job's files.
    """
    spec = {
        "irs": paths,
        "configs": configs,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "reference": reference,
    }
    return run_job("benchmarks.ir_job", "time", spec, JOB_DIR, name, threads=args.threads)


def fastest(timing: dict[str, Any], count: int) -> list[str]:
    """The ``count`` fastest models (not the floor) at the default precision, batch 1."""
    result = next(r for r in timing["results"] if r["precision"] == "default" and r["batch"] == 1)
    models = sorted((e["ms_per_image"], n) for n, e in result["summary"].items() if n != ENCODER)
    return [name for _, name in models[:count]]


def markdown_tables(report: dict[str, Any]) -> str:
    """Per size: ms per image (quartiles) and the ratio to CflowPlus in every configuration; IR size and RSS."""
    lines: list[str] = []
    for size, entry in report["sizes"].items():
        results = entry["timing"]["results"]
        headers = [
            f"{r['precision']} ({'/'.join(sorted(set(r['precisions'].values())))}), batch {r['batch']}" for r in results
        ]
        lines += [
            f"\n{size} x {size}: ms per image (median of {report['settings']['repeats']} rounds) and, in brackets, "
            "time over CflowPlus's in the same rounds (median, quartiles)",
            "",
            "| model | " + " | ".join(headers) + " | IR MiB | peak RSS MiB |",
            "|---|" + "---|" * (len(headers) + 2),
        ]
        names = list(results[0]["summary"])
        for name in names:
            cells = []
            for result in results:
                cell = result["summary"].get(name)
                if cell is None:
                    cells.append("n/a")
                    continue
                ratio = cell.get("vs_reference")
                bracket = (
                    f" ({ratio:.2f}x, {cell['vs_reference_q1']:.2f}-{cell['vs_reference_q3']:.2f})"
                    if ratio is not None and name != CFLOW_PLUS
                    else ""
                )
                cells.append(f"{cell['ms_per_image']:.1f}{bracket}")
            memory = entry.get("memory", {}).get(name, {})
            ir = f"{memory['ir_mb']:.1f}" if "ir_mb" in memory else ""
            rss = f"{memory['peak_rss_mb']:.0f}" if "peak_rss_mb" in memory else ""
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {ir} | {rss} |")
        for model, error in {**entry.get("export_errors", {}), **entry["timing"].get("errors", {})}.items():
            lines.append(f"\n{model}: {error}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--large", type=int, default=3, help="how many of the fastest models also run at 512 px")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=OUT_DIR / "deploy_speed.json")
    parser.add_argument("--report", type=Path, default=None, help="reprint the tables of an existing JSON")
    args = parser.parse_args(argv)
    if args.report is not None:
        print(markdown_tables(json.loads(args.report.read_text())))
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    configs = [{"precision": p, "batch": b} for p in ("f32", "default") for b in args.batches]
    report: dict[str, Any] = {
        "settings": {key: str(value) for key, value in vars(args).items()} | {"repeats": args.repeats},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "openvino": ov.get_version()},
        "sizes": {},
    }
    models = list(args.models)
    for index, size in enumerate(args.sizes):
        if index > 0:  # larger sizes: the fastest models of the first size, and CflowPlus
            models = list(dict.fromkeys([*fastest(report["sizes"][str(args.sizes[0])]["timing"], args.large)]))
            if CFLOW_PLUS in args.models and CFLOW_PLUS not in models:
                models.append(CFLOW_PLUS)
        print(f"exporting {len(models)} models at {size} px", flush=True)
        builders = {name: BUILDERS[name] for name in models}
        paths, export_errors = export_irs(builders, size, IR_DIR, args.batches)
        timing = time_irs(paths, configs, args, f"time_{size}")
        memory = {
            name: run_job(
                "benchmarks.ir_job",
                "rss",
                {"irs": by_batch, "threads": args.threads},
                JOB_DIR,
                f"rss_{size}_{slug(name)}",
                threads=args.threads,
            )
            for name, by_batch in paths.items()
        }
        report["sizes"][str(size)] = {"timing": timing, "memory": memory, "export_errors": export_errors}
    report["wall_s"] = time.perf_counter() - start
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(markdown_tables(report))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
