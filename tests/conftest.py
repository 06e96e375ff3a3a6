"""Shared fixtures: a tiny demo dataset generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = {"image_size": 128, "n_train": 16, "n_test_good": 6, "n_test_defect": 3}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MVTec-layout demo dataset (brick only) shared by the integration tests."""
    from anomalib_cflow_plus.data import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    return generate_demo_dataset(root, textures=("brick",), seed=0, **TINY)
