"""Bad and unusual input through anomalib's Engine and its own MVTecAD and Folder datamodules, with DataCheckCallback.

What must work (grayscale, RGBA and palette images, odd and tiny sizes, stray non-image files)
trains, tests and predicts; what cannot work (corrupt, truncated or clipped images, masks of the
wrong size, an empty training folder) stops the run before training, with an error naming the files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_cflow_plus.data import (
    DataCheckCallback,
    EmptyTrainingSetError,
    UnreadableImagesError,
    generate_demo_dataset,
)

SIZE = 64
STRAY_FILES = {"notes.txt": b"not an image", ".DS_Store": b"\x00\x00\x00\x01Bud1", "Thumbs.db": b"\xd0\xcf\x11\xe0"}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo category ``brick``: 4 train, 2 test/good and 2 test/hole images of 64 px, with masks."""
    root = tmp_path_factory.mktemp("bad_input_demo")
    return generate_demo_dataset(
        root, textures=("brick",), image_size=SIZE, n_train=4, n_test_good=2, n_test_defect=2, defects=("hole",)
    )


def copy_dataset(demo_root: Path, destination: Path) -> Path:
    """Copy the demo dataset to ``destination`` and return the category folder."""
    shutil.copytree(demo_root, destination)
    return destination / "brick"


def convert(path: Path, mode: str | None = None, size: tuple[int, int] | None = None) -> None:
    """Rewrite an image in place in another mode and/or at another size (width, height)."""
    with Image.open(path) as image:
        image.load()
    if size is not None:
        image = image.resize(size, Image.Resampling.NEAREST)
    (image.convert(mode) if mode else image).save(path)


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def mvtec(root: Path):
    from anomalib.data import MVTecAD

    return MVTecAD(root=root, category="brick", train_batch_size=4, eval_batch_size=4, num_workers=0)


def folder(category: Path):
    from anomalib.data import Folder

    return Folder(
        name="brick_hole",
        root=category,
        normal_dir="train/good",
        abnormal_dir="test/hole",
        normal_test_dir="test/good",
        mask_dir="ground_truth/hole",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        seed=0,
    )


def tiny_model():
    from anomalib_cflow_plus import CflowPlus

    return CflowPlus(
        backbone="efficientnet_lite0",
        pre_trained=False,
        coupling_blocks=2,
        condition_vector=16,
        pre_processor=CflowPlus.configure_pre_processor((SIZE, SIZE)),
        visualizer=False,
    )


def engine(root: Path):
    from anomalib.engine import Engine

    return Engine(
        max_epochs=1,
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DataCheckCallback()],
    )


