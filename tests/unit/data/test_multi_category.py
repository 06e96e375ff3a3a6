"""Tests for MultiCategory (anomalib_cflow_plus.data.multi_category): several datamodules as one, with part types."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from anomalib_cflow_plus.data.checks import check_training_set, dataset_files, drop_images
from anomalib_cflow_plus.data.multi_category import (
    MultiCategory,
    NumpyPartTypeImageBatch,
    NumpyPartTypeImageItem,
    PartTypeDataset,
    PartTypeImageBatch,
    PartTypeImageItem,
)
from anomalib_cflow_plus.errors import ConfigurationError

DEMO_SIZE = 32  # px, square
TEXTURES = ("brick", "grass")
CONFIG = Path(__file__).resolve().parents[3] / "configs" / "multi_category.yaml"


# ---------------------------------------------------------------- data
@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two demo textures in MVTec AD layout: 4 train, 2 good and 1 defective test images each, 32 px."""
    from anomalib_cflow_plus.data import generate_demo_dataset

    root = tmp_path_factory.mktemp("multi_demo")
    return generate_demo_dataset(
        root, textures=TEXTURES, image_size=DEMO_SIZE, n_train=4, n_test_good=2, n_test_defect=1, defects=("hole",)
    )


def write_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """Write a random RGB PNG of ``size`` (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def folder(root: Path, name: str, size: tuple[int, int] = (DEMO_SIZE, DEMO_SIZE), n: int = 6, **kwargs):
    """anomalib's Folder over ``n`` random normal images of ``size`` (width, height) in ``root/name/good``."""
    from anomalib.data import Folder

    for index in range(n):
        write_image(root / name / "good" / f"{index:03d}.png", size, seed=index)
    kwargs = {"normal_split_ratio": 0.5, "val_split_mode": "same_as_test", "num_workers": 0, **kwargs}
    return Folder(name=name, root=root / name, normal_dir="good", **kwargs)


def mvtec(root: Path, category: str, **kwargs):
    from anomalib.data import MVTecAD

    return MVTecAD(root=root, category=category, num_workers=0, **kwargs)


def joined(*datamodules, batch_size: int = 3) -> MultiCategory:
    datamodule = MultiCategory(
        list(datamodules), train_batch_size=batch_size, eval_batch_size=batch_size, num_workers=0
    )
    datamodule.setup()
    return datamodule


@pytest.fixture(scope="module")
def two_textures(demo_root: Path) -> MultiCategory:
    return joined(*(mvtec(demo_root, texture) for texture in TEXTURES))


def part_type_of(path: str, roots: list[Path]) -> int:
    """The index of the root that holds ``path``."""
    (index,) = [index for index, root in enumerate(roots) if Path(path).is_relative_to(root)]
    return index


def texture_roots(demo_root: Path) -> list[Path]:
    return [demo_root / texture for texture in TEXTURES]


# ---------------------------------------------------------- part types
@pytest.mark.parametrize("subset", ["train", "val", "test"])
def test_every_item_carries_the_part_type_of_its_datamodule(two_textures, demo_root, subset):
    dataset = getattr(two_textures, f"{subset}_data")
    assert isinstance(dataset, PartTypeDataset)
    seen = []
    for index in range(len(dataset)):
        item = dataset[index]
        assert type(item) is PartTypeImageItem
        assert item.part_type.dtype == torch.long and item.part_type.ndim == 0
        assert int(item.part_type) == part_type_of(item.image_path, texture_roots(demo_root))
        seen.append(int(item.part_type))
    assert set(seen) == {0, 1}
    assert int(dataset[-1].part_type) == 1 and dataset[-1].image_path == dataset[len(dataset) - 1].image_path
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_names_and_lengths_are_those_of_the_children(two_textures):
    children = two_textures.datamodules
    assert two_textures.part_types == list(TEXTURES)
    assert two_textures.category == "brick+grass" == two_textures.train_data.category
    for subset in ("train", "val", "test"):
        dataset = getattr(two_textures, f"{subset}_data")
        child_sets = [getattr(child, f"{subset}_data") for child in children]
        assert len(dataset) == sum(len(child) for child in child_sets) > len(child_sets[0])
        samples = dataset.samples
        assert list(samples["part_type"]) == [i for i, child in enumerate(child_sets) for _ in range(len(child))]
        assert list(samples["image_path"]) == [path for child in child_sets for path in child.samples["image_path"]]
    assert two_textures.train_data.has_normal and not two_textures.train_data.has_anomalous
    assert two_textures.test_data.has_anomalous
    assert two_textures.task.value == "segmentation"


