"""The quickstart notebook: committed without outputs, and it runs end to end (tiny sizes) with sensible results."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"
TINY_PARAMETERS = {
    "IMAGE_SIZE": 64,
    "INPUT_SIZE": 64,
    "N_TRAIN": 8,
    "N_TEST_GOOD": 4,
    "N_TEST_DEFECT": 1,
    "MAX_EPOCHS": 1,
}
DEFECT_KINDS = 4  # perlin, scratch, hole, stain

# Appended to the notebook: what it computed, as one JSON line.
SUMMARY_CELL = """
import json
print(json.dumps({
    "metrics": {name: float(value) for name, value in metrics.items()},
    "n_predictions": len(items),
    "torch_score": torch_score,
    "ov_score": ov_score,
    "xml_path": str(Path(xml_path).resolve()),
    "results_dir": str(Path(engine.trainer.default_root_dir).resolve()),
}))
"""


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def parameters_index(notebook: nbformat.NotebookNode) -> int:
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


def current_python_kernel(folder: Path) -> KernelManager:
    """A ``python3`` kernel on this interpreter, whatever kernel specs the user or the system have installed."""
    spec_dir = folder / "python3"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "test", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(folder)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def outputs_of(cell: nbformat.NotebookNode, mime: str) -> list:
    return [output for output in cell.outputs if mime in output.get("data", {})]


def stdout_of(cell: nbformat.NotebookNode) -> str:
    return "".join(output.text for output in cell.outputs if output.get("name") == "stdout")


def test_committed_notebook_has_no_outputs_and_one_parameters_cell():
    notebook = read_notebook()
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)
    parameters = notebook.cells[parameters_index(notebook)].source
    assert all(re.search(rf"^{name}\b", parameters, re.MULTILINE) for name in TINY_PARAMETERS)


@pytest.mark.slow
def test_quickstart_notebook_trains_evaluates_exports_and_infers(tmp_path):
    notebook = read_notebook()
    overrides = "\n".join(f"{name} = {value!r}" for name, value in TINY_PARAMETERS.items())
    notebook.cells.insert(parameters_index(notebook) + 1, nbformat.v4.new_code_cell(overrides))
    notebook.cells.append(nbformat.v4.new_code_cell(SUMMARY_CELL))
    workdir = tmp_path / "work"
    workdir.mkdir()
    client = NotebookClient(
        notebook,
        km=current_python_kernel(tmp_path / "kernels"),
        timeout=600,
        resources={"metadata": {"path": str(workdir)}},
    )
    env = {name: value for name, value in os.environ.items() if name != "MPLBACKEND"}  # inline figures
    client.execute(env=env)

    summary = json.loads(stdout_of(notebook.cells[-1]))

    # 1. the demo data, written into the working directory
    test_dir = workdir / "datasets" / "quickstart" / "brick" / "test"
    assert sorted(p.name for p in test_dir.iterdir()) == ["good", "hole", "perlin", "scratch", "stain"]
    n_test = TINY_PARAMETERS["N_TEST_GOOD"] + DEFECT_KINDS * TINY_PARAMETERS["N_TEST_DEFECT"]

    # 2-3. trained and tested: metrics in range and printed as computed
    metrics = summary["metrics"]
    printed = stdout_of(next(c for c in notebook.cells if "metrics = engine.test" in c.source))
    for name in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        assert 0.0 <= metrics[name] <= 1.0
        assert f"{name:12s} {metrics[name]:.3f}" in printed
    assert metrics["image_AUROC"] >= 0.75  # far above chance even after one tiny epoch
    assert metrics["pixel_AUROC"] >= 0.75
    results_dir = Path(summary["results_dir"])
    assert results_dir.is_relative_to(workdir)
    assert len(list((results_dir / "images").rglob("*.png"))) == n_test  # anomalib's visualizer, one per image

    # 4. heat maps: one figure per anomalous image drawn (every 4th of them)
    assert summary["n_predictions"] == n_test
    heatmap_cell = next(c for c in notebook.cells if "visualize_image_item(item" in c.source)
    expected_figures = len(range(0, DEFECT_KINDS * TINY_PARAMETERS["N_TEST_DEFECT"], 4))
    assert len(outputs_of(heatmap_cell, "image/png")) == expected_figures

    # 5. OpenVINO export and inference, matching the torch model's score
    xml_path = Path(summary["xml_path"])
    assert xml_path.is_file() and xml_path.with_suffix(".bin").is_file()
    assert xml_path.is_relative_to(workdir)
    openvino_cell = next(c for c in notebook.cells if "OpenVINOInferencer(" in c.source)
    assert outputs_of(openvino_cell, "image/png")
    assert 0.0 <= summary["ov_score"] <= 1.0
    assert summary["ov_score"] == pytest.approx(summary["torch_score"], abs=1e-3)