@pytest.fixture(scope="module")
def quirky_category(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo category with every input that must work: other image modes, odd and tiny sizes, stray files."""
    category = copy_dataset(demo_root, tmp_path_factory.mktemp("quirky") / "data")
    train, test_good, hole, masks = (
        category / sub for sub in ("train/good", "test/good", "test/hole", "ground_truth/hole")
    )
    convert(train / "000.png", mode="L")
    convert(train / "001.png", mode="RGBA")
    convert(train / "002.png", size=(301, 173))
    convert(train / "003.png", size=(23, 17))  # smaller than the encoder's stride: the pre-processor resizes it
    convert(test_good / "000.png", mode="P", size=(301, 173))
    convert(hole / "000.png", size=(301, 173))
    convert(masks / "000_mask.png", size=(301, 173))
    convert(hole / "001.png", mode="LA")
    convert(masks / "001_mask.png", size=(SIZE // 2, SIZE // 2))  # a mask at another scale is resized with its image
    for sub in (train, test_good, hole, masks):
        for name, data in STRAY_FILES.items():
            (sub / name).write_bytes(data)
    return category


@pytest.fixture(scope="module")
def quirky_run(quirky_category: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fit, test and predict on the quirky category through MVTecAD; one epoch."""
    from lightning.pytorch import seed_everything

    seed_everything(0)
    model, run = tiny_model(), engine(tmp_path_factory.mktemp("quirky_run"))
    datamodule = mvtec(quirky_category.parent)
    run.fit(model, datamodule=datamodule)
    metrics = run.test(model, datamodule=datamodule)[0]
    predictions = run.predict(model, datamodule=datamodule)
    return {"model": model, "engine": run, "datamodule": datamodule, "metrics": metrics, "predictions": predictions}


@pytest.mark.slow
def test_other_modes_odd_sizes_and_stray_files_train_test_and_predict(quirky_run: dict) -> None:
    datamodule = quirky_run["datamodule"]
    assert len(datamodule.train_data) == 4  # the stray files are not samples
    assert all(Path(path).suffix == ".png" for path in datamodule.test_data.samples.image_path)
    assert np.isfinite([quirky_run["metrics"][key] for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")]).all()
    predictions = quirky_run["predictions"]
    assert sum(len(batch.image) for batch in predictions) == 4
    for batch in predictions:
        assert tuple(batch.image.shape[-2:]) == (SIZE, SIZE)
        assert tuple(batch.anomaly_map.shape[-2:]) == tuple(batch.gt_mask.shape[-2:]) == (SIZE, SIZE)
        assert torch.isfinite(batch.anomaly_map).all()
        for path, mask in zip(batch.image_path, batch.gt_mask, strict=True):
            assert bool(mask.any()) == ("/test/hole/" in path)  # the resized 301x173 mask still marks its defect


@pytest.mark.slow
def test_folder_datamodule_reads_the_same_quirky_folders(quirky_run: dict, quirky_category: Path) -> None:
    datamodule = folder(quirky_category)
    predictions = quirky_run["engine"].predict(quirky_run["model"], datamodule=datamodule)
    assert sorted(Path(path).name for path in datamodule.train_data.samples.image_path) == [
        f"{index:03d}.png" for index in range(4)
    ]
    train_batch = next(iter(datamodule.train_dataloader()))  # mixed sizes and modes collate into one RGB batch
    assert tuple(train_batch.image.shape[:2]) == (4, 3)
    assert len(datamodule.val_data) + len(datamodule.test_data) == 4
    predicted = sorted(path for batch in predictions for path in batch.image_path)
    assert predicted == sorted(datamodule.test_data.samples.image_path)
    for batch in predictions:
        assert tuple(batch.anomaly_map.shape[-2:]) == tuple(batch.gt_mask.shape[-2:]) == (SIZE, SIZE)
        assert torch.isfinite(batch.anomaly_map).all()


@pytest.mark.parametrize("datamodule_kind", ["mvtec", "folder"])
def test_bad_training_files_stop_fit_before_training_naming_every_file(
    demo_root: Path, tmp_path: Path, datamodule_kind: str
) -> None:
    category = copy_dataset(demo_root, tmp_path / "data")
    train = category / "train" / "good"
    truncated = truncate(train / "001.png")
    corrupt = train / "zz_corrupt.png"
    corrupt.write_bytes(b"not an image" * 10)
    fork = train / "._000.png"
    fork.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(64))
    datamodule = mvtec(category.parent) if datamodule_kind == "mvtec" else folder(category)
    run = engine(tmp_path / "run")
    with pytest.raises(UnreadableImagesError) as error:
        run.fit(tiny_model(), datamodule=datamodule)
    assert run.trainer.global_step == 0
    assert sorted(problem.file.path for problem in error.value.problems) == sorted(
        [str(fork), str(truncated), str(corrupt)]
    )
    message = str(error.value)
    assert f"train image {truncated}: OSError: image file is truncated" in message
    assert f"train image {corrupt}: UnidentifiedImageError" in message
    assert "macOS resource-fork file" in message


def test_bad_test_files_stop_fit_before_training(demo_root: Path, tmp_path: Path) -> None:
    category = copy_dataset(demo_root, tmp_path / "data")
    convert(category / "ground_truth" / "hole" / "001_mask.png", size=(SIZE, SIZE // 2))
    high_bit = category / "test" / "good" / "001.png"
    Image.fromarray(np.full((SIZE, SIZE), 50000, dtype=np.uint16)).save(high_bit)
    run = engine(tmp_path / "run")
    with pytest.raises(UnreadableImagesError) as error:
        run.fit(tiny_model(), datamodule=mvtec(category.parent))
    assert run.trainer.global_step == 0
    message = str(error.value)
    assert "mask of 64x32 px for an image of 64x64 px" in message
    assert f"test image {high_bit}: I;16 image with values up to 50000" in message


def test_empty_training_folder_stops_fit_naming_the_folder(demo_root: Path, tmp_path: Path) -> None:
    category = copy_dataset(demo_root, tmp_path / "data")
    train = category / "train" / "good"
    for path in train.iterdir():
        path.unlink()
    (train / "Thumbs.db").write_bytes(STRAY_FILES["Thumbs.db"])
    with pytest.raises(EmptyTrainingSetError) as error:
        engine(tmp_path / "run").fit(tiny_model(), datamodule=mvtec(category.parent))
    message = str(error.value)
    assert "The training set of MVTecAD (category 'brick') is empty" in message
    assert f"{train} holds 1 file(s) that were not read as training images: 1 .db (Thumbs.db)" in message


@pytest.mark.slow
def test_predict_on_a_folder_scores_the_readable_images_and_names_the_others(
    quirky_run: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = tmp_path / "to_score"
    images.mkdir()
    shutil.copy(quirky_run["datamodule"].train_data.samples.image_path[0], images / "good.png")
    bad = truncate(Path(shutil.copy(images / "good.png", images / "bad.png")))
    predictions = quirky_run["engine"].predict(quirky_run["model"], data_path=images)
    assert [Path(path).name for batch in predictions for path in batch.image_path] == ["good.png"]
    assert str(bad) in caplog.text and "Left out 1 of 2" in caplog.text
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    shutil.copy(bad, only_bad / "bad.png")
    with pytest.raises(UnreadableImagesError) as error:
        quirky_run["engine"].predict(quirky_run["model"], data_path=only_bad)
    assert [problem.file.path for problem in error.value.problems] == [str(only_bad / "bad.png")]
