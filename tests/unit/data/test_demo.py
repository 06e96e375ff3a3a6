"""Tests for the demo dataset generator (anomalib_cflow_plus.data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_cflow_plus.data import DEMO_TEXTURES, generate_demo_dataset
from anomalib_cflow_plus.data.__main__ import main
from anomalib_cflow_plus.data.demo import COVERAGE_RANGE, DEFECT_TYPES, MIN_DEFECT_DELTA, render_sample

SIZE = 64
COUNTS = {"n_train": 4, "n_test_good": 2, "n_test_defect": 2}


def _generate(root: Path, **kwargs: object) -> Path:
    """Generate a tiny dataset under ``root`` (keyword arguments override the defaults)."""
    return generate_demo_dataset(root, **({"image_size": SIZE, **COUNTS} | kwargs))


def _read(path: Path) -> np.ndarray:
    """Read a PNG file as a numpy array."""
    with Image.open(path) as image:
        return np.asarray(image)


def _snapshot(root: Path) -> dict[str, bytes]:
    """Map every file under ``root`` (relative posix path) to its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset with every texture and defect type, shared by the read-only tests."""
    return _generate(tmp_path_factory.mktemp("demo"))


def test_layout_and_counts(dataset: Path) -> None:
    """Every category has the MVTec AD folders with the requested number of files."""
    for texture in DEMO_TEXTURES:
        category = dataset / texture
        assert len(list((category / "train" / "good").glob("*.png"))) == COUNTS["n_train"]
        assert len(list((category / "test" / "good").glob("*.png"))) == COUNTS["n_test_good"]
        for defect in DEFECT_TYPES:
            images = sorted(p.name for p in (category / "test" / defect).iterdir())
            masks = sorted(p.name for p in (category / "ground_truth" / defect).iterdir())
            assert images == ["000.png", "001.png"]
            assert masks == ["000_mask.png", "001_mask.png"]
        assert not (category / "ground_truth" / "good").exists()


def test_images_are_rgb_of_image_size(dataset: Path) -> None:
    """All images are 3-channel uint8 PNGs of ``image_size``."""
    images = [p for p in dataset.rglob("*.png") if "ground_truth" not in p.parts]
    assert len(images) == len(DEMO_TEXTURES) * (4 + 2 + 2 * len(DEFECT_TYPES))
    for path in images:
        with Image.open(path) as image:
            assert image.mode == "RGB"
            assert image.size == (SIZE, SIZE)


def test_masks_are_binary_nonempty_and_sized(dataset: Path) -> None:
    """Masks are single-channel 0/255 images of ``image_size`` covering a sensible area."""
    masks = list(dataset.rglob("*_mask.png"))
    assert len(masks) == len(DEMO_TEXTURES) * len(DEFECT_TYPES) * COUNTS["n_test_defect"]
    for path in masks:
        mask = _read(path)
        assert mask.shape == (SIZE, SIZE)
        assert mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}
        assert COVERAGE_RANGE[0] <= (mask == 255).mean() <= COVERAGE_RANGE[1]


def test_files_match_in_memory_render(dataset: Path) -> None:
    """The written defective image and mask equal the in-memory render of the same sample."""
    for texture in DEMO_TEXTURES:
        for defect in DEFECT_TYPES:
            sample = render_sample(texture, f"test/{defect}", 1, SIZE, seed=0)
            np.testing.assert_array_equal(_read(dataset / texture / "test" / defect / "001.png"), sample.defective)
            np.testing.assert_array_equal(
                _read(dataset / texture / "ground_truth" / defect / "001_mask.png"), sample.mask * 255
            )


@pytest.mark.parametrize("defect", DEFECT_TYPES)
@pytest.mark.parametrize("texture", DEMO_TEXTURES)
def test_defect_changes_exactly_the_masked_pixels(texture: str, defect: str) -> None:
    """Pixels outside the mask are untouched; every masked pixel changes by at least MIN_DEFECT_DELTA."""
    for index in range(4):
        sample = render_sample(texture, f"test/{defect}", index, image_size=96, seed=3)
        change = np.abs(sample.defective.astype(int) - sample.clean.astype(int)).max(axis=-1)
        assert sample.mask.shape == (96, 96)
        assert COVERAGE_RANGE[0] <= sample.mask.mean() <= COVERAGE_RANGE[1]
        assert (change[~sample.mask] == 0).all()
        assert (change[sample.mask] >= MIN_DEFECT_DELTA).all()


def test_stain_is_coloured() -> None:
    """Stains tint the masked pixels, so the defective image is no longer grey there."""
    sample = render_sample("gravel", "test/stain", 0, SIZE)
    pixels = sample.defective[sample.mask].astype(int)
    assert (pixels[:, 0] - pixels[:, 2]).mean() > 20
    assert (sample.clean[..., 0] == sample.clean[..., 2]).all()


@pytest.mark.parametrize("texture", DEMO_TEXTURES)
def test_normal_train_and_test_images_share_a_distribution(texture: str) -> None:
    """Normal train and test images come from the same random views (similar intensity statistics)."""
    train = np.stack([render_sample(texture, "train/good", i, SIZE).clean for i in range(16)])
    test = np.stack([render_sample(texture, "test/good", i, SIZE).clean for i in range(16)])
    assert abs(train.mean() - test.mean()) < 10
    assert abs(train.std() - test.std()) < 10
    assert not np.array_equal(train[0], test[0])


def test_is_deterministic(tmp_path: Path) -> None:
    """The same arguments give byte-identical files; another seed gives different ones."""
    first = _snapshot(_generate(tmp_path / "a", image_size=32, seed=7))
    second = _snapshot(_generate(tmp_path / "b", image_size=32, seed=7))
    other = _snapshot(_generate(tmp_path / "c", image_size=32, seed=8))
    assert first == second
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_texture_subset_matches_full_dataset(tmp_path: Path, dataset: Path) -> None:
    """A texture's files do not depend on which other textures are generated with it."""
    root = _generate(tmp_path, textures="grass")
    assert [p.name for p in root.iterdir()] == ["grass"]
    assert _snapshot(root / "grass") == _snapshot(dataset / "grass")


