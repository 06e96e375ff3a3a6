"""Shared helpers of the real-data benchmark and studies: data sets, metrics from arrays, caching.

``real_data.py`` (the side-by-side benchmark) and ``real_studies.py`` (the studies that set CflowPlus's
defaults) both use these; nothing here trains a model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.metrics.aupro import _AUPRO
from torchmetrics.functional.classification import binary_auroc

from anomalib_cflow_plus.data import DEMO_TEXTURES, generate_demo_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "benchmarks" / "out"
DEFAULT_REALDEV_ROOT = REPO_ROOT.parent / "shared" / "realdev"
DEMO_ROOT = OUT_DIR / "demo_real_data"
DEMO_SETTINGS: dict[str, int] = {"image_size": 256, "n_train": 64, "n_test_good": 16, "n_test_defect": 8}
DEMO_PREFIX = "demo/"
# The demo textures drawn at 512 px, for the input-size and tiling studies: the 256-px set would only be upsampled.
DEMO_512_ROOT = OUT_DIR / "demo_512"
DEMO_512_SETTINGS: dict[str, int] = {"image_size": 512, "n_train": 32, "n_test_good": 12, "n_test_defect": 4}
DEMO_512_PREFIX = "demo512/"


def real_categories(data_root: Path) -> list[str]:
    """Every category folder of an MVTec-AD-layout root: those with ``train/good`` and ``test``."""
    return sorted(
        path.name for path in data_root.iterdir() if (path / "train" / "good").is_dir() and (path / "test").is_dir()
    )


def ensure_demo_data(
    textures: Sequence[str] = DEMO_TEXTURES, root: Path = DEMO_ROOT, settings: dict[str, int] = DEMO_SETTINGS
) -> Path:
    """Write the demo textures (once; the generator skips complete categories) and return their root."""
    generate_demo_dataset(root, textures=list(textures), **settings)
    return root


def dataset_location(name: str, data_root: Path) -> tuple[Path, str]:
    """``(root, category)`` of a data set: ``demo/<texture>``, ``demo512/<texture>`` or a category of ``data_root``."""
    if name.startswith(DEMO_512_PREFIX):
        texture = name.removeprefix(DEMO_512_PREFIX)
        return ensure_demo_data([texture], DEMO_512_ROOT, DEMO_512_SETTINGS), texture
    if name.startswith(DEMO_PREFIX):
        texture = name.removeprefix(DEMO_PREFIX)
        return ensure_demo_data([texture]), texture
    return data_root, name


def is_real(name: str) -> bool:
    """Whether a data set name is a real category (not a demo texture)."""
    return not name.startswith((DEMO_PREFIX, DEMO_512_PREFIX))


# ----------------------------------------------------------------------------------------------- metrics


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC of scores ``(N,)`` against labels ``(N,)`` (1 = anomalous)."""
    return float(binary_auroc(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels).long()))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Pixel AUROC of maps ``(N, H, W)`` against masks ``(N, H, W)``, over every pixel of every image."""
    return float(
        binary_auroc(torch.as_tensor(maps, dtype=torch.float32).flatten(), torch.as_tensor(masks).flatten().long())
    )


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Per-region overlap AUC up to ``fpr_limit`` (anomalib's AUPRO), of maps and masks ``(N, H, W)``."""
    metric = _AUPRO(fpr_limit=fpr_limit)
    metric.update(torch.as_tensor(maps, dtype=torch.float32), torch.as_tensor(masks).int())
    return float(metric.compute())


def mean_and_spread(values: Iterable[float]) -> dict[str, float]:
    """Mean, standard deviation (population, 0 for one value), min and max of some figures."""
    array = np.asarray(list(values), dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std()),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def format_spread(summary: dict[str, float], digits: int = 3) -> str:
    """``0.912 ± 0.004`` (mean ± std over seeds), or the mean alone when there is no spread."""
    if summary["std"] == 0:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


# ------------------------------------------------------------------------------------------------ memory


# ----------------------------------------------------------------------------------------------- caching


def source_digest(paths: Sequence[Path]) -> str:
    """A short hash of the contents of some source files (``.py`` under folders), to key cached results."""
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in files:
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def spec_key(spec: dict[str, Any]) -> str:
    """A short, stable hash of a JSON-serializable job spec."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
