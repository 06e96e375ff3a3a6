"""Tests for the folder checks that run before anomalib builds its datasets (anomalib_cflow_plus.data.layout)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from anomalib.data import Folder, MVTecAD

from anomalib_cflow_plus.data import MaskMismatchError, check_masks, generate_demo_dataset, report_skipped_files


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layout")
    return generate_demo_dataset(
        root, textures=("brick",), image_size=32, n_train=2, n_test_good=1, n_test_defect=3, defects=("hole",)
    )


@pytest.fixture
def category(demo: Path, tmp_path: Path) -> Path:
    shutil.copytree(demo, tmp_path / "data")
    return tmp_path / "data" / "brick"


def mvtec(category: Path) -> MVTecAD:
    return MVTecAD(root=category.parent, category=category.name, num_workers=0)


def folder(category: Path) -> Folder:
    return Folder(
        name="brick", root=category, normal_dir="train/good", abnormal_dir="test/hole", mask_dir="ground_truth/hole",
        num_workers=0,
    )  # fmt: skip


@pytest.mark.parametrize("datamodule", [mvtec, folder])
def test_complete_masks_pass_and_anomalib_builds(category: Path, datamodule) -> None:
    check_masks(datamodule(category))
    built = datamodule(category)
    built.setup()  # anomalib's own builder agrees
    samples = [*built.test_data.samples.itertuples(), *built.val_data.samples.itertuples()]
    paired = {(Path(row.image_path).stem, Path(row.mask_path).stem) for row in samples if row.label_index == 1}
    assert paired == {("000", "000_mask"), ("001", "001_mask"), ("002", "002_mask")}


@pytest.mark.parametrize("datamodule", [mvtec, folder])
def test_a_missing_mask_is_named_before_anomalib_fails(category: Path, datamodule) -> None:
    (category / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(MaskMismatchError) as error:
        check_masks(datamodule(category))
    message = str(error.value)
    assert "Defect images with no mask (1)" in message
    assert str(category / "test" / "hole" / "001.png") in message
    assert "Masks with no defect image" not in message
    with pytest.raises(Exception) as anomalib_error:  # what the user saw without the check
        datamodule(category).setup()
    assert "001" not in str(anomalib_error.value)


def test_an_orphan_mask_is_named(category: Path) -> None:
    (category / "test" / "hole" / "002.png").unlink()
    with pytest.raises(MaskMismatchError) as error:
        check_masks(mvtec(category))
    assert f"Masks with no defect image (1): {category / 'ground_truth' / 'hole' / '002_mask.png'}" in str(error.value)


def test_other_datamodules_are_not_checked(category: Path) -> None:
    (category / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(MaskMismatchError, match=r"Defect images with no mask \(1\)"):
        check_masks(mvtec(category))  # the folders are broken
    # a datamodule of another type with MVTecAD's attributes, and a Folder without masks: their layouts are not known
    assert check_masks(SimpleNamespace(root=category.parent, category=category.name, name="brick")) is None
    no_masks = Folder(name="brick", root=category, normal_dir="train/good", abnormal_dir="test/hole", num_workers=0)
    assert check_masks(no_masks) is None


def test_files_mvtec_will_not_read_are_counted_in_one_line(category: Path, caplog) -> None:
    train = category / "train" / "good"
    shutil.copy(train / "000.png", train / "100.jpg")
    shutil.copy(train / "000.png", train / "101.JPG")
    (train / "102.png").symlink_to(train / "gone.png")
    with caplog.at_level(logging.WARNING):
        skipped = report_skipped_files(mvtec(category))
    assert skipped == 3
    lines = [record.getMessage() for record in caplog.records if "will not read" in record.getMessage()]
    assert len(lines) == 1
    assert "1 .jpg files" in lines[0] and "1 .JPG files" in lines[0] and "use anomalib's Folder" in lines[0]
    assert f"1 dangling links ({train / '102.png'})" in lines[0]


def test_nothing_is_reported_for_a_clean_category(category: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert report_skipped_files(mvtec(category)) == 0
    assert "will not read" not in caplog.text