def test_complete_category_is_kept_and_incomplete_one_regenerated(tmp_path: Path) -> None:
    """Existing complete categories are skipped unless ``overwrite``; incomplete ones are rebuilt."""
    root = _generate(tmp_path, textures=["brick"], defects=["hole"])
    image = root / "brick" / "train" / "good" / "000.png"
    image.write_bytes(image.read_bytes() + b"tampered")  # same file set: looks complete
    _generate(tmp_path, textures=["brick"], defects=["hole"])
    assert image.read_bytes().endswith(b"tampered")
    _generate(tmp_path, textures=["brick"], defects=["hole"], overwrite=True)
    assert not image.read_bytes().endswith(b"tampered")

    (root / "brick" / "test" / "hole" / "001.png").unlink()
    (root / "brick" / "stray.txt").write_text("x")
    _generate(tmp_path, textures=["brick"], defects=["hole"])
    assert (root / "brick" / "test" / "hole" / "001.png").is_file()
    assert not (root / "brick" / "stray.txt").exists()

    _generate(tmp_path, textures=["brick"], defects=["hole"], image_size=40)
    assert _read(image).shape == (40, 40, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"textures": ["brick", "marble"]}, r"Unknown texture.*marble.*valid textures: brick, grass, gravel"),
        ({"textures": []}, "At least one texture"),
        ({"textures": ["brick", "brick"]}, "Duplicate texture"),
        ({"defects": ["crack"]}, r"Unknown defect.*crack.*valid defects: perlin"),
        ({"image_size": 16}, "image_size must be an integer >= 32"),
        ({"image_size": 64.0}, "image_size must be an integer"),
        ({"n_train": 0}, "n_train must be an integer >= 1"),
        ({"n_test_good": 0}, "n_test_good"),
        ({"n_test_defect": -1}, "n_test_defect"),
        ({"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_invalid_arguments_raise(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    """Invalid arguments raise a ValueError naming the problem, before anything is written."""
    with pytest.raises(ValueError, match=match):
        _generate(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_mvtec_datamodule_reads_dataset(dataset: Path) -> None:
    """Anomalib's MVTecAD datamodule loads a category unchanged, including ground-truth masks."""
    from anomalib.data import MVTecAD

    datamodule = MVTecAD(root=dataset, category="brick", train_batch_size=4, eval_batch_size=4, num_workers=0)
    datamodule.setup()
    train_batch = next(iter(datamodule.train_dataloader()))
    assert tuple(train_batch.image.shape) == (4, 3, SIZE, SIZE)
    assert len(datamodule.test_data) == COUNTS["n_test_good"] + COUNTS["n_test_defect"] * len(DEFECT_TYPES)
    test_batch = next(iter(datamodule.test_dataloader()))
    assert tuple(test_batch.image.shape[1:]) == (3, SIZE, SIZE)
    assert test_batch.gt_mask is not None
    assert tuple(test_batch.gt_mask.shape[-2:]) == (SIZE, SIZE)


def test_folder_datamodule_reads_dataset(dataset: Path) -> None:
    """Anomalib's Folder datamodule loads one defect type with its masks."""
    from anomalib.data import Folder

    datamodule = Folder(
        name="brick_scratch",
        root=dataset / "brick",
        normal_dir="train/good",
        abnormal_dir="test/scratch",
        normal_test_dir="test/good",
        mask_dir="ground_truth/scratch",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        seed=0,
    )
    datamodule.setup()
    train_batch = next(iter(datamodule.train_dataloader()))
    assert tuple(train_batch.image.shape) == (4, 3, SIZE, SIZE)
    test_batch = next(iter(datamodule.test_dataloader()))
    assert test_batch.gt_mask is not None
    assert tuple(test_batch.gt_mask.shape[-2:]) == (SIZE, SIZE)
    assert test_batch.gt_mask.flatten(1).any(dim=1).tolist() == test_batch.gt_label.bool().tolist()


def test_cli_writes_dataset_and_reports_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m anomalib_cflow_plus.data`` writes the dataset and prints where and how many files."""
    argv = ["--root", str(tmp_path), "--textures", "gravel", "--defects", "stain", "--image-size", "32"]
    assert main([*argv, "--n-train", "3", "--n-test-good", "1", "--n-test-defect", "2"]) == 0
    output = capsys.readouterr().out
    assert str(tmp_path.resolve()) in output
    assert "train/good=3" in output
    assert "ground_truth/stain=2" in output
    assert len(list((tmp_path / "gravel" / "test" / "stain").glob("*.png"))) == 2
    assert main([*argv, "--n-train", "0"]) == 2


def test_non_square_images_keep_their_aspect_and_every_defect_fits(tmp_path: Path) -> None:
    """``image_size=(H, W)`` writes H x W images and masks; thin scratches stay thin and inside the image."""
    root = _generate(tmp_path, textures=["brick"], image_size=(40, 100), n_test_defect=3)
    for path in root.rglob("*.png"):
        assert _read(path).shape[:2] == (40, 100), path
    for defect in DEFECT_TYPES:
        for mask_path in (root / "brick" / "ground_truth" / defect).glob("*.png"):
            coverage = (_read(mask_path) > 0).mean()
            assert COVERAGE_RANGE[0] <= coverage <= COVERAGE_RANGE[1], (mask_path, coverage)
    # a long image is a crop at its own aspect, not a squeezed square: good images differ along their width
    image = _read(root / "brick" / "train" / "good" / "000.png").astype(float)
    assert np.abs(image[:, :50] - image[:, 50:]).mean() > 1


def test_square_size_given_as_a_pair_is_the_same_dataset(tmp_path: Path) -> None:
    """``(S, S)`` and ``S`` write byte-identical files."""
    assert _snapshot(_generate(tmp_path / "a", image_size=48)) == _snapshot(
        _generate(tmp_path / "b", image_size=(48, 48))
    )


@pytest.mark.parametrize(("text", "expected"), [("256", 256), ("256x640", (256, 640)), ("128X96", (128, 96))])
def test_cli_parses_image_size(text: str, expected: object) -> None:
    from anomalib_cflow_plus.data.__main__ import parse_image_size

    assert parse_image_size(text) == expected


def test_cli_rejects_a_malformed_image_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--root", str(tmp_path), "--image-size", "256x"])
    assert "HEIGHTxWIDTH" in capsys.readouterr().err
    assert main(["--root", str(tmp_path), "--image-size", "64x16", "--n-train", "1"]) == 2
    assert "image_size width must be an integer >= 32" in capsys.readouterr().err
