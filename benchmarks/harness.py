"""Shared helpers of every benchmark script: data sets, the CPU engine, metrics, real-data jobs, JSON output.

Nothing here trains a model by itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.metrics.aupro import _AUPRO
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics.functional.classification import binary_auroc

from anomalib_cflow_plus.data import DEMO_TEXTURES, generate_demo_dataset
from benchmarks.jobs import OUT_DIR, REPO_ROOT, run_job

DEFAULT_REALDEV_ROOT = REPO_ROOT.parent / "shared" / "realdev"
DEMO_ROOT = OUT_DIR / "demo_real_data"
DEMO_SETTINGS: dict[str, int] = {"image_size": 256, "n_train": 64, "n_test_good": 16, "n_test_defect": 8}
DEMO_PREFIX = "demo/"
# The demo textures drawn at 512 px, for the input-size and tiling studies: the 256-px set would only be upsampled.
DEMO_512_ROOT = OUT_DIR / "demo_512"
DEMO_512_SETTINGS: dict[str, int] = {"image_size": 512, "n_train": 32, "n_test_good": 12, "n_test_defect": 4}
DEMO_512_PREFIX = "demo512/"
DEFAULT_SEED = 42
BATCH_SIZE = 16
NUM_WORKERS = 2
METRIC_KEYS: dict[str, str] = {"image_AUROC": "image_auroc", "pixel_AUROC": "pixel_auroc", "pixel_AUPRO": "aupro"}
METRICS = tuple(METRIC_KEYS.values())
REAL_DATA_JOBS = OUT_DIR / "real_data" / "jobs"


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


# ------------------------------------------------------------------------------------- cached real-data jobs


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


def cflow_plus_source() -> str:
    """The hash of the plugin's and the real-data job's source that a CflowPlus job's spec carries."""
    return source_digest([REPO_ROOT / "anomalib_cflow_plus", REPO_ROOT / "benchmarks" / "real_data_job.py"])


def cflow_plus_spec(
    model_kwargs: dict[str, Any], dataset: str, seed: int, data_root: Path, image_size: int, epochs: int, threads: int
) -> dict[str, Any]:
    """The ``real_data_job`` spec of CflowPlus on lite1 with ``model_kwargs`` over its defaults, keyed by its source."""
    return {
        "model": "CflowPlus",
        "model_kwargs": model_kwargs,
        "dataset": dataset,
        "data_root": str(data_root.resolve()),
        "seed": seed,
        "backbone": "efficientnet_lite1",
        "image_size": image_size,
        "epochs": epochs,
        "threads": threads,
        "source": cflow_plus_source(),
    }


def real_data_job(spec: dict[str, Any], fresh: bool = False) -> dict[str, Any]:
    """Train and test one model on one data set (``real_data_job``) in a fresh process; the spec with its result.

    Results are cached in ``REAL_DATA_JOBS`` by the spec's hash, which ``real_data.py`` and ``input_size.py``
    share; ``fresh`` runs the job again.
    """
    label = ", ".join(f"{key} {spec[key]}" for key in ("model", "dataset", "image_size", "tile", "seed") if key in spec)
    key = spec_key(spec)
    return {
        **spec,
        **run_job("benchmarks.real_data_job", "train", spec, REAL_DATA_JOBS, key, reuse=not fresh, label=label),
    }


class EpochTimer(Callback):
    """Wall time of every training epoch, from its start to its end (the end-of-epoch validation included)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the epoch's clock."""
        del trainer, pl_module
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop the epoch's clock."""
        del trainer, pl_module
        self.seconds.append(time.perf_counter() - self._start)


def quiet_libraries() -> None:
    """Silence the per-run warnings and info lines of Lightning, anomalib, timm and NNCF."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "anomalib", "nncf"):
        logging.getLogger(name).setLevel(logging.ERROR)


def extract_metrics(results: Sequence[dict[str, float]]) -> dict[str, float]:
    """Pick the benchmark metrics out of ``engine.test``'s result; fail loudly if one is missing."""
    merged = {key: float(value) for result in results for key, value in result.items()}
    missing = [key for key in METRIC_KEYS if key not in merged]
    if missing:
        msg = f"engine.test returned no {missing}; it returned {sorted(merged)}."
        raise KeyError(msg)
    return {short: merged[key] for key, short in METRIC_KEYS.items()}


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (NaN for no values)."""
    return sum(values) / len(values) if values else math.nan


def paired_ratio(samples: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ``samples[i] / reference[i]``: both were timed in the same round, so noise cancels."""
    return statistics.median(a / b for a, b in zip(samples, reference, strict=True))


def environment() -> dict[str, Any]:
    """Versions and CPU facts that the figures depend on."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "openvino": version("openvino"),
        "anomalib": version("anomalib"),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu or platform.processor() or platform.machine(),
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating the folder (NaN stays NaN, as Python's json writes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def demo_datamodule(
    root: Path, category: str, batch_size: int = BATCH_SIZE, num_workers: int = NUM_WORKERS, **kwargs: Any
) -> MVTecAD:
    """anomalib's ``MVTecAD`` over one category of an MVTec-layout folder, as every benchmark builds it."""
    return MVTecAD(
        root=root, category=category, train_batch_size=batch_size, eval_batch_size=batch_size,
        num_workers=num_workers, **kwargs,
    )  # fmt: skip


def cpu_engine(root: Path, epochs: int, callbacks: Sequence[Callback] = (), **kwargs: Any) -> Engine:
    """anomalib's ``Engine`` on one CPU device, without logger, progress bar or model summary."""
    return Engine(
        callbacks=list(callbacks), logger=False, max_epochs=epochs, accelerator="cpu", devices=1,
        default_root_dir=root, enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip
