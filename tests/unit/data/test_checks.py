"""Tests for the data checks (anomalib_cflow_plus.data.checks): empty training sets and unreadable files."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Subset

from anomalib_cflow_plus.data import checks
from anomalib_cflow_plus.data.checks import (
    DataCheckCallback,
    EmptyTrainingSetError,
    ImageFile,
    UnreadableImagesError,
    check_training_set,
    dataset_files,
    find_image_problems,
    probe_image,
)


def write_image(path: Path, size: tuple[int, int] = (40, 24), mode: str = "RGB", seed: int = 0) -> Path:
    """Write a random image of ``size`` (width, height) and ``mode`` (format from the suffix); return its path."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def truncate(path: Path) -> Path:
    """Cut a file to half its length, as an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_category(root: Path, n_train: int = 3, size: tuple[int, int] = (40, 24)) -> Path:
    """Write a tiny MVTec AD category ``root/cat``: train/good, test/good, test/dent and its masks."""
    category = root / "cat"
    for index in range(n_train):
        write_image(category / "train" / "good" / f"{index:03d}.png", size, seed=index)
    write_image(category / "test" / "good" / "000.png", size, seed=10)
    write_image(category / "test" / "dent" / "000.png", size, seed=11)
    write_image(category / "ground_truth" / "dent" / "000_mask.png", size, mode="L", seed=12)
    return category


def mvtec(root: Path):
    from anomalib.data import MVTecAD

    datamodule = MVTecAD(root=root, category="cat", train_batch_size=2, eval_batch_size=2, num_workers=0)
    datamodule.setup()
    return datamodule


# ------------------------------------------------------------ probe_image
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "CMYK"])
def test_probe_reads_every_8_bit_mode(tmp_path: Path, mode: str) -> None:
    suffix = ".jpg" if mode == "CMYK" else ".png"
    probe = probe_image(write_image(tmp_path / f"a{suffix}", (301, 173), mode))
    assert probe == checks.ImageProbe(size=(301, 173))


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_probe_finds_truncated_file_that_opens(tmp_path: Path, suffix: str) -> None:
    path = truncate(write_image(tmp_path / f"a{suffix}", (128, 96)))
    with Image.open(path) as image:  # PIL opens it: only decoding fails
        assert image.size == (128, 96)
    probe = probe_image(path)
    assert probe.size is None
    assert "truncated" in probe.problem


def test_probe_names_non_images_and_resource_forks(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert probe_image(text).problem.startswith("UnidentifiedImageError")
    assert "resource-fork" not in probe_image(text).problem
    fork = tmp_path / "._000.png"
    fork.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(64))
    assert "macOS resource-fork file" in probe_image(fork).problem
    assert probe_image(tmp_path / "missing.png").problem.startswith("FileNotFoundError")


def test_probe_flags_16_bit_images_that_anomalib_would_clip(tmp_path: Path) -> None:
    high = tmp_path / "high.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(high)
    low = tmp_path / "low.png"
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint16)).save(low)
    with Image.open(high) as image:  # what anomalib's read_image does: the image becomes white
        assert np.asarray(image.convert("RGB")).min() == 255
    assert "values up to 40000" in probe_image(high).problem
    assert probe_image(low).problem is None
    assert probe_image(high, role="mask").problem is None  # a mask is only compared with 0


# ---------------------------------------------------- find_image_problems
def test_find_lists_every_bad_file_once_in_order(tmp_path: Path) -> None:
    good = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(6)]
    truncate(good[1])
    good[4].write_bytes(b"junk")
    files = [ImageFile(str(path), "image", "train") for path in good]
    files.append(ImageFile(str(good[1]), "image", "test"))  # the same path again
    for workers in (1, 4):
        problems = find_image_problems(files, workers=workers)
        assert [problem.file.path for problem in problems] == [str(good[1]), str(good[4])]
        assert [problem.file.subset for problem in problems] == ["train", "train"]


def test_find_flags_a_mask_of_another_shape_than_its_image(tmp_path: Path) -> None:
    image = write_image(tmp_path / "img.png", (301, 173))
    files = [ImageFile(str(image), "image", "test")]
    for size in [(301, 173), (150, 86), (602, 346)]:  # another scale lines up once anomalib resizes both
        mask = write_image(tmp_path / f"mask_{size[0]}.png", size, mode="L")
        assert find_image_problems([*files, ImageFile(str(mask), "mask", "test", image=str(image))]) == []
    other = write_image(tmp_path / "other_mask.png", (173, 173), mode="L")
    (problem,) = find_image_problems([*files, ImageFile(str(other), "mask", "test", image=str(image))])
    assert problem.file.path == str(other)
    assert (
        problem.problem == f"mask of 173x173 px for an image of 301x173 px ({image}): another shape, it cannot line up"
    )


def test_a_good_file_is_decoded_again_only_once_it_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_image(tmp_path / "a.png")
    files = [ImageFile(str(path), "image", "train")]
    probed = count_probes(monkeypatch)
    assert find_image_problems(files) == []
    assert find_image_problems(files) == []
    assert probed == [str(path)]
    truncate(path)
    assert len(find_image_problems(files)) == 1
    assert len(find_image_problems(files)) == 1  # a bad file is decoded every time
    assert probed == [str(path)] * 3


# --------------------------------------------------------- dataset_files
def test_dataset_files_of_anomalib_datasets(tmp_path: Path) -> None:
    from anomalib.data import PredictDataset

    category = write_category(tmp_path)
    datamodule = mvtec(tmp_path)
    train = dataset_files(datamodule.train_data, "train")
    assert sorted(Path(file.path).name for file in train) == ["000.png", "001.png", "002.png"]
    assert {(file.role, file.subset) for file in train} == {("image", "train")}
    test = dataset_files(datamodule.test_data, "test")
    masks = [file for file in test if file.role == "mask"]
    assert [(file.path, file.image) for file in masks] == [
        (str(category / "ground_truth/dent/000_mask.png"), str(category / "test/dent/000.png"))
    ]
    assert len(test) == 3
    wrapped = ConcatDataset([Subset(datamodule.train_data, [0]), datamodule.test_data])
    assert len(dataset_files(wrapped, "val")) == len(train) + len(test)
    predict = dataset_files(PredictDataset(category / "test"), "predict")
    assert sorted(Path(file.path).name for file in predict) == ["000.png", "000.png"]
    assert dataset_files(list(range(3)), "train") == []


# ---------------------------------------------------- check_training_set
def test_empty_training_folder_names_category_folder_and_skipped_files(tmp_path: Path) -> None:
    category = write_category(tmp_path, n_train=0)
    good = category / "train" / "good"
    good.mkdir(parents=True)
    (good / "notes.txt").write_text("x")
    write_image(good / "000.jpg")  # MVTecAD reads .png only
    datamodule = mvtec(tmp_path)
    assert len(datamodule.train_data) == 0
    with pytest.raises(EmptyTrainingSetError) as error:
        check_training_set(datamodule)
    message = str(error.value)
    assert "MVTecAD (category 'cat')" in message
    assert f"{good} holds 2 file(s) that were not read as training images" in message
    assert "000.jpg" in message
    assert "notes.txt" in message


def test_missing_training_folder_is_named(tmp_path: Path) -> None:
    write_category(tmp_path, n_train=0)
    with pytest.raises(EmptyTrainingSetError, match=r"cat/train does not exist"):
        check_training_set(mvtec(tmp_path))


def test_one_training_image_passes_and_only_datamodules_with_train_data_are_checked(tmp_path: Path) -> None:
    write_category(tmp_path, n_train=1)
    datamodule = mvtec(tmp_path)
    assert len(datamodule.train_data) == 1
    assert check_training_set(datamodule) is None  # one image is enough
    assert check_training_set(SimpleNamespace(name="parts")) is None  # no train_data: not checked
    with pytest.raises(EmptyTrainingSetError, match=r"The training set of parts is empty"):
        check_training_set(SimpleNamespace(name="parts", train_data=[]))  # the same datamodule with an empty one


def test_empty_folder_datamodule_names_normal_dir(tmp_path: Path) -> None:
    datamodule = SimpleNamespace(
        name="parts", category="", train_data=[], root=tmp_path, normal_dir="good", test_split_mode="from_dir"
    )
    with pytest.raises(
        EmptyTrainingSetError, match=rf"The training set of parts is empty.*{tmp_path / 'good'} does not"
    ):
        check_training_set(datamodule)


# ------------------------------------------------------ DataCheckCallback
def count_probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every path the checks decode."""
    probed: list[str] = []
    probe = checks.probe_image

    def recording_probe(path: str, role: str = "image") -> checks.ImageProbe:
        probed.append(path)
        return probe(path, role)

    monkeypatch.setattr(checks, "probe_image", recording_probe)
    return probed


