"""CflowPlus's visualizer: each part type's images in a folder of their own."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.data import PartTypeImageBatch
from anomalib_cflow_plus.visualizer import CflowPlusVisualizer


def scored_batch(paths: list[str], part_type: list[int]) -> PartTypeImageBatch:
    """A scored batch of 16-px images written at ``paths`` (the visualizer reads them)."""
    from PIL import Image

    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (120, 60, 30)).save(path)
    count = len(paths)
    return PartTypeImageBatch(
        image=torch.rand(count, 3, 16, 16),
        gt_label=torch.ones(count, dtype=torch.long),
        gt_mask=torch.zeros(count, 16, 16, dtype=torch.bool),
        image_path=paths,
        pred_score=torch.rand(count),
        pred_label=torch.ones(count, dtype=torch.bool),
        anomaly_map=torch.rand(count, 1, 16, 16),
        pred_mask=torch.zeros(count, 1, 16, 16, dtype=torch.bool),
        part_type=torch.tensor(part_type),
    )


def test_images_of_two_types_with_the_same_relative_path_do_not_overwrite_each_other(tmp_path: Path):
    assert isinstance(CflowPlus(coupling_blocks=1).visualizer, CflowPlusVisualizer)
    trainer = SimpleNamespace(
        default_root_dir=str(tmp_path), datamodule=SimpleNamespace(part_types=["brick", "grass"], name="MultiCategory")
    )
    paths = [f"{tmp_path}/data/brick/test/hole/000.png", f"{tmp_path}/data/grass/test/hole/000.png"]
    visualizer = CflowPlusVisualizer()
    visualizer.on_test_batch_end(trainer, None, None, scored_batch(paths, [0, 1]), 0)
    written = sorted(path.relative_to(tmp_path / "images").as_posix() for path in tmp_path.glob("images/**/*.png"))
    assert written == ["brick/hole/000.png", "grass/hole/000.png"]
    assert visualizer.output_dir == tmp_path / "images"  # restored after the batch


def test_a_batch_without_part_types_is_written_as_anomalib_writes_it(tmp_path: Path):
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), datamodule=None)
    batch = scored_batch([f"{tmp_path}/data/brick/test/hole/000.png"], [0])
    batch.part_type = None
    CflowPlusVisualizer().on_test_batch_end(trainer, None, None, batch, 0)
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("images/**/*.png")] == ["images/hole/000.png"]