def test_batches_keep_the_part_type_through_anomalib_operations(two_textures, demo_root):
    roots = texture_roots(demo_root)
    loaders = {
        "train": (two_textures.train_dataloader(), two_textures.train_data),
        "test": (two_textures.test_dataloader(), two_textures.test_data),
        "predict": (two_textures.predict_dataloader(), two_textures.test_data),
    }
    for name, (loader, dataset) in loaders.items():
        part_types = []
        for batch in loader:
            assert type(batch) is PartTypeImageBatch, name
            expected = [part_type_of(path, roots) for path in batch.image_path]
            assert batch.part_type.tolist() == expected and batch.part_type.dtype == torch.long
            assert batch.image.shape[-2:] == (DEMO_SIZE, DEMO_SIZE)
            part_types += expected
            scored = dataclasses.replace(batch, pred_score=torch.rand(len(batch)))
            assert scored.part_type.tolist() == expected
            batch.update(pred_label=torch.ones(len(batch), dtype=torch.bool))
            assert batch.part_type.tolist() == expected
            assert [int(item.part_type) for item in batch.items] == expected
            numpy_batch = batch.to_numpy()
            assert type(numpy_batch) is NumpyPartTypeImageBatch
            assert numpy_batch.part_type.tolist() == expected
            assert [int(item.part_type) for item in numpy_batch.items] == expected
        assert sorted(part_types) == sorted(dataset.samples["part_type"].tolist()), name
        assert set(part_types) == {0, 1}


def test_collate_and_to_numpy_keep_the_part_type():
    items = [
        PartTypeImageItem(image=torch.rand(3, 8, 8), gt_label=torch.tensor(0), image_path=f"{i}.png", part_type=i)
        for i in (2, 0, 1)
    ]
    batch = PartTypeImageBatch.collate(items)
    assert type(batch) is PartTypeImageBatch
    assert batch.part_type.tolist() == [2, 0, 1] and batch.part_type.shape == (3,)
    assert [type(item) for item in batch.items] == [PartTypeImageItem] * 3
    numpy_item = items[0].to_numpy()
    assert type(numpy_item) is NumpyPartTypeImageItem and numpy_item.part_type.dtype == np.int64
    assert int(numpy_item.part_type) == 2
    assert batch.to_numpy().part_type.tolist() == [2, 0, 1]


@pytest.mark.parametrize(
    ("cls", "value"),
    [(PartTypeImageItem, 0.5), (PartTypeImageItem, [0, 1]), (PartTypeImageBatch, 1), (PartTypeImageBatch, [0.0])],
)
def test_part_type_must_be_integer_indices_of_the_right_shape(cls, value):
    with pytest.raises(ValueError, match="part_type"):
        cls(image=torch.rand(1, 3, 8, 8) if cls is PartTypeImageBatch else torch.rand(3, 8, 8), part_type=value)


# ---------------------------------------------------------- subsets
def test_a_child_without_a_validation_set_is_left_out_of_it(tmp_path):
    datamodule = joined(folder(tmp_path, "nut", val_split_mode="none"), folder(tmp_path, "bolt"))
    assert datamodule.val_data.part_types == [1] and datamodule.val_data.category == "bolt"
    assert len(datamodule.val_data) == len(datamodule.datamodules[1].val_data) > 0
    assert {int(datamodule.val_data[i].part_type) for i in range(len(datamodule.val_data))} == {1}
    assert datamodule.test_data.part_types == [0, 1]
    assert datamodule.task.value == "classification"


def test_no_validation_set_when_no_child_has_one(tmp_path):
    datamodule = joined(folder(tmp_path, "nut", val_split_mode="none"), folder(tmp_path, "bolt", val_split_mode="none"))
    assert not hasattr(datamodule, "val_data")
    assert len(datamodule.train_data) == sum(len(child.train_data) for child in datamodule.datamodules)