def test_callback_at_fit_setup_checks_every_subset_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    category = write_category(tmp_path)
    probed = count_probes(monkeypatch)
    datamodule = mvtec(tmp_path)
    trainer = SimpleNamespace(datamodule=datamodule, test_dataloaders=datamodule.test_dataloader())
    callback = DataCheckCallback()
    callback.setup(trainer, None, "fit")
    assert sorted(probed) == sorted(str(path) for path in category.rglob("*.png"))
    callback.on_test_start(trainer, None)  # nothing new to decode
    assert len(probed) == 6
    DataCheckCallback().setup(SimpleNamespace(datamodule=datamodule), None, "test")  # only fit checks the datamodule
    assert len(probed) == 6


def test_callback_raises_one_error_listing_all_bad_files(tmp_path: Path) -> None:
    category = write_category(tmp_path)
    truncate(category / "train" / "good" / "001.png")
    (category / "train" / "good" / "002.png").write_bytes(b"\x89PNG garbage")
    truncate(category / "ground_truth" / "dent" / "000_mask.png")
    trainer, callback = SimpleNamespace(datamodule=mvtec(tmp_path)), DataCheckCallback()
    with pytest.raises(UnreadableImagesError) as error:
        callback.setup(trainer, None, "fit")
    assert [(problem.file.subset, Path(problem.file.path).name) for problem in error.value.problems] == [
        ("train", "001.png"),
        ("train", "002.png"),
        ("test", "000_mask.png"),
    ]
    message = str(error.value)
    assert message.startswith("3 of 6 image and mask files cannot be used")
    assert f"train image {category}/train/good/001.png: OSError: image file is truncated" in message
    assert f"test mask {category}/ground_truth/dent/000_mask.png: " in message

    with pytest.raises(UnreadableImagesError) as again:  # bad files are checked again by the same callback
        callback.setup(trainer, None, "fit")
    assert again.value.problems == error.value.problems
    write_image(category / "train" / "good" / "001.png")
    write_image(category / "train" / "good" / "002.png")
    write_image(category / "ground_truth" / "dent" / "000_mask.png", (20, 20), mode="L")
    with pytest.raises(UnreadableImagesError, match=r"(?s)1 of 3 .*mask of 20x20 px for an image of 40x24 px"):
        callback.setup(trainer, None, "fit")


