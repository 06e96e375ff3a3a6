"""Per-op profile of an exported CflowPlus in OpenVINO: where the time of one inference goes.

Exports an untrained CflowPlus (speed does not depend on the weights; :func:`pair_models.prepare_for_inference`
gives it weights shaped like a trained one's) and runs it with OpenVINO's ``PERF_COUNT``, with the ``f32`` hint
and at OpenVINO's defaults (bf16 on CPUs that have it). Each executed node's time is summed over ``--repeats``
inferences, after warm-up, and reported per region of the graph (:func:`~anomalib_cflow_plus.quantization.
graph_regions`: encoder, flows, scoring tail) and per executed op type, with the count of executed nodes.

Usage::

    python -m benchmarks.profile_openvino [--backbone efficientnet_lite0] [--batch 1 8] [--repeats 50]

Writes ``benchmarks/out/profile_openvino.json`` and prints one table per batch size and precision.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from typing import Any

import numpy as np
import openvino as ov
import torch

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.quantization import decoder_weights, graph_regions, quantize
from benchmarks.harness import OUT_DIR, quiet_libraries, write_json
from benchmarks.pair_models import prepare_for_inference
from benchmarks.timing import round_robin_ms


def region_of_nodes(model: ov.Model, decoders: torch.nn.Module) -> dict[str, str]:
    """Friendly name of every op of the exported model -> ``"encoder"``, ``"flows"`` or ``"tail"``."""
    regions = graph_regions(model, decoder_weights(decoders))
    return {name: region for region in ("encoder", "flows", "tail") for name in getattr(regions, region)}


def int8_model(model: ov.Model, cflow_plus: CflowPlus, image_size: int, regions: tuple[str, ...]) -> ov.Model:
    """``model`` quantized by :func:`~anomalib_cflow_plus.quantization.quantize`, calibrated on random images.

    Speed does not depend on what calibrates the quantizers, only on where they are.
    """
    import nncf

    images = np.random.default_rng(1).random((8, 1, 3, image_size, image_size), np.float32)
    return quantize(model, nncf.Dataset(list(images)), regions, decoder_weights(cflow_plus.model.decoders))


def profile(compiled: ov.CompiledModel, images: np.ndarray, repeats: int, warmup: int = 5) -> list[Any]:
    """Run ``compiled`` ``warmup + repeats`` times; return the profiling info of each timed run."""
    request = compiled.create_infer_request()
    for _ in range(warmup):
        request.infer({0: images})
    runs = []
    for _ in range(repeats):
        request.infer({0: images})
        runs.append(request.profiling_info)
    return runs


def summarize(runs: list[Any], regions: dict[str, str]) -> dict[str, Any]:
    """Median-free summary: mean ms per inference by region and by (region, exec type), and node counts."""
    by_region: collections.Counter[str] = collections.Counter()
    by_type: collections.Counter[tuple[str, str]] = collections.Counter()
    nodes: collections.Counter[tuple[str, str]] = collections.Counter()
    for index, run in enumerate(runs):
        for info in run:
            if info.status != ov.ProfilingInfo.Status.EXECUTED:
                continue
            # A fused node carries the name of its first op; names that the compiler made up go to "other".
            region = regions.get(info.node_name, regions.get(info.node_name.split("/")[0], "other"))
            milliseconds = info.real_time.total_seconds() * 1e3 / len(runs)
            by_region[region] += milliseconds
            key = (region, f"{info.node_type}:{info.exec_type.split('_')[0]}")
            by_type[key] += milliseconds
            if index == 0:
                nodes[key] += 1
    return {
        "total_ms": sum(by_region.values()),
        "regions_ms": dict(by_region),
        "region_nodes": {region: sum(n for (r, _), n in nodes.items() if r == region) for region in by_region},
        "op_types": [
            {"region": region, "op": op, "ms": ms, "nodes": nodes[region, op]}
            for (region, op), ms in by_type.most_common()
        ],
    }


def side_by_side(
    models: dict[str, ov.Model], batches: list[int], threads: int, rounds: int, image_size: int
) -> list[dict[str, Any]]:
    """Median ms per image of every model at the ``f32`` hint and at defaults, timed round-robin; print a table."""
    core = ov.Core()
    compiled = {
        (name, precision): core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": str(threads),
                **({"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" else {}),
            },
        )
        for name, model in models.items()
        for precision in ("f32", "default")
    }
    results = []
    for batch in batches:
        images = np.random.default_rng(0).random((batch, 3, image_size, image_size), np.float32)
        runners = {key: (lambda model=model, images=images: model(images)) for key, model in compiled.items()}
        samples = round_robin_ms(runners, rounds)
        reference = samples["FP32", "default"]
        print(f"\n### Side by side, batch {batch}, {rounds} rounds: ms per image (speed-up over FP32 at defaults)\n")
        print("| model | f32 hint | defaults |\n|---|---|---|")
        for name in models:
            cells = []
            for precision in ("f32", "default"):
                milliseconds = statistics.median(samples[name, precision]) / batch
                speedup = statistics.median(r / s for r, s in zip(reference, samples[name, precision], strict=True))
                cells.append(f"{milliseconds:.2f} ({speedup:.2f}x)")
                results.append(
                    {
                        "model": name,
                        "precision": precision,
                        "batch": batch,
                        "ms_per_image": milliseconds,
                        "speedup_vs_fp32_default": speedup,
                    }
                )
            print(f"| {name} | {' | '.join(cells)} |")
    return results


def print_summary(title: str, summary: dict[str, Any], top: int) -> None:
    """One markdown table: regions first, then the ``top`` most costly op types."""
    print(f"\n### {title}: {summary['total_ms']:.2f} ms per inference (sum of executed nodes)\n")
    print("| region / op type | executed nodes | ms |\n|---|---|---|")
    for region, ms in sorted(summary["regions_ms"].items(), key=lambda item: -item[1]):
        print(f"| **{region}** | {summary['region_nodes'][region]} | {ms:.2f} |")
    for row in summary["op_types"][:top]:
        print(f"| {row['region']} {row['op']} | {row['nodes']} | {row['ms']:.2f} |")


def main() -> None:
    """Export, profile every batch size and precision, print and save."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="extra CflowPlus arguments, as JSON")
    parser.add_argument(
        "--time",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also time every model and precision side by side (round-robin, without PERF_COUNT), ROUNDS rounds",
    )
    parser.add_argument(
        "--int8",
        nargs="*",
        help="also profile the model quantized (NNCF, calibrated on 8 random images) in these regions "
        "(default: encoder flows); repeat the option to compare several region sets",
        action="append",
    )
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    model = prepare_for_inference(CflowPlus(backbone=args.backbone, **args.model_kwargs), args.image_size)
    results: dict[str, Any] = {"backbone": args.backbone, "image_size": args.image_size, "profiles": []}
    with tempfile.TemporaryDirectory() as export_root:
        path = model.to_openvino(export_root=export_root, input_size=(args.image_size, args.image_size))
        models = {"FP32": ov.Core().read_model(path)}
        regions = region_of_nodes(models["FP32"], model.model.decoders)
        for int8_regions in args.int8 or ():
            int8_regions = tuple(int8_regions) or ("encoder", "flows")
            models["INT8 " + "+".join(int8_regions)] = int8_model(models["FP32"], model, args.image_size, int8_regions)
        for name, ov_model in models.items():
            for precision in ("f32", "default"):
                config = {"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": str(args.threads)}
                if precision == "f32":
                    config["INFERENCE_PRECISION_HINT"] = "f32"
                compiled = ov.Core().compile_model(ov_model, "CPU", config)
                for batch in args.batch:
                    images = np.random.default_rng(0).random((batch, 3, args.image_size, args.image_size), np.float32)
                    summary = summarize(profile(compiled, images, args.repeats), regions)
                    summary.update(model=name, precision=precision, batch=batch)
                    results["profiles"].append(summary)
                    print_summary(f"{args.backbone} {name}, {precision}, batch {batch}", summary, args.top)
        if args.time:
            results["latency"] = side_by_side(models, args.batch, args.threads, args.time, args.image_size)
    write_json(OUT_DIR / "profile_openvino.json", results)


if __name__ == "__main__":
    main()
