"""One datamodule over several anomalib datamodules, one per part type, that keeps each image's part type.

:class:`MultiCategory` sets up each child datamodule (an ``MVTecAD`` category, a ``Folder``, ...) with its own
train/val/test splits and joins the subsets: its ``train_data``, ``val_data`` and ``test_data`` are
:class:`PartTypeDataset` instances, whose items are :class:`PartTypeImageItem`: anomalib's ``ImageItem`` with
a ``part_type`` field, the index of the child it came from (its name is ``MultiCategory.part_types[index]``).
Batches are :class:`PartTypeImageBatch` (``part_type`` of shape ``(B,)``), which anomalib's post-processor,
metrics and visualizer handle as any ``ImageBatch``.

Mixed image sizes only work with a fixed-size ``Resize`` (the model's pre-processor's, or one in each child's
augmentations): anomalib's collate would otherwise resize each batch to its largest image, and an image's score
would depend on the batch it is in. :meth:`MultiCategory.setup` checks this on one image per part type.

Example (YAML for ``anomalib train --config``, see ``configs/multi_category.yaml``)::

    data:
      class_path: anomalib_cflow_plus.data.MultiCategory
      init_args:
        datamodules:
          - class_path: anomalib.data.MVTecAD
            init_args: {root: datasets/demo, category: brick}
          - class_path: anomalib.data.Folder
            init_args: {name: grass, root: datasets/demo/grass, normal_dir: train/good}
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
import pandas as pd
import torch
from anomalib import TaskType
from anomalib.data import AnomalibDataModule
from anomalib.data.dataclasses.generic import FieldDescriptor
from anomalib.data.dataclasses.numpy import NumpyImageBatch, NumpyImageItem
from anomalib.data.dataclasses.torch import ImageBatch, ImageItem
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.data.utils import TestSplitMode, ValSplitMode
from anomalib.utils.attrs import get_nested_attr
from torch.utils.data import Dataset
from torchvision.transforms.v2 import Resize, Transform

from ..errors import ConfigurationError
from .checks import EmptyTrainingSetError, check_training_set
from .layout import check_layout

if TYPE_CHECKING:
    from anomalib.data.datasets.base.image import AnomalibDataset

__all__ = [
    "PART_TYPE_COLUMN",
    "MultiCategory",
    "NumpyPartTypeImageBatch",
    "NumpyPartTypeImageItem",
    "PartTypeDataset",
    "PartTypeImageBatch",
    "PartTypeImageItem",
    "fixed_resize_size",
]

PART_TYPE_COLUMN = "part_type"
SUBSETS = ("train", "val", "test")
T = TypeVar("T", torch.Tensor, np.ndarray)


# ------------------------------------------------------------ validation
def _part_type_tensor(part_type: Any, ndim: int) -> torch.Tensor | None:
    """``part_type`` as a long tensor of ``ndim`` dimensions (0: one item, 1: a batch), or ``None``."""
    if part_type is None:
        return None
    if not isinstance(part_type, torch.Tensor):
        part_type = torch.as_tensor(np.asarray(part_type))
    if torch.is_floating_point(part_type) or torch.is_complex(part_type) or part_type.dtype == torch.bool:
        msg = f"part_type must hold integer indices, got dtype {part_type.dtype}."
        raise ValueError(msg)
    if ndim == 0 and part_type.numel() == 1:
        part_type = part_type.reshape(())
    if part_type.ndim != ndim:
        msg = f"part_type must have {ndim} dimension(s), got shape {tuple(part_type.shape)}."
        raise ValueError(msg)
    return part_type.long()


def _part_type_array(part_type: Any, ndim: int) -> np.ndarray | None:
    """``part_type`` as an int64 array of ``ndim`` dimensions (0: one item, 1: a batch), or ``None``."""
    if part_type is None:
        return None
    if isinstance(part_type, torch.Tensor):
        part_type = part_type.detach().cpu().numpy()
    array = np.asarray(part_type)
    if not np.issubdtype(array.dtype, np.integer):
        msg = f"part_type must hold integer indices, got dtype {array.dtype}."
        raise ValueError(msg)
    if ndim == 0 and array.size == 1:
        array = array.reshape(())
    if array.ndim != ndim:
        msg = f"part_type must have {ndim} dimension(s), got shape {array.shape}."
        raise ValueError(msg)
    return array.astype(np.int64)


# ------------------------------------------------------------ dataclasses
@dataclass
class _PartTypeFields(Generic[T]):
    """The ``part_type`` field, validated on every assignment as anomalib's fields are.

    A mixin (as anomalib's ``_ImageInputFields``): the descriptor resolves its type hints on the class that
    declares it, which must not be a batch class (whose hints anomalib leaves unresolvable at run time).
    """

    part_type: FieldDescriptor[T | None] = FieldDescriptor(validator_name="validate_part_type")  # noqa: RUF009


@dataclass
class NumpyPartTypeImageItem(_PartTypeFields[np.ndarray], NumpyImageItem):
    """anomalib's ``NumpyImageItem`` with ``part_type``: a 0-d int64 array, the index of the item's part type."""

    @staticmethod
    def validate_part_type(part_type: Any) -> np.ndarray | None:
        """Return ``part_type`` as a 0-d int64 array (``None`` stays ``None``)."""
        return _part_type_array(part_type, ndim=0)


@dataclass
class NumpyPartTypeImageBatch(_PartTypeFields[np.ndarray], NumpyImageBatch):
    """anomalib's ``NumpyImageBatch`` with ``part_type``: ``(B,)`` int64, each item's part type index."""

    item_class: ClassVar[type[NumpyImageItem]] = NumpyPartTypeImageItem

    @staticmethod
    def validate_part_type(part_type: Any) -> np.ndarray | None:
        """Return ``part_type`` as a ``(B,)`` int64 array (``None`` stays ``None``)."""
        return _part_type_array(part_type, ndim=1)


@dataclass
class PartTypeImageItem(_PartTypeFields[torch.Tensor], ImageItem):
    """anomalib's ``ImageItem`` with ``part_type``: a 0-d long tensor, the index of the item's part type."""

    numpy_class: ClassVar[type[NumpyImageItem]] = NumpyPartTypeImageItem

    @staticmethod
    def validate_part_type(part_type: Any) -> torch.Tensor | None:
        """Return ``part_type`` as a 0-d long tensor (``None`` stays ``None``)."""
        return _part_type_tensor(part_type, ndim=0)


@dataclass
class PartTypeImageBatch(_PartTypeFields[torch.Tensor], ImageBatch):
    """anomalib's ``ImageBatch`` with ``part_type``: ``(B,)`` long, each item's part type index."""

    item_class: ClassVar[type[ImageItem]] = PartTypeImageItem
    numpy_class: ClassVar[type[NumpyImageBatch]] = NumpyPartTypeImageBatch

    @staticmethod
    def validate_part_type(part_type: Any) -> torch.Tensor | None:
        """Return ``part_type`` as a ``(B,)`` long tensor (``None`` stays ``None``)."""
        return _part_type_tensor(part_type, ndim=1)


_IMAGE_ITEM_FIELDS = tuple(field.name for field in fields(ImageItem))


def with_part_type(item: ImageItem, part_type: int) -> PartTypeImageItem:
    """Return ``item``'s fields (image ``(C, H, W)``, mask ``(H, W)``, ...) as a :class:`PartTypeImageItem`."""
    if not isinstance(item, ImageItem):
        msg = (
            f"MultiCategory joins image datamodules, whose datasets give anomalib ImageItems; part type {part_type} "
            f"gave a {type(item).__name__}. Use image datamodules only (e.g. MVTecAD, Folder, Visa)."
        )
        raise ConfigurationError(msg)
    return PartTypeImageItem(**{name: getattr(item, name) for name in _IMAGE_ITEM_FIELDS}, part_type=part_type)


# ---------------------------------------------------------------- dataset
class PartTypeDataset(Dataset):
    """The datasets of one subset (train, val or test) of several part types, one after the other.

    Item ``i`` is the item of the dataset it falls in, as a :class:`PartTypeImageItem` whose ``part_type`` is
    that dataset's entry of ``part_types``; batches collate to :class:`PartTypeImageBatch`.

    Args:
        datasets (Sequence[AnomalibDataset]): One anomalib dataset per part type in this subset.
        part_types (Sequence[int] | None): The part type index of each dataset; ``None`` for ``0, 1, ...``.
            A part type without this subset is left out, so the indices need not be contiguous.
        names (Sequence[str] | None): The part type name of each dataset; ``None`` for the datasets' categories
            or names.

    """

    def __init__(
        self,
        datasets: Sequence[AnomalibDataset],
        part_types: Sequence[int] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.datasets = list(datasets)
        self.part_types = list(range(len(self.datasets))) if part_types is None else [int(i) for i in part_types]
        self.names = [_dataset_name(dataset) for dataset in self.datasets] if names is None else list(names)
        if not len(self.datasets) == len(self.part_types) == len(self.names):
            msg = (
                f"PartTypeDataset needs one part type index and one name per dataset: got {len(self.datasets)} "
                f"datasets, {len(self.part_types)} indices and {len(self.names)} names."
            )
            raise ConfigurationError(msg)

    # ------------------------------------------------------------ items
    def _ends(self) -> list[int]:
        """Cumulative lengths; computed on each use, as a dataset's ``samples`` may be filtered in place."""
        ends, total = [], 0
        for dataset in self.datasets:
            total += len(dataset)
            ends.append(total)
        return ends

    def __len__(self) -> int:
        return sum(len(dataset) for dataset in self.datasets)

    def __getitem__(self, index: int) -> PartTypeImageItem:
        """Return item ``index`` (image ``(C, H, W)``, mask ``(H, W)``) with its ``part_type`` (0-d long)."""
        ends = self._ends()
        total = ends[-1] if ends else 0
        if index < 0:
            index += total
        if not 0 <= index < total:
            msg = f"index {index} out of range for a PartTypeDataset of {total} items"
            raise IndexError(msg)
        position = bisect.bisect_right(ends, index)
        start = ends[position - 1] if position else 0
        return with_part_type(self.datasets[position][index - start], self.part_types[position])

    @property
    def collate_fn(self) -> Callable[[list[PartTypeImageItem]], PartTypeImageBatch]:
        """Collate items to a :class:`PartTypeImageBatch` (``part_type`` of shape ``(B,)``)."""
        return PartTypeImageBatch.collate

    # ------------------------------------------------------- properties
    @property
    def task(self) -> TaskType:
        """The datasets' task; they must all have the same one.

        Raises:
            ConfigurationError: When some part types are classification and others segmentation.

        """
        tasks = {name: dataset.task for name, dataset in zip(self.names, self.datasets, strict=True)}
        if len(set(tasks.values())) > 1:
            listing = ", ".join(f"{name}: {task.value}" for name, task in tasks.items())
            msg = (
                f"The part types of a MultiCategory must all have the same task, got {listing}. A batch cannot mix "
                "images with and without ground-truth masks: give every part type masks (MVTecAD's ground_truth, "
                "Folder's mask_dir), or none of them."
            )
            raise ConfigurationError(msg)
        if not tasks:
            msg = "A PartTypeDataset without datasets has no task."
            raise ConfigurationError(msg)
        return next(iter(tasks.values()))

    @property
    def samples(self) -> pd.DataFrame:
        """The datasets' ``samples`` tables, one after the other, with a ``part_type`` column (the index)."""
        frames = [
            dataset.samples.assign(**{PART_TYPE_COLUMN: part_type})
            for dataset, part_type in zip(self.datasets, self.part_types, strict=True)
        ]
        samples = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[PART_TYPE_COLUMN])
        tasks = {frame.attrs.get("task") for frame in frames}
        if len(tasks) == 1:
            samples.attrs["task"] = tasks.pop()
        return samples

    @samples.setter
    def samples(self, samples: pd.DataFrame) -> None:
        """Give each dataset the rows of ``samples`` whose ``part_type`` is its index (e.g. after filtering)."""
        if PART_TYPE_COLUMN not in samples:
            msg = f"samples of a PartTypeDataset need a {PART_TYPE_COLUMN!r} column, found {list(samples.columns)}"
            raise ValueError(msg)
        for dataset, part_type in zip(self.datasets, self.part_types, strict=True):
            attrs = dict(dataset.samples.attrs)
            rows = samples[samples[PART_TYPE_COLUMN] == part_type].drop(columns=PART_TYPE_COLUMN)
            rows = rows.reset_index(drop=True)
            rows.attrs = attrs
            dataset.samples = rows

    @property
    def category(self) -> str:
        """The part type names joined with ``+``."""
        return "+".join(self.names)

    @property
    def name(self) -> str:
        """``MultiCategory``, as the datamodule's."""
        return MultiCategory.__name__

    @property
    def has_normal(self) -> bool:
        """Whether any part type's dataset has a normal image."""
        return any(dataset.has_normal for dataset in self.datasets)

    @property
    def has_anomalous(self) -> bool:
        """Whether any part type's dataset has an anomalous image."""
        return any(dataset.has_anomalous for dataset in self.datasets)

    @property
    def augmentations(self) -> Transform | None:
        """The datasets' augmentations when they all have the same object, else ``None`` (see each dataset's)."""
        augmentations = [dataset.augmentations for dataset in self.datasets]
        if augmentations and all(each is augmentations[0] for each in augmentations):
            return augmentations[0]
        return None

    @augmentations.setter
    def augmentations(self, augmentations: Transform | None) -> None:
        """Set the same augmentations on every dataset."""
        for dataset in self.datasets:
            dataset.augmentations = augmentations


def _dataset_name(dataset: Any) -> str:
    """Return a dataset's category, or its name."""
    return str(getattr(dataset, "category", None) or getattr(dataset, "name", type(dataset).__name__))


def fixed_resize_size(transform: Transform | None) -> tuple[int, int] | None:
    """Return the ``(height, width)`` of a fixed-size ``Resize`` in ``transform`` (or its ``Compose``), or ``None``."""
    for resize in extract_transforms_by_type(transform, Resize):
        size = resize.size
        if size is not None and len(size) == 2:
            return int(size[0]), int(size[1])
    return None


# ------------------------------------------------------------- datamodule
class MultiCategory(AnomalibDataModule):
    """Several anomalib datamodules, one per part type, as one; each item keeps its ``part_type`` index.

    Each child makes its own train/val/test splits, as configured; this datamodule does not split again. A child
    without a validation (or test) set is left out of that subset; when no child has one, the subset is absent.
    The batch sizes and workers here are those of the dataloaders; the children's are not used.

    Args:
        datamodules (Sequence[AnomalibDataModule]): One datamodule per part type; their part type names (the
            ``category`` if set, else the ``name``) must differ.
        train_batch_size (int): Training batch size. Defaults to ``32``.
        eval_batch_size (int): Validation and test batch size. Defaults to ``32``.
        num_workers (int): Dataloader workers. Defaults to ``8``.
        seed (int | None): Seed of the random splits of the children that have no seed of their own.
            Defaults to ``None``.

    Raises:
        ConfigurationError: Without a datamodule, with an item that is not an ``AnomalibDataModule``, or when two
            part types have the same name.

    Example:
        >>> from anomalib.data import MVTecAD
        >>> from anomalib_cflow_plus.data import MultiCategory
        >>> datamodule = MultiCategory(
        ...     [MVTecAD(root="datasets/demo", category=name) for name in ("brick", "grass", "gravel")],
        ...     train_batch_size=16,
        ... )
        >>> datamodule.part_types, datamodule.category
        (['brick', 'grass', 'gravel'], 'brick+grass+gravel')

    """

    train_data: PartTypeDataset
    val_data: PartTypeDataset
    test_data: PartTypeDataset

    def __init__(
        self,
        datamodules: Sequence[AnomalibDataModule],
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_split_mode=ValSplitMode.NONE,
            test_split_mode=TestSplitMode.NONE,
            seed=seed,
        )
        self.datamodules = _checked_datamodules(datamodules)
        if seed is not None:
            for child in self.datamodules:
                if getattr(child, "seed", None) is None:
                    child.seed = seed

    # ------------------------------------------------------------ names
    @property
    def part_types(self) -> list[str]:
        """One name per child, in order: its ``category`` if set, else its ``name``."""
        return [part_type_name(child) for child in self.datamodules]

    @property
    def category(self) -> str:
        """The part type names joined with ``+`` (e.g. ``brick+grass``): the results folder's name."""
        return "+".join(self.part_types)

    # ------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        """Let each child download its data, then check its layout (masks that pair, files MVTecAD skips)."""
        for child in self.datamodules:
            child.prepare_data()
            check_layout(child)

    def setup(self, stage: str | None = None) -> None:
        """Set up every child and join their subsets, then check that their images can share a batch.

        Raises:
            ConfigurationError: When a child's training set is empty, the part types mix classification and
                segmentation, or their training images differ in size and no fixed-size ``Resize`` is applied.

        """
        super().setup(stage)
        self._check_image_sizes()

    def _setup(self, _stage: str | None = None) -> None:
        """Set up each child (with its own splits) and build ``train_data``, ``val_data`` and ``test_data``."""
        names = self.part_types
        for index, child in enumerate(self.datamodules):
            child.setup(_stage)
            _check_training_set(index, names[index], child)
        for subset in SUBSETS:
            present = [
                (index, dataset)
                for index, child in enumerate(self.datamodules)
                if (dataset := getattr(child, f"{subset}_data", None)) is not None
            ]
            if present:
                dataset = PartTypeDataset(
                    [dataset for _, dataset in present],
                    part_types=[index for index, _ in present],
                    names=[names[index] for index, _ in present],
                )
                _ = dataset.task  # raises now on mixed tasks, not in the first batch
                setattr(self, f"{subset}_data", dataset)
            elif hasattr(self, f"{subset}_data"):
                delattr(self, f"{subset}_data")

    def _create_test_split(self) -> None:
        """Nothing: each child has made its own test split (anomalib's would split the joined test set again)."""

    def _create_val_split(self) -> None:
        """Nothing: each child has made its own validation split."""

    def _update_augmentations(self) -> None:
        """Give each child's datasets the child's augmentations, with the model's ``Resize`` appended as anomalib does.

        A child without augmentations for a subset gets this datamodule's (``None`` unless set).
        """
        model_transform = get_nested_attr(self, "trainer.model.pre_processor.transform", None)
        for subset in SUBSETS:
            joined = getattr(self, f"{subset}_data", None)
            if joined is None:
                continue
            for index, dataset in zip(joined.part_types, joined.datasets, strict=True):
                augmentations = getattr(self.datamodules[index], f"{subset}_augmentations", None)
                if augmentations is None:
                    augmentations = getattr(self, f"{subset}_augmentations", None)
                if model_transform:
                    self._update_subset_augmentations(dataset, augmentations, model_transform)
                else:
                    dataset.augmentations = augmentations

    # ------------------------------------------------------------ checks
    def _check_image_sizes(self) -> None:
        """Raise when the part types' first training images differ in size and no fixed-size Resize applies.

        Reads one training image per part type, with its augmentations (which hold the model's ``Resize``
        when a trainer set this datamodule up).
        """
        model_transform = get_nested_attr(self, "trainer.model.pre_processor.transform", None)
        if fixed_resize_size(model_transform) is not None:
            return
        train = getattr(self, "train_data", None)
        if train is None:
            return
        sizes: dict[str, tuple[tuple[int, int], str]] = {}
        for name, dataset in zip(train.names, train.datasets, strict=True):
            if len(dataset):
                item = dataset[0]
                height, width = item.image.shape[-2:]
                sizes[name] = ((int(height), int(width)), str(item.image_path))
        if len({size for size, _ in sizes.values()}) <= 1:
            return
        listing = "; ".join(f"{name}: {h}x{w} px ({path})" for name, ((h, w), path) in sizes.items())
        msg = (
            f"The part types' images differ in size (height x width after their augmentations): {listing}. Without "
            "a Resize to a fixed [height, width], anomalib's collate resizes each batch to its largest image, so an "
            "image's score would depend on the other images in its batch. Give the model's pre-processor a Resize "
            "to a fixed size (as in configs/folder.yaml; it applies when the Engine sets the datamodule up), or give "
            "every datamodule the same augmentations with a Resize([height, width])."
        )
        raise ConfigurationError(msg)


def part_type_name(datamodule: AnomalibDataModule) -> str:
    """Return a child datamodule's part type name: its ``category`` if set, else its ``name``."""
    return str(getattr(datamodule, "category", None) or datamodule.name)


def _checked_datamodules(datamodules: Any) -> list[AnomalibDataModule]:
    """Return ``datamodules`` as a list, checked: at least one, all anomalib datamodules, distinct part types."""
    if isinstance(datamodules, AnomalibDataModule) or not isinstance(datamodules, Sequence):
        msg = (
            f"MultiCategory's datamodules must be a list of anomalib datamodules, one per part type; got "
            f"{type(datamodules).__name__}. Put the datamodule(s) in a list."
        )
        raise ConfigurationError(msg)
    datamodules = list(datamodules)
    if not datamodules:
        msg = "MultiCategory needs at least one datamodule (one per part type); datamodules is empty."
        raise ConfigurationError(msg)
    for index, datamodule in enumerate(datamodules):
        if not isinstance(datamodule, AnomalibDataModule):
            msg = (
                f"datamodules[{index}] is a {type(datamodule).__name__}, not an anomalib datamodule: give each part "
                "type as an AnomalibDataModule (e.g. anomalib.data.Folder or anomalib.data.MVTecAD)."
            )
            raise ConfigurationError(msg)
    first_of: dict[str, int] = {}
    for index, datamodule in enumerate(datamodules):
        name = part_type_name(datamodule)
        if name in first_of:
            msg = (
                f"datamodules[{first_of[name]}] and datamodules[{index}] have the same part type name {name!r} "
                "(a datamodule's category, else its name). Give each part type its own name: Folder's `name` "
                "argument, or another MVTecAD/Visa `category`."
            )
            raise ConfigurationError(msg)
        first_of[name] = index
    return datamodules


def _check_training_set(index: int, name: str, datamodule: AnomalibDataModule) -> None:
    """Raise when a child has no training image, saying which child it is and where it looked."""
    where = [
        f"{attribute} {Path(value)}"
        for attribute in ("root", "normal_dir")
        if isinstance(value := getattr(datamodule, attribute, None), str | Path)
    ]
    which = f"In MultiCategory, datamodules[{index}] (part type {name!r}{', ' if where else ''}{', '.join(where)})"
    advice = "Add normal images to it, check its split settings, or remove it from MultiCategory's datamodules."
    if getattr(datamodule, "train_data", None) is None:
        msg = f"{which} has no training set after its setup. {advice}"
        raise ConfigurationError(msg)
    try:
        check_training_set(datamodule)
    except EmptyTrainingSetError as error:
        msg = f"{which}: {error} {advice}"
        raise ConfigurationError(msg) from error
