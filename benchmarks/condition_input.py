"""How the position enters the couplings' first product, in an exported model: three forms of the same function.

A coupling's subnet starts with ``hidden = fibers @ W_f + condition @ W_c + b`` at every position of an ``h x w``
grid. The condition is separable (``GridCondition``: a row half and a column half), so its term is a row term plus
a column term. The forms compared, each exported with anomalib's ``to_openvino`` from the same weights:

- ``adds`` (the shipped form): one product of the fibers, then the column term and the row term as two broadcast
  adds over the hidden tensor;
- ``one-hot``: the fibers get ``h + w`` more input channels, the one-hot codes of their row and column, and the
  product's weight gets the row and column terms as rows: one product, no add (the bias is in the row terms);
- ``dense``: the paper's form, the full ``P``-channel encoding concatenated to the fibers, one product.

Checks every form's scores against the shipped form's in OpenVINO f32 (the issue's bar: equal to 1e-5), then
times them side by side (``ir_job time``: OpenVINO f32 and default precision, batch 1 and 8).

Usage::

    python -m benchmarks.condition_input            # about 5 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import openvino as ov
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_cflow_plus.condition import GridCondition
from anomalib_cflow_plus.flow import ConditionalSubnet
from benchmarks.deploy_speed import CFLOW_PLUS, cflow_plus, time_irs
from benchmarks.jobs import OUT_DIR

FORMS = ("adds", "one-hot", "dense")


def one_hot_hidden(subnet: ConditionalSubnet, fibers: torch.Tensor, condition: GridCondition) -> torch.Tensor:
    """``adds``' hidden tensor as one product: fibers ``(..., h, w, C_in)`` with their row and column one-hot codes."""
    half = condition.columns.shape[-1]
    weight = subnet.condition_in.weight
    rows = condition.rows @ weight[:, half:].T + subnet.fiber_in.bias  # (h, hidden)
    columns = condition.columns @ weight[:, :half].T  # (w, hidden)
    height, width = rows.shape[0], columns.shape[0]
    codes = torch.cat(
        [
            torch.eye(height, dtype=fibers.dtype)[:, None, :].expand(height, width, height),
            torch.eye(width, dtype=fibers.dtype)[None, :, :].expand(height, width, width),
        ],
        dim=-1,
    )  # (h, w, h + w)
    inputs = torch.cat([fibers, codes.expand(*fibers.shape[:-1], height + width)], dim=-1)
    return F.linear(inputs, torch.cat([subnet.fiber_in.weight, rows.T, columns.T], dim=1))


def dense_hidden(subnet: ConditionalSubnet, fibers: torch.Tensor, condition: GridCondition) -> torch.Tensor:
    """``adds``' hidden tensor as the paper computes it: one product of fibers concatenated with the encoding."""
    height, width = condition.rows.shape[0], condition.columns.shape[0]
    encoding = condition.dense().reshape(height, width, -1)
    inputs = torch.cat([fibers, encoding.expand(*fibers.shape[:-1], encoding.shape[-1])], dim=-1)
    weight = torch.cat([subnet.fiber_in.weight, subnet.condition_in.weight], dim=1)
    return F.linear(inputs, weight, subnet.fiber_in.bias)


@contextlib.contextmanager
def hidden_form(form: str) -> Iterator[None]:
    """Make every subnet compute its whole-grid hidden tensor in ``form`` (for export)."""
    replacement = {"one-hot": one_hot_hidden, "dense": dense_hidden}.get(form)
    if replacement is None:
        yield
        return
    with mock.patch.object(ConditionalSubnet, "grid_hidden", replacement):
        yield


def export_forms(size: int, root: Path) -> dict[str, str]:
    """Export one model, with the same weights, in every form; the IR paths."""
    model = cflow_plus(size).eval()
    paths = {}
    for form in FORMS:
        with hidden_form(form):
            paths[form] = str(
                model.to_openvino(export_root=root / form, input_size=(size, size), onnx_kwargs={"opset_version": 18})
            )
    return paths


def f32_differences(paths: dict[str, str], size: int) -> dict[str, dict[str, float]]:
    """Largest absolute difference of every form's outputs from ``adds``' in OpenVINO f32, on random images."""
    core = ov.Core()
    images = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    outputs = {}
    for form, path in paths.items():
        compiled = core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        outputs[form] = {output.get_any_name(): value for output, value in compiled(images).items()}
    differences = {}
    for form in FORMS[1:]:
        differences[form] = {
            name: float(np.abs(value.astype(np.float64) - outputs[form][name]).max())
            for name, value in outputs["adds"].items()
            if value.dtype.kind == "f"
        }
    return differences


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=OUT_DIR / "condition_input.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = export_forms(args.size, OUT_DIR / "condition_input" / "ir")
    differences = f32_differences(paths, args.size)
    configs = [{"precision": p, "batch": b} for p in ("f32", "default") for b in args.batches]
    irs = {
        CFLOW_PLUS if form == "adds" else form: dict.fromkeys(map(str, args.batches), path)
        for form, path in paths.items()
    }
    timing = time_irs(irs, configs, args, "condition")
    report: dict[str, Any] = {"settings": vars(args) | {"json": str(args.json)}, "f32_max_abs_difference": differences}
    report["timing"] = timing
    args.json.write_text(json.dumps(report, indent=1))
    print("largest |difference| from the shipped form in OpenVINO f32:", json.dumps(differences))
    print("\n| form | " + " | ".join(f"{c['precision']}, batch {c['batch']}" for c in configs) + " |")
    print("|---|" + "---|" * len(configs))
    for form in FORMS:
        name = CFLOW_PLUS if form == "adds" else form
        cells = []
        for result in timing["results"]:
            entry = result["summary"][name]
            ratio = "" if form == "adds" else f" ({entry['vs_reference']:.3f}x)"
            cells.append(f"{entry['ms_per_image']:.2f}{ratio}")
        print(f"| {form} | " + " | ".join(cells) + " |")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
