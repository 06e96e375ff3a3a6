"""Checks of the image files an anomalib datamodule will feed CflowPlus, before any of them is used.

anomalib reads each image only when a batch needs it, so a truncated file stops a run hours in,
with PIL's ``image file is truncated`` and no file name; an empty training folder fails with
``num_samples should be a positive integer value``. :class:`DataCheckCallback` runs these checks
when a stage starts, on the datasets anomalib's datamodules build (their ``samples`` table of
``image_path`` and ``mask_path``), without changing the datamodules:

- an empty training set raises :class:`EmptyTrainingSetError`, naming the folders it looked in;
- every image and mask is decoded fully (in a thread pool), and all files that anomalib's reader
  would fail on, or would read wrongly, are listed in one :class:`UnreadableImagesError`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from ..errors import CflowPlusError

__all__ = [
    "ASPECT_TOLERANCE",
    "DATAMODULE_SUBSETS",
    "HIGH_BIT_DEPTH_MODES",
    "MAX_LISTED_NAMES",
    "DataCheckCallback",
    "EmptyTrainingSetError",
    "FileRole",
    "ImageFile",
    "ImageProbe",
    "ImageProblem",
    "UnreadableImagesError",
    "check_training_set",
    "dataset_files",
    "drop_images",
    "find_image_problems",
    "probe_image",
    "probe_unless_known_good",
    "same_aspect_ratio",
]

logger = logging.getLogger(__name__)

FileRole = Literal["image", "mask"]
HIGH_BIT_DEPTH_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
MAX_LISTED_NAMES = 5
ASPECT_TOLERANCE = 0.02  # relative; covers the rounding of a mask saved at another scale
DATAMODULE_SUBSETS = ("train_data", "test_data", "val_data")


@dataclass(frozen=True)
class ImageFile:
    """One file a dataset will read: an image, or the ground-truth mask of ``image`` (its image's path)."""

    path: str
    role: FileRole
    subset: str
    image: str | None = None


@dataclass(frozen=True)
class ImageProbe:
    """What decoding one file gave: its size ``(width, height)``, or the problem that makes it unusable."""

    size: tuple[int, int] | None = None
    problem: str | None = None


@dataclass(frozen=True)
class ImageProblem:
    """A file that cannot be used as it is, and why."""

    file: ImageFile
    problem: str

    def __str__(self) -> str:
        return f"{self.file.subset} {self.file.role} {self.file.path}: {self.problem}"


class EmptyTrainingSetError(CflowPlusError, ValueError):
    """The datamodule found no training image."""


class UnreadableImagesError(CflowPlusError, OSError):
    """Image or mask files that anomalib's reader cannot read, or would read wrongly; ``problems`` lists them all."""

    def __init__(self, problems: Sequence[ImageProblem], checked: int) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(
            f"{len(self.problems)} of {checked} image and mask files cannot be used; fix, replace or remove them "
            f"(without this check, anomalib would stop at the first one it reads, often without naming it):\n{lines}"
        )


# ---------------------------------------------------------------- one file
def probe_image(path: str | Path, role: FileRole = "image") -> ImageProbe:
    """Decode ``path`` fully, as anomalib's ``read_image``/``read_mask`` will, and report its size or its problem.

    A truncated PNG or JPEG opens without error and fails only when its pixels are decoded, hence
    ``load()``. Images of more than 8 bits per channel whose values exceed 255 are a problem too:
    anomalib converts them to 8-bit RGB by clipping, which turns them white.
    """
    try:
        with Image.open(path) as image:
            image.load()
            size = image.size
            if role == "image" and image.mode in HIGH_BIT_DEPTH_MODES:
                _, high = image.getextrema()
                if high > 255:
                    return ImageProbe(
                        size,
                        f"{image.mode} image with values up to {high}: anomalib reads it as 8-bit RGB and clips "
                        "every value above 255 to white; convert it to 8 bits per channel",
                    )
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return ImageProbe(problem=_describe_read_error(path, error))
    return ImageProbe(size)


def _describe_read_error(path: str | Path, error: Exception) -> str:
    problem = f"{type(error).__name__}: {error}"
    if Path(path).name.startswith("._"):
        problem += " (a macOS resource-fork file, not an image: delete it)"
    return problem


# A file found good is not decoded again while its size and modification time stay the same, so
# that e.g. ``anomalib train`` (fit, then test) decodes the test images once: (path, role) ->
# ((size in bytes, mtime in ns), probe).
_known_good: dict[tuple[str, FileRole], tuple[tuple[int, int], ImageProbe]] = {}


def probe_unless_known_good(path: str, role: FileRole = "image") -> ImageProbe:
    """Return :func:`probe_image`'s result, without decoding again a file found good that has not changed since."""
    try:
        stat = os.stat(path)
    except OSError:
        return probe_image(path, role)
    version = (stat.st_size, stat.st_mtime_ns)
    known = _known_good.get((path, role))
    if known is not None and known[0] == version:
        return known[1]
    probe = probe_image(path, role)
    if probe.problem is None:
        _known_good[(path, role)] = (version, probe)
    return probe


# ------------------------------------------------------------ many files
def find_image_problems(files: Iterable[ImageFile], workers: int | None = None) -> list[ImageProblem]:
    """Decode every file in a thread pool; return the problems, in the order of ``files``.

    Each abnormal image's mask must also have its image's aspect ratio (within ``ASPECT_TOLERANCE``):
    anomalib resizes a mask with its image to the model's input size, which lines up a mask saved at
    another scale but stretches one of another shape, which then marks the wrong pixels.

    Args:
        files: The files to check; each path is decoded once, and not again in this process while
            its size and modification time stay the same and it was found good.
        workers: Decoding threads; ``None`` for one per CPU, at most 8 (PIL decodes without the GIL).

    """
    files = list(files)
    unique_paths = list(dict.fromkeys(file.path for file in files))
    roles = {file.path: file.role for file in reversed(files)}
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        decoded = pool.map(probe_unless_known_good, unique_paths, [roles[path] for path in unique_paths])
        probes = dict(zip(unique_paths, decoded, strict=True))

    problems: list[ImageProblem] = []
    reported: set[str] = set()
    for file in files:
        if file.path in reported:
            continue
        probe = probes[file.path]
        image_size = probes[file.image].size if file.role == "mask" and file.image in probes else None
        if probe.problem is not None:
            problems.append(ImageProblem(file, probe.problem))
        elif image_size is not None and not same_aspect_ratio(probe.size, image_size):
            problem = f"mask of {probe.size[0]}x{probe.size[1]} px for an image of {image_size[0]}x{image_size[1]} px"
            problems.append(ImageProblem(file, f"{problem} ({file.image}): another shape, it cannot line up"))
        else:
            continue
        reported.add(file.path)
    return problems


def same_aspect_ratio(size: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether two ``(width, height)`` sizes have the same aspect ratio, within ``ASPECT_TOLERANCE``."""
    return abs(size[0] * other[1] - other[0] * size[1]) <= ASPECT_TOLERANCE * other[0] * size[1]


def dataset_files(dataset: Dataset, subset: str) -> list[ImageFile]:
    """List the image and mask files an anomalib dataset reads.

    Datasets with a ``samples`` table (``image_path``, optional ``mask_path``) and anomalib's
    ``PredictDataset`` (``image_filenames``) are understood, also inside a ``Subset`` or
    ``ConcatDataset``; any other dataset gives no files.
    """
    if isinstance(dataset, Subset):
        return dataset_files(dataset.dataset, subset)
    if isinstance(dataset, ConcatDataset):
        return [file for part in dataset.datasets for file in dataset_files(part, subset)]
    samples = _samples(dataset)
    if samples is not None and "image_path" in samples:
        files = []
        masks = samples["mask_path"] if "mask_path" in samples else [None] * len(samples)
        for image, mask in zip(samples["image_path"], masks, strict=True):
            files.append(ImageFile(str(image), "image", subset))
            if isinstance(mask, str | Path) and str(mask):
                files.append(ImageFile(str(mask), "mask", subset, image=str(image)))
        return files
    filenames = getattr(dataset, "image_filenames", None)
    if filenames is not None:
        return [ImageFile(str(path), "image", subset) for path in filenames]
    return []


def _samples(dataset: Dataset) -> Any:
    """Return the dataset's ``samples`` table, or ``None`` (anomalib's property raises while it is unset)."""
    try:
        return getattr(dataset, "samples", None)
    except RuntimeError:
        return None


# ---------------------------------------------------------- training set
def check_training_set(datamodule: Any) -> None:
    """Check that the datamodule's training set has an image; datamodules without ``train_data`` are not checked.

    Raises:
        EmptyTrainingSetError: When it has none; the message names the dataset, its category and what the folders
            it looked in hold.

    """
    dataset = getattr(datamodule, "train_data", None)
    if dataset is None or len(dataset) > 0:
        return
    name = getattr(datamodule, "name", type(datamodule).__name__)
    category = getattr(datamodule, "category", None) or getattr(dataset, "category", None)
    what = f"{name}" + (f" (category '{category}')" if category else "")
    msg = (
        f"The training set of {what} is empty: CflowPlus learns from normal images only and needs at least one. "
        f"{_where_training_images_were_sought(datamodule, dataset)}"
    )
    raise EmptyTrainingSetError(msg)


def _where_training_images_were_sought(datamodule: Any, dataset: Dataset) -> str:
    """Describe the folders a dataset looked in for training images, and what they hold."""
    root_category = getattr(dataset, "root_category", None)
    if root_category is not None:  # MVTec AD layout: <root>/<category>/train/<label>/*
        train = Path(root_category) / "train"
        folders = sorted(path for path in train.iterdir() if path.is_dir()) if train.is_dir() else []
        found = "; ".join(f"{folder} {_describe_folder(folder)}" for folder in folders) or (
            f"{train} {_describe_folder(train)}"
        )
        return f"It reads them from the label folders in {train} (MVTec AD layout: train/good). Found: {found}."
    normal_dirs = getattr(datamodule, "normal_dir", None)
    if normal_dirs is not None:  # anomalib's Folder
        root = getattr(datamodule, "root", None)
        normal_dirs = [normal_dirs] if isinstance(normal_dirs, str | Path) else list(normal_dirs)
        folders = [Path(root) / folder if root is not None else Path(folder) for folder in normal_dirs]
        found = "; ".join(f"{folder} {_describe_folder(folder)}" for folder in folders)
        split = getattr(datamodule, "test_split_mode", None), getattr(datamodule, "val_split_mode", None)
        return f"It reads them from normal_dir: {found}. Check also the test/val split modes ({split[0]}, {split[1]})."
    return "Check the datamodule's root, category and split settings."


def _describe_folder(folder: Path) -> str:
    """Say what a folder holds: ``"does not exist"``, ``"is empty"`` or its files by suffix, and a few names."""
    if not folder.is_dir():
        return "does not exist"
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    if not files:
        return "is empty"
    suffixes = Counter(path.suffix or path.name for path in files)
    kinds = ", ".join(f"{count} {suffix}" for suffix, count in suffixes.most_common())
    names = ", ".join(path.name for path in files[:MAX_LISTED_NAMES]) + (", ..." * (len(files) > MAX_LISTED_NAMES))
    return f"holds {len(files)} file(s) that were not read as training images: {kinds} ({names})"


# --------------------------------------------------------------- callback
class DataCheckCallback(Callback):
    """Check the data before each stage reads it: an empty training set, unreadable or clipped images, odd masks.

    At ``fit`` setup (before the optimizers and dataloaders are built) it checks the datamodule's
    train, validation and test sets, so that a bad test image stops the run before training, not
    after it. When validation, testing or prediction starts, it checks the files of the loaded
    dataloaders that it has not checked yet (e.g. ``Engine.predict(data_path=...)``). A file found
    good is not decoded again in the same process until it changes. Under DDP every rank checks
    the same files, so that all of them stop together.

    Args:
        decode (bool): Decode every image and mask; ``False`` keeps only the (free) empty-training-set check.
            Defaults to ``True``.
        workers (int | None): Decoding threads; ``None`` for one per CPU, at most 8. Defaults to ``None``.

    Example:
        >>> from anomalib.engine import Engine
        >>> from anomalib_cflow_plus.data import DataCheckCallback
        >>> engine = Engine(callbacks=[DataCheckCallback(workers=2)])  # CflowPlus adds one itself

    """

    def __init__(self, decode: bool = True, workers: int | None = None) -> None:
        self.decode = decode
        self.workers = workers
        self.checked_paths: set[str] = set()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """At fit: raise on an empty training set, then check every dataset the datamodule holds."""
        del pl_module
        datamodule = trainer.datamodule
        if stage != "fit" or datamodule is None:
            return
        check_training_set(datamodule)
        subsets = [(name.removesuffix("_data"), getattr(datamodule, name, None)) for name in DATAMODULE_SUBSETS]
        self.check(dataset_files(dataset, subset) for subset, dataset in subsets if dataset is not None)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check training dataloaders that did not come from a datamodule."""
        del pl_module
        self.check(_loader_files(trainer.train_dataloader, "train"))

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the validation files not checked yet."""
        del pl_module
        self.check(_loader_files(trainer.val_dataloaders, "val"))

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the test files not checked yet."""
        del pl_module
        self.check(_loader_files(trainer.test_dataloaders, "test"))

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Leave out the images to predict on that cannot be read, naming each, so that the others are scored.

        On a line, one bad frame must not cost the others their predictions. Only when no image of a dataset
        can be scored (or the dataset cannot be filtered) does prediction stop, with
        :class:`UnreadableImagesError`; otherwise a warning lists every file left out and why.
        """
        del pl_module
        for dataset in _loader_datasets(trainer.predict_dataloaders):
            problems, checked = self.find_new_problems([dataset_files(dataset, "predict")])
            if not problems:
                continue
            left_out = {problem.file.image or problem.file.path for problem in problems}
            remaining = drop_images(dataset, left_out)
            if not remaining:
                raise UnreadableImagesError(problems, checked)
            lines = "\n".join(f"  {problem}" for problem in problems)
            logger.warning(
                "Left out %d of %d images that cannot be read; the other %d are scored:\n%s",
                len(left_out), remaining + len(left_out), remaining, lines,
            )  # fmt: skip

    def check(self, file_groups: Iterable[Iterable[ImageFile]]) -> None:
        """Decode the files not checked yet; raise :class:`UnreadableImagesError` listing every bad one."""
        problems, checked = self.find_new_problems(file_groups)
        if problems:
            raise UnreadableImagesError(problems, checked)

    def find_new_problems(self, file_groups: Iterable[Iterable[ImageFile]]) -> tuple[list[ImageProblem], int]:
        """Decode the files not checked yet; return their problems and how many files were checked."""
        if not self.decode:
            return [], 0
        files = [file for group in file_groups for file in group]
        new_paths = {file.path for file in files} - self.checked_paths
        if not new_paths:
            return [], 0
        start = time.perf_counter()
        # A mask is checked with its image, so that their sizes can be compared.
        images_of_new_masks = {file.image for file in files if file.path in new_paths and file.image is not None}
        files = [file for file in files if file.path in new_paths | images_of_new_masks or file.image in new_paths]
        problems = find_image_problems(files, self.workers)
        logger.info("Checked %d image and mask files in %.1f s.", len(new_paths), time.perf_counter() - start)
        self.checked_paths |= new_paths - {problem.file.path for problem in problems}
        return problems, len(new_paths)


def drop_images(dataset: Dataset, paths: set[str]) -> int:
    """Remove the images ``paths`` (and their masks) from an anomalib dataset in place; return how many remain.

    Understands anomalib's ``PredictDataset`` (``image_filenames``) and datasets with a ``samples`` table;
    for any other dataset nothing is removed and 0 is returned.
    """
    filenames = getattr(dataset, "image_filenames", None)
    if isinstance(filenames, list):
        dataset.image_filenames = [name for name in filenames if str(name) not in paths]
        return len(dataset.image_filenames)
    samples = _samples(dataset)
    if samples is not None and "image_path" in samples:
        dataset.samples = samples[~samples["image_path"].astype(str).isin(paths)].reset_index(drop=True)
        return len(dataset.samples)
    return 0


def _loader_datasets(loaders: Any) -> Iterator[Dataset]:
    """Yield the datasets behind a dataloader, or a list or dict of them."""
    if isinstance(loaders, DataLoader):
        yield loaders.dataset
    elif isinstance(loaders, Mapping):
        for loader in loaders.values():
            yield from _loader_datasets(loader)
    elif isinstance(loaders, Sequence):
        for loader in loaders:
            yield from _loader_datasets(loader)


def _loader_files(loaders: Any, subset: str) -> Iterator[list[ImageFile]]:
    """Yield the files of the datasets behind a dataloader, or a list or dict of them."""
    for dataset in _loader_datasets(loaders):
        yield dataset_files(dataset, subset)