def test_the_package_data_checks_read_it(two_textures, demo_root):
    check_training_set(two_textures)
    files = dataset_files(two_textures.test_data, "test")
    images = [file.path for file in files if file.role == "image"]
    assert images == list(two_textures.test_data.samples["image_path"])
    assert {part_type_of(file.path, texture_roots(demo_root)) for file in files} == {0, 1}
    assert any(file.role == "mask" for file in files)


def test_dropping_images_removes_them_from_their_child(demo_root):
    datamodule = joined(*(mvtec(demo_root, texture) for texture in TEXTURES))
    test_data = datamodule.test_data
    before = len(test_data)
    dropped = str(test_data.samples["image_path"].iloc[-1])  # a grass image
    assert drop_images(test_data, {dropped}) == before - 1
    assert dropped not in set(datamodule.datamodules[1].test_data.samples["image_path"])
    assert len(datamodule.datamodules[0].test_data) + len(datamodule.datamodules[1].test_data) == before - 1
    assert all(int(test_data[i].part_type) == part_type_of(test_data[i].image_path, texture_roots(demo_root))
               for i in range(len(test_data)))  # fmt: skip


def test_augmentations_reach_every_child(two_textures):
    train = two_textures.train_data
    resize = v2.Resize((16, 24))
    try:
        train.augmentations = resize
        assert all(dataset.augmentations is resize for dataset in train.datasets)
        assert train.augmentations is resize
        assert {tuple(train[i].image.shape[-2:]) for i in range(len(train))} == {(16, 24)}
    finally:
        train.augmentations = None


# ------------------------------------------------------------ errors
def test_duplicate_part_type_names_are_refused(demo_root, tmp_path):
    with pytest.raises(ConfigurationError, match=r"datamodules\[0\] and datamodules\[2\].*'brick'.*`name`"):
        MultiCategory([mvtec(demo_root, "brick"), mvtec(demo_root, "grass"), mvtec(demo_root, "brick")])
    with pytest.raises(ConfigurationError, match=r"datamodules\[0\] and datamodules\[1\].*'grass'"):
        MultiCategory([mvtec(demo_root, "grass"), folder(tmp_path, "grass")])


@pytest.mark.parametrize("datamodules", [[], "brick", [object()]], ids=["empty", "string", "not-a-datamodule"])
def test_datamodules_must_be_a_list_of_anomalib_datamodules(datamodules):
    with pytest.raises(ConfigurationError, match="datamodule"):
        MultiCategory(datamodules)


def test_a_single_datamodule_must_be_in_a_list(demo_root):
    with pytest.raises(ConfigurationError, match="list"):
        MultiCategory(mvtec(demo_root, "brick"))


def test_a_child_with_an_empty_training_set_is_named(demo_root, tmp_path):
    category = tmp_path / "empty"
    write_image(category / "train" / "good" / "000.jpg", (DEMO_SIZE, DEMO_SIZE))  # MVTecAD reads .png only
    write_image(category / "test" / "good" / "000.png", (DEMO_SIZE, DEMO_SIZE))
    write_image(category / "test" / "hole" / "000.png", (DEMO_SIZE, DEMO_SIZE))
    write_image(category / "ground_truth" / "hole" / "000_mask.png", (DEMO_SIZE, DEMO_SIZE))
    datamodule = MultiCategory([mvtec(demo_root, "brick"), mvtec(tmp_path, "empty")], num_workers=0)
    with pytest.raises(ConfigurationError, match=r"datamodules\[1\] \(part type 'empty', root .*empty.*\.jpg"):
        datamodule.setup()


def test_prepare_data_checks_each_childs_layout(demo_root, tmp_path):
    from anomalib_cflow_plus.data import MaskMismatchError

    write_image(tmp_path / "odd" / "train" / "good" / "000.png", (DEMO_SIZE, DEMO_SIZE))
    write_image(tmp_path / "odd" / "test" / "hole" / "000.png", (DEMO_SIZE, DEMO_SIZE))  # and no mask
    (tmp_path / "odd" / "ground_truth" / "hole").mkdir(parents=True)
    datamodule = MultiCategory([mvtec(demo_root, "brick"), mvtec(tmp_path, "odd")], num_workers=0)
    with pytest.raises(MaskMismatchError, match=r"Defect images with no mask \(1\): .*odd/test/hole/000.png"):
        datamodule.prepare_data()


