"""Shared fixtures: a tiny demo dataset and one CflowPlus trained on it, both made once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import TINY, TINY_CATEGORY, tiny_datamodule


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MVTec-layout demo dataset root (brick only, 128 px)."""
    from anomalib_cflow_plus.data import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    return generate_demo_dataset(root, textures=(TINY_CATEGORY,), seed=0, **TINY)


@dataclass
class TrainedRun:
    """A model fitted on the tiny dataset, with its engine, datamodule, checkpoint and test metrics."""

    model: object
    engine: object
    datamodule: object
    checkpoint: Path
    metrics: dict


@pytest.fixture(scope="session")
def trained_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """CflowPlus (default backbone) trained for 2 epochs on the tiny dataset, then tested."""
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_cflow_plus import CflowPlus

    seed_everything(42)
    root = tmp_path_factory.mktemp("run")
    datamodule = tiny_datamodule(tiny_dataset)
    model = CflowPlus()
    engine = Engine(max_epochs=2, default_root_dir=root, accelerator="cpu", devices=1, logger=False)
    engine.fit(model, datamodule=datamodule)
    metrics = engine.test(model, datamodule=datamodule)[0]
    checkpoint = Path(
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    return TrainedRun(model, engine, datamodule, checkpoint, metrics)
