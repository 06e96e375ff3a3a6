"""Demo data for anomalib_cflow_plus: texture photos with synthetic defects in MVTec AD layout."""

from anomalib_cflow_plus.data.demo import DEFECT_TYPES, DEMO_TEXTURES, generate_demo_dataset

__all__ = ["DEFECT_TYPES", "DEMO_TEXTURES", "generate_demo_dataset"]
