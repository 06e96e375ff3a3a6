"""CflowPlus's visualizer: anomalib's, with one folder per part type when a datamodule joins several.

anomalib's :class:`~anomalib.visualization.ImageVisualizer` names each output image after the part of its path that
follows the datamodule's name and category. A :class:`~.data.MultiCategory` joins datamodules whose roots differ, so
neither is in the paths; anomalib then keeps the last folder alone, and ``brick/test/hole/000.png`` and
``grass/test/hole/000.png`` would overwrite each other. Here each part type's images go to ``images/<type>/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anomalib.visualization import ImageVisualizer
from lightning.pytorch import LightningModule, Trainer

__all__ = ["CflowPlusVisualizer"]


class CflowPlusVisualizer(ImageVisualizer):
    """anomalib's image visualizer; a batch of several part types is written to one sub-folder per type."""

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Write the batch's images; with part types (``batch.part_type (B,)``), under ``<output_dir>/<type>``."""
        names = getattr(getattr(trainer, "datamodule", None), "part_types", None)
        part_type = getattr(batch, "part_type", None)
        if not names or part_type is None:
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
            return
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "images"
        base = Path(self.output_dir)
        kinds = part_type.reshape(-1).tolist()
        try:
            for index, name in enumerate(names):
                items = [item for item, kind in zip(batch, kinds, strict=True) if kind == index]
                if items:
                    self.output_dir = base / name
                    super().on_test_batch_end(trainer, pl_module, outputs, items, batch_idx, dataloader_idx)
        finally:
            self.output_dir = base
