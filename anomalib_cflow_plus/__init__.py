"""CFLOW-AD for anomalib: the ``CflowPlus`` model."""

from anomalib import models as anomalib_models

from .lightning_model import CflowPlus
from .post_processor import CflowPlusPostProcessor
from .torch_model import CflowPlusModel

# Registration for ``get_model({"class_path": "CflowPlus"})`` and YAML configs, also when the
# plugin is imported before anomalib.models (the start-up hook then defers to this line).
anomalib_models.CflowPlus = CflowPlus

__all__ = ["CflowPlus", "CflowPlusModel", "CflowPlusPostProcessor"]
