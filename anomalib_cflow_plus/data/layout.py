"""Checks of a datamodule's folders before anomalib builds its datasets from them: masks and skipped files.

anomalib's ``MVTecAD`` and ``Folder`` builders pair the sorted defect images with the sorted masks. When a
mask is missing or extra, they fail with an error that names no file (``Must have equal len keys and value
when setting with an iterable``, or a NumPy boolean-indexing error). :func:`check_masks` finds the same
mismatch first and lists the defect images with no mask and the masks with no image.
:func:`report_skipped_files` says, in one log line, which files under an ``MVTecAD`` category anomalib will
not read: images of another type (it reads ``.png`` only) and dangling links.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib.data import Folder, MVTecAD
from anomalib.data.datasets.image.mvtecad import IMG_EXTENSIONS as MVTEC_EXTENSIONS
from anomalib.data.utils.path import _prepare_files_labels

from ..errors import CflowPlusError

__all__ = ["IMAGE_SUFFIXES", "MAX_LISTED", "MaskMismatchError", "check_layout", "check_masks", "report_skipped_files"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MAX_LISTED = 10


class MaskMismatchError(CflowPlusError, ValueError):
    """Defect images without a ground-truth mask, or masks without a defect image."""


def check_masks(datamodule: Any) -> None:
    """Check that anomalib can pair a datamodule's defect images with its masks.

    Understands anomalib's ``MVTecAD`` (``test/<defect>/*.png`` with ``ground_truth/<defect>/*.png``) and
    ``Folder`` (``abnormal_dir`` with ``mask_dir``); other datamodules are not checked.

    Raises:
        MaskMismatchError: Listing the images without a mask and the masks without an image.

    """
    pairs = _defect_images_and_masks(datamodule)
    if pairs is None:
        return
    images, masks, where, by_folder = pairs
    images, masks = sorted(images), sorted(masks)
    if len(images) == len(masks) and all(image.stem in mask.stem for image, mask in zip(images, masks, strict=True)):
        return  # anomalib's own rule: the i-th mask's name contains the i-th image's
    unmatched_images = [image for image in images if not any(_belong(image, mask, by_folder) for mask in masks)]
    unmatched_masks = [mask for mask in masks if not any(_belong(image, mask, by_folder) for image in images)]
    lines = [f"{len(images)} defect images and {len(masks)} masks {where} do not pair up."]
    if unmatched_images:
        lines.append(f"Defect images with no mask ({len(unmatched_images)}): {_listing(unmatched_images)}")
    if unmatched_masks:
        lines.append(f"Masks with no defect image ({len(unmatched_masks)}): {_listing(unmatched_masks)}")
    lines.append(
        "Every defect image needs a mask whose name contains the image's (e.g. 000.png and 000_mask.png): add the "
        "missing masks, or remove the images or masks that have no partner."
    )
    raise MaskMismatchError("\n".join(lines))


def _belong(image: Path, mask: Path, by_folder: bool) -> bool:
    """Whether ``mask`` can be ``image``'s: its name contains the image's (``by_folder``: in a same-named folder)."""
    return image.stem in mask.stem and (not by_folder or image.parent.name == mask.parent.name)


def _listing(paths: Sequence[Path]) -> str:
    names = ", ".join(str(path) for path in paths[:MAX_LISTED])
    return names + (f", ... and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else "")


def _defect_images_and_masks(datamodule: Any) -> tuple[list[Path], list[Path], str, bool] | None:
    """Return the defect images and masks anomalib's builder will pair, where they are, and whether by folder.

    ``None`` for a datamodule whose layout is not known here.
    """
    if isinstance(datamodule, MVTecAD):
        category = Path(datamodule.root) / datamodule.category
        if not category.is_dir():
            return None
        test, ground_truth = category / "test", category / "ground_truth"
        images = [path for path in _files(test, MVTEC_EXTENSIONS) if path.parent.name != "good"]
        return images, _files(ground_truth, MVTEC_EXTENSIONS), f"in {test} and {ground_truth}", True
    if isinstance(datamodule, Folder) and datamodule.abnormal_dir and datamodule.mask_dir:
        images = _folder_files(datamodule, datamodule.abnormal_dir)
        masks = _folder_files(datamodule, datamodule.mask_dir)
        if images is None or masks is None:
            return None
        return images, masks, "in abnormal_dir and mask_dir", False
    return None


def _files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """List the files under ``folder`` with one of ``extensions``, case-sensitive as in anomalib's MVTecAD."""
    return [path for path in folder.rglob("*") if path.suffix in extensions and not path.is_dir()]


def _folder_files(datamodule: Folder, folders: Any) -> list[Path] | None:
    """List the files anomalib's ``Folder`` reads from one or several of its folders, with anomalib's helper."""
    folders = [folders] if isinstance(folders, str | Path) else list(folders)
    files: list[Path] = []
    for folder in folders:
        path = Path(folder) if datamodule.root is None else Path(datamodule.root) / folder
        if not path.is_dir():
            return None  # anomalib reports a missing folder itself, by name
        try:
            found, _ = _prepare_files_labels(path, "abnormal", datamodule.extensions)
        except RuntimeError:  # no image in it
            continue
        files += [Path(name) for name in found]
    return files


def report_skipped_files(datamodule: Any) -> int:
    """Log, in one line, the files under an ``MVTecAD`` category that anomalib will not read; return their count.

    anomalib's ``MVTecAD`` reads ``.png`` files only; ``.jpg`` and other images are skipped silently, and so are
    links whose target is gone. ``Folder`` reads every image type; use it for other formats.
    """
    if not isinstance(datamodule, MVTecAD):
        return 0
    category = Path(datamodule.root) / datamodule.category
    if not category.is_dir():
        return 0
    other_types = Counter()
    dangling = []
    for path in category.rglob("*"):
        if path.is_symlink() and not path.exists():
            dangling.append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES and path.suffix not in MVTEC_EXTENSIONS:
            other_types[path.suffix] += 1
    parts = [f"{count} {suffix} files" for suffix, count in other_types.most_common()]
    if other_types:
        parts[-1] += " (MVTecAD reads only .png; use anomalib's Folder datamodule for other image types)"
    if dangling:
        parts.append(f"{len(dangling)} dangling links ({_listing(dangling)})")
    skipped = sum(other_types.values()) + len(dangling)
    if skipped:
        logger.warning("MVTecAD will not read %d files under %s: %s.", skipped, category, "; ".join(parts))
    return skipped


def check_layout(datamodule: Any) -> None:
    """Check a datamodule's files as every run does before its datasets are built.

    Masks must pair with defective images (:func:`check_masks`), and files MVTecAD would skip are reported
    (:func:`report_skipped_files`). ``None`` (no datamodule, e.g. bare dataloaders) is not checked.

    Raises:
        MaskMismatchError: When masks and defective images do not pair.

    """
    if datamodule is None:
        return
    check_masks(datamodule)
    report_skipped_files(datamodule)
