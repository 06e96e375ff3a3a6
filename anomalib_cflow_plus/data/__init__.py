"""Data for anomalib_cflow_plus: checks of a datamodule's files (``checks``, ``layout``), the demo generator (``demo``).

``multi_category`` joins the datamodules of several part types into one (``MultiCategory``).

The names are loaded when first used, so that the model, which imports the checks, never imports the demo
generator (and scikit-image with it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalib_cflow_plus.data.checks import DataCheckCallback, EmptyTrainingSetError, UnreadableImagesError
    from anomalib_cflow_plus.data.demo import DEFECT_TYPES, DEMO_TEXTURES, generate_demo_dataset
    from anomalib_cflow_plus.data.layout import MaskMismatchError, check_masks, report_skipped_files
    from anomalib_cflow_plus.data.multi_category import (
        MultiCategory,
        PartTypeDataset,
        PartTypeImageBatch,
        PartTypeImageItem,
    )

_MODULE_OF = {
    "DataCheckCallback": "checks",
    "EmptyTrainingSetError": "checks",
    "UnreadableImagesError": "checks",
    "MaskMismatchError": "layout",
    "check_masks": "layout",
    "report_skipped_files": "layout",
    "DEFECT_TYPES": "demo",
    "DEMO_TEXTURES": "demo",
    "generate_demo_dataset": "demo",
    "MultiCategory": "multi_category",
    "PartTypeDataset": "multi_category",
    "PartTypeImageBatch": "multi_category",
    "PartTypeImageItem": "multi_category",
}

__all__ = [
    "DEFECT_TYPES",
    "DEMO_TEXTURES",
    "DataCheckCallback",
    "EmptyTrainingSetError",
    "MaskMismatchError",
    "MultiCategory",
    "PartTypeDataset",
    "PartTypeImageBatch",
    "PartTypeImageItem",
    "UnreadableImagesError",
    "check_masks",
    "generate_demo_dataset",
    "report_skipped_files",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use."""
    module = _MODULE_OF.get(name)
    if module is None:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