def test_mixed_image_sizes_without_a_fixed_resize_are_refused(tmp_path):
    datamodule = MultiCategory([folder(tmp_path, "small"), folder(tmp_path, "large", size=(48, 40))], num_workers=0)
    with pytest.raises(ConfigurationError, match=r"differ in size.*small: 32x32 px.*large: 40x48 px.*Resize"):
        datamodule.setup()


def test_mixed_tasks_are_refused(demo_root, tmp_path):
    datamodule = MultiCategory([mvtec(demo_root, "brick"), folder(tmp_path, "bolt")], num_workers=0)
    with pytest.raises(ConfigurationError, match=r"same task.*brick: segmentation.*bolt: classification"):
        datamodule.setup()


def test_mixed_image_sizes_work_with_the_model_resize(tmp_path):
    from anomalib.pre_processing import PreProcessor

    datamodule = MultiCategory(
        [folder(tmp_path, "small"), folder(tmp_path, "large", size=(48, 40))],
        train_batch_size=12,
        num_workers=0,
    )
    transform = v2.Compose([v2.Resize((24, 20)), v2.Normalize([0.5] * 3, [0.5] * 3)])
    datamodule.trainer = SimpleNamespace(model=SimpleNamespace(pre_processor=PreProcessor(transform=transform)))
    datamodule.setup()
    (batch,) = list(datamodule.train_dataloader())
    assert batch.image.shape[-2:] == (24, 20) and set(batch.part_type.tolist()) == {0, 1}


def test_mixed_image_sizes_work_with_a_resize_in_every_child(tmp_path):
    resize = v2.Resize((40, 48))
    datamodule = joined(folder(tmp_path, "small", augmentations=resize), folder(tmp_path, "large", size=(48, 40)))
    assert {tuple(datamodule.train_data[i].image.shape[-2:]) for i in range(len(datamodule.train_data))} == {(40, 48)}


# ------------------------------------------------------------- config
def test_yaml_builds_it_with_its_part_types(demo_root, tmp_path):
    from anomalib.data import AnomalibDataModule, Folder, MVTecAD

    folder(tmp_path, "bolt")
    config = tmp_path / "data.yaml"
    config.write_text(
        "class_path: anomalib_cflow_plus.data.MultiCategory\n"
        "init_args:\n"
        "  datamodules:\n"
        "    - class_path: anomalib.data.MVTecAD\n"
        f"      init_args: {{root: {demo_root}, category: grass}}\n"
        "    - class_path: anomalib.data.Folder\n"
        f"      init_args: {{name: bolt, root: {tmp_path / 'bolt'}, normal_dir: good, val_split_mode: none}}\n"
        "  train_batch_size: 5\n"
        "  num_workers: 0\n"
        "  seed: 7\n"
    )
    datamodule = AnomalibDataModule.from_config(config)
    assert type(datamodule) is MultiCategory
    assert datamodule.part_types == ["grass", "bolt"] and datamodule.category == "grass+bolt"
    assert [type(child) for child in datamodule.datamodules] == [MVTecAD, Folder]
    assert datamodule.train_batch_size == 5 and [child.seed for child in datamodule.datamodules] == [7, 7]


def test_the_shipped_config_parses_with_anomalib_cli(tmp_path):
    from anomalib.cli import AnomalibCLI
    from anomalib.data import MVTecAD

    with torch.device("meta"):
        cli = AnomalibCLI(["train", "--config", str(CONFIG), "--default_root_dir", str(tmp_path)], run=False)
    datamodule = cli.datamodule
    assert type(datamodule) is MultiCategory
    assert datamodule.part_types == ["brick", "grass", "gravel"]
    assert all(type(child) is MVTecAD and Path(child.root) == Path("datasets/demo") for child in datamodule.datamodules)
    assert (datamodule.train_batch_size, datamodule.eval_batch_size) == (16, 16)
