"""Data for anomalib_cflow_plus: the demo dataset generator, and checks of a datamodule's files before training."""

from anomalib_cflow_plus.data.checks import DataCheckCallback, EmptyTrainingSetError, UnreadableImagesError
from anomalib_cflow_plus.data.demo import DEFECT_TYPES, DEMO_TEXTURES, generate_demo_dataset
from anomalib_cflow_plus.data.layout import MaskMismatchError, check_masks, report_skipped_files

__all__ = [
    "DEFECT_TYPES",
    "DEMO_TEXTURES",
    "DataCheckCallback",
    "EmptyTrainingSetError",
    "MaskMismatchError",
    "UnreadableImagesError",
    "check_masks",
    "generate_demo_dataset",
    "report_skipped_files",
]