def test_prediction_leaves_out_unreadable_images_and_names_them(tmp_path: Path, caplog) -> None:
    from anomalib.data import PredictDataset

    good = write_image(tmp_path / "predict" / "good.png")
    bad = truncate(write_image(tmp_path / "predict" / "bad.png"))
    dataset = PredictDataset(tmp_path / "predict")
    trainer = SimpleNamespace(predict_dataloaders=[DataLoader(dataset, collate_fn=lambda items: items)])
    callback = DataCheckCallback()
    with caplog.at_level(logging.WARNING):
        callback.on_predict_start(trainer, None)
    assert [str(name) for name in dataset.image_filenames] == [str(good)]
    assert str(bad) in caplog.text and "truncated" in caplog.text and "Left out 1 of 2" in caplog.text
    assert callback.checked_paths == {str(good)}  # a bad file is checked again next time


def test_prediction_stops_when_no_image_can_be_read(tmp_path: Path) -> None:
    from anomalib.data import PredictDataset

    bad = truncate(write_image(tmp_path / "predict" / "bad.png"))
    loader = DataLoader(PredictDataset(tmp_path / "predict"), collate_fn=lambda items: items)
    with pytest.raises(UnreadableImagesError) as error:
        DataCheckCallback().on_predict_start(SimpleNamespace(predict_dataloaders=[loader]), None)
    assert [problem.file.path for problem in error.value.problems] == [str(bad)]
    assert error.value.problems[0].file.subset == "predict"


def test_testing_still_stops_on_an_unreadable_image(tmp_path: Path) -> None:
    from anomalib.data import PredictDataset

    write_image(tmp_path / "test" / "good.png")
    bad = truncate(write_image(tmp_path / "test" / "bad.png"))
    loader = DataLoader(PredictDataset(tmp_path / "test"), collate_fn=lambda items: items)
    with pytest.raises(
        UnreadableImagesError, match=rf"test image {re.escape(str(bad))}: OSError: image file is truncated"
    ):
        DataCheckCallback().on_test_start(SimpleNamespace(test_dataloaders=[loader]), None)


def test_callback_without_decoding_keeps_the_empty_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    category = write_category(tmp_path)
    truncate(category / "train" / "good" / "001.png")
    probed = count_probes(monkeypatch)
    trainer = SimpleNamespace(datamodule=mvtec(tmp_path))
    DataCheckCallback(decode=False).setup(trainer, None, "fit")
    assert probed == []
    trainer.datamodule.train_data.samples = trainer.datamodule.train_data.samples.iloc[:0]
    with pytest.raises(EmptyTrainingSetError, match=r"The training set of MVTecAD \(category 'cat'\) is empty"):
        DataCheckCallback(decode=False).setup(trainer, None, "fit")
