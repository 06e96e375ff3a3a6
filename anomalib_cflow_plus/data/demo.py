"""Demo dataset generator: scikit-image texture photos with synthetic defects, in MVTec AD layout.

Layout written under ``root`` for every texture ``<t>`` and defect type ``<d>``::

    <t>/train/good/000.png             RGB uint8, H x W (``image_size``: a side, or ``(H, W)``)
    <t>/test/good/000.png
    <t>/test/<d>/000.png
    <t>/ground_truth/<d>/000_mask.png  single-channel uint8, 0 or 255

Every image is drawn from its own random stream keyed by ``(seed, texture, group, index)``, so the
output is byte-identical for identical arguments and one image can be re-rendered in memory with
:func:`render_sample`.
"""

from __future__ import annotations

import itertools
import math
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import skimage.data
import torch
from anomalib.data.utils.generators.perlin import generate_perlin_noise
from PIL import Image
from scipy import ndimage
from skimage import draw, morphology

__all__ = [
    "ALPHA_THRESHOLD",
    "COVERAGE_RANGE",
    "CROP_FRACTION",
    "DEFECT_TYPES",
    "DEMO_TEXTURES",
    "MIN_DEFECT_DELTA",
    "MIN_IMAGE_SIZE",
    "PAINTERS",
    "PERLIN_RESOLUTION",
    "DefectSample",
    "ImageSize",
    "Painter",
    "Shape",
    "apply_defect",
    "category_complete",
    "composite",
    "enforce_min_change",
    "gaussian_window",
    "generate_demo_dataset",
    "grey_target",
    "image_rng",
    "image_shape",
    "irregular_blob",
    "load_photo",
    "paint_hole",
    "paint_perlin",
    "paint_scratch",
    "paint_stain",
    "perlin_noise",
    "planned_files",
    "random_stroke",
    "random_view",
    "render_sample",
    "save_png",
    "write_category",
]

DEMO_TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
DEFECT_TYPES: tuple[str, ...] = ("perlin", "scratch", "hole", "stain")
MIN_IMAGE_SIZE = 32
MIN_DEFECT_DELTA = 16  # every masked pixel changes by at least this much (max over channels, 0..255 scale)
ALPHA_THRESHOLD = 0.2  # pixels blended with at least this opacity belong to the defect
COVERAGE_RANGE = (0.003, 0.08)  # allowed fraction of image pixels covered by one defect
CROP_FRACTION = (0.5, 0.8)  # random crop side as a fraction of the photo side
_MAX_DEFECT_ATTEMPTS = 32
PERLIN_RESOLUTION = 128  # Perlin noise is drawn at most at this size, then upsampled

Painter = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
ImageSize = int | tuple[int, int]  # a square side, or (height, width)
Shape = tuple[int, int]


@dataclass(frozen=True)
class DefectSample:
    """One rendered image: ``clean`` and ``defective`` are (H, W, 3) uint8, ``mask`` is (H, W) bool."""

    clean: np.ndarray
    defective: np.ndarray
    mask: np.ndarray


# --------------------------------------------------------------------------------------------- sources


@cache
def load_photo(texture: str) -> np.ndarray:
    """Return the scikit-image texture photo ``texture`` as a read-only (512, 512) uint8 array."""
    photo = np.ascontiguousarray(getattr(skimage.data, texture)(), dtype=np.uint8)
    photo.setflags(write=False)
    return photo


def image_rng(seed: int, texture: str, group: str, index: int) -> np.random.Generator:
    """Return the independent random stream of image ``index`` in ``<texture>/<group>``."""
    return np.random.default_rng([seed, zlib.crc32(f"{texture}/{group}".encode()), index])


def image_shape(image_size: ImageSize) -> Shape:
    """``(H, W)`` of an image size given as one side (square) or as ``(H, W)``."""
    if isinstance(image_size, int | np.integer) and not isinstance(image_size, bool):
        return int(image_size), int(image_size)
    if isinstance(image_size, Sequence) and not isinstance(image_size, str) and len(image_size) == 2:
        return int(image_size[0]), int(image_size[1])
    msg = f"image_size must be an integer or a (height, width) pair, got {image_size!r}."
    raise ValueError(msg)


def random_view(photo: np.ndarray, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """Randomly crop and flip a grayscale photo at the aspect of ``shape``; return an (H, W, 3) uint8 RGB view.

    The crop's longer side is a random share (:data:`CROP_FRACTION`) of the photo's shorter side.
    """
    height, width = shape
    longest = int(rng.uniform(*CROP_FRACTION) * min(photo.shape))
    crop_height = max(1, round(longest * height / max(shape)))
    crop_width = max(1, round(longest * width / max(shape)))
    top = int(rng.integers(0, photo.shape[0] - crop_height + 1))
    left = int(rng.integers(0, photo.shape[1] - crop_width + 1))
    crop = photo[top : top + crop_height, left : left + crop_width]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.Resampling.BILINEAR)
    return np.repeat(np.asarray(resized)[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------------------- shape helpers


def perlin_noise(shape: Shape, scale: int, rng: np.random.Generator) -> np.ndarray:
    """Return (H, W) float32 Perlin noise (roughly in [-1, 1]) from anomalib, seeded from ``rng`` only.

    The noise is smooth at the scales used here, so it is drawn on a square of at most PERLIN_RESOLUTION px
    per side, cropped to the image's aspect and bilinearly upsampled. ``scale`` (a power of 2) is the number
    of noise cells along the image's shorter side, at least; anomalib's generator takes powers of 2.
    """
    factor = min(1.0, PERLIN_RESOLUTION / max(shape))
    side = max(1, round(max(shape) * factor))
    resolution = (max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor)))
    cells = scale * 2 ** math.ceil(math.log2(max(shape) / min(shape)))  # along the square's side
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**62)))
        noise = generate_perlin_noise(side, side, scale=(cells, cells), device=torch.device("cpu"))
    noise = noise[: resolution[0], : resolution[1]]
    if resolution != shape:
        noise = torch.nn.functional.interpolate(noise[None, None], size=shape, mode="bilinear")[0, 0]
    return noise.numpy().astype(np.float32)


def gaussian_window(shape: Shape, rng: np.random.Generator, sigma_fraction: tuple[float, float]) -> np.ndarray:
    """Return an (H, W) float32 Gaussian bump (peak 1) at a random centre away from the borders.

    Its ``sigma`` is a share ``sigma_fraction`` of the shorter side.
    """
    centre = rng.uniform(0.25, 0.75, size=2) * np.asarray(shape)
    sigma = rng.uniform(*sigma_fraction) * min(shape)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    return np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


def irregular_blob(shape: Shape, rng: np.random.Generator, area_fraction: float) -> np.ndarray:
    """Return an (H, W) bool mask of a wobbly rotated ellipse covering about ``area_fraction`` of the image."""
    aspect = rng.uniform(0.55, 1.0)
    radius = math.sqrt(shape[0] * shape[1]) * math.sqrt(area_fraction / (math.pi * aspect))
    angles = np.linspace(0.0, 2 * math.pi, 72, endpoint=False)
    wobble = np.ones_like(angles)
    for harmonic in (2, 3, 5):
        wobble += rng.uniform(0.0, 0.12) * np.cos(harmonic * angles + rng.uniform(0, 2 * math.pi))
    x, y = radius * wobble * np.cos(angles), radius * aspect * wobble * np.sin(angles)
    theta = rng.uniform(0, math.pi)
    margin = np.minimum(1.4 * radius, np.asarray(shape) / 2)
    centre = rng.uniform(margin, np.asarray(shape) - margin, size=2)
    rows = centre[0] + x * math.sin(theta) + y * math.cos(theta)
    cols = centre[1] + x * math.cos(theta) - y * math.sin(theta)
    mask = np.zeros(shape, dtype=bool)
    mask[draw.polygon(rows, cols, shape=mask.shape)] = True
    return mask


def random_stroke(shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """Return an (H, W) bool mask of a 1-px wandering polyline, 25-60% of the image's mean side long."""
    n_segments = int(rng.integers(4, 9))
    step = rng.uniform(0.25, 0.6) * math.sqrt(shape[0] * shape[1]) / n_segments
    headings = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0.0, 0.35, n_segments))
    path = np.concatenate([[[0.0, 0.0]], np.cumsum(step * np.c_[np.sin(headings), np.cos(headings)], axis=0)])
    last = np.asarray(shape) - 1
    low = -path.min(axis=0)
    start = rng.uniform(low, np.maximum(low, last - path.max(axis=0)))  # keeps the stroke inside where it fits
    points = np.clip(np.rint(start + path), 0, last).astype(int)
    mask = np.zeros(shape, dtype=bool)
    for (r0, c0), (r1, c1) in itertools.pairwise(points):
        mask[draw.line(r0, c0, r1, c1)] = True
    return mask


def grey_target(shape: Shape, value: np.ndarray | float) -> np.ndarray:
    """Broadcast a grey level (scalar or (H, W)) to an (H, W, 3) float32 target image."""
    return np.broadcast_to(np.asarray(value, dtype=np.float32)[..., None], (*shape, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- painters
# A painter returns ``(target, alpha)``: an (H, W, 3) float32 target image in [0, 255] and an (H, W)
# float32 opacity in [0, 1]. The defective image is ``clean * (1 - alpha) + target * alpha``.


def paint_perlin(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Localised Perlin-noise region (shape and content both from anomalib's Perlin noise)."""
    shape = clean.shape[:2]
    shape_noise = perlin_noise(shape, int(rng.choice([4, 8])), rng)
    field = (shape_noise + 1.0) * gaussian_window(shape, rng, (0.08, 0.14))
    region = field >= np.quantile(field, 1.0 - rng.uniform(0.01, 0.05))
    content = 255.0 * (0.5 + 0.5 * np.tanh(2.5 * perlin_noise(shape, 16, rng)))
    return grey_target(shape, content), region * np.float32(rng.uniform(0.75, 0.95))


def paint_scratch(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One to three thin bright or dark curved strokes."""
    shape = clean.shape[:2]
    strokes = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        strokes |= random_stroke(shape, rng)
    radius = min(shape) // 200
    if radius:
        strokes = ndimage.binary_dilation(strokes, structure=morphology.disk(radius))
    value = rng.uniform(215, 250) if rng.random() < 0.5 else rng.uniform(5, 40)
    return grey_target(shape, value), strokes * np.float32(rng.uniform(0.85, 1.0))


def paint_hole(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Dark irregular hole with a soft shadow rim fading out around it."""
    shape = clean.shape[:2]
    hole = irregular_blob(shape, rng, rng.uniform(0.005, 0.035))
    rim_width = max(1.5, min(shape) / 64)
    distance = ndimage.distance_transform_edt(~hole).astype(np.float32)
    alpha = np.where(hole, rng.uniform(0.9, 0.97), 0.6 * np.exp(-distance / rim_width)).astype(np.float32)
    depth = rng.uniform(5, 25) + 0.08 * clean[..., 0].astype(np.float32)
    return grey_target(shape, depth), alpha


def paint_stain(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Semi-transparent brownish stain with soft edges that keeps the underlying texture visible."""
    shape = clean.shape[:2]
    blob = irregular_blob(shape, rng, rng.uniform(0.01, 0.05))
    alpha = ndimage.gaussian_filter(blob.astype(np.float32), sigma=max(1.0, min(shape) / 100)) * rng.uniform(0.5, 0.7)
    tint = np.array([0.55, 0.35, 0.15], dtype=np.float32) + rng.uniform(-0.05, 0.05, size=3).astype(np.float32)
    luminance = clean[..., :1].astype(np.float32) / 255.0
    return 255.0 * tint * (0.55 + 0.45 * luminance), alpha.astype(np.float32)


PAINTERS: dict[str, Painter] = {
    "perlin": paint_perlin,
    "scratch": paint_scratch,
    "hole": paint_hole,
    "stain": paint_stain,
}


# ---------------------------------------------------------------------------------------------- blending


def enforce_min_change(clean: np.ndarray, blended: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Push masked pixels of (H, W, 3) float ``blended`` that changed < MIN_DEFECT_DELTA further, in place.

    Weak pixels move towards ``target`` when it is far enough away, otherwise by a grey shift up or down.
    """
    weak = mask & (np.abs(blended - clean).max(axis=-1) < MIN_DEFECT_DELTA)
    if not weak.any():
        return blended
    base, gap = clean[weak], target[weak] - clean[weak]  # (N, 3)
    reach = np.abs(gap).max(axis=-1, keepdims=True)
    towards = np.rint(base + gap * np.minimum(1.0, (MIN_DEFECT_DELTA + 0.5) / np.maximum(reach, 1e-6)))
    up, down = np.minimum(base + MIN_DEFECT_DELTA, 255), np.maximum(base - MIN_DEFECT_DELTA, 0)
    up_ok = (up - base).max(axis=-1, keepdims=True) >= MIN_DEFECT_DELTA
    down_ok = (base - down).max(axis=-1, keepdims=True) >= MIN_DEFECT_DELTA
    shifted = np.where((up_ok & (gap.mean(axis=-1, keepdims=True) >= 0)) | ~down_ok, up, down)
    blended[weak] = np.where(reach >= MIN_DEFECT_DELTA + 0.5, towards, shifted)
    return blended


def composite(clean: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Alpha-blend ``target`` over (H, W, 3) uint8 ``clean``; return (defective uint8, mask (H, W) bool).

    The mask is ``alpha >= ALPHA_THRESHOLD``; pixels outside it are left untouched and every pixel inside
    it differs from ``clean`` by at least MIN_DEFECT_DELTA in some channel.
    """
    mask = alpha >= ALPHA_THRESHOLD
    base = clean.astype(np.float32)
    blended = np.clip(np.rint(base + alpha[..., None] * (target - base)), 0, 255)
    blended = enforce_min_change(base, blended, target, mask)
    return np.where(mask[..., None], blended, base).astype(np.uint8), mask


def apply_defect(clean: np.ndarray, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``defect`` onto (H, W, 3) uint8 ``clean``, redrawing until its area is within COVERAGE_RANGE."""
    if defect not in PAINTERS:
        msg = f"Unknown defect {defect!r}; valid defects: {', '.join(PAINTERS)}."
        raise ValueError(msg)
    for _ in range(_MAX_DEFECT_ATTEMPTS):
        defective, mask = composite(clean, *PAINTERS[defect](clean, rng))
        if COVERAGE_RANGE[0] <= mask.mean() <= COVERAGE_RANGE[1]:
            return defective, mask
    msg = f"Could not draw a '{defect}' defect covering {COVERAGE_RANGE} of a {clean.shape[:2]} image."
    raise RuntimeError(msg)


def render_sample(
    texture: str,
    group: str,
    index: int,
    image_size: ImageSize = 256,
    seed: int = 0,
) -> DefectSample:
    """Render image ``index`` of ``<texture>/<group>`` (e.g. ``train/good``, ``test/hole``) in memory.

    For ``good`` groups ``defective`` equals ``clean`` and the mask is all False.
    """
    rng = image_rng(seed, texture, group, index)
    clean = random_view(load_photo(texture), image_shape(image_size), rng)
    defect = group.rsplit("/", 1)[-1]
    if defect == "good":
        return DefectSample(clean, clean, np.zeros(clean.shape[:2], dtype=bool))
    return DefectSample(clean, *apply_defect(clean, defect, rng))


# ----------------------------------------------------------------------------------------------- writing


def save_png(path: Path, array: np.ndarray) -> None:
    """Write a (H, W) or (H, W, 3) uint8 array as a PNG with fixed settings (no metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def planned_files(n_train: int, n_test_good: int, n_test_defect: int, defects: Sequence[str]) -> dict[str, list[str]]:
    """Map each group (``train/good``, ``test/<d>``, ``ground_truth/<d>``) to its expected file names."""
    counts = {"train/good": n_train, "test/good": n_test_good} | {f"test/{d}": n_test_defect for d in defects}
    files = {group: [f"{i:0{max(3, len(str(n - 1)))}d}.png" for i in range(n)] for group, n in counts.items()}
    masks = {f"ground_truth/{d}": [_mask_name(name) for name in files[f"test/{d}"]] for d in defects}
    return files | masks


def _mask_name(image_name: str) -> str:
    """Return the MVTec ground-truth file name of an image file name (``000.png`` -> ``000_mask.png``)."""
    return image_name.removesuffix(".png") + "_mask.png"


def category_complete(category_dir: Path, files: dict[str, list[str]], shape: Shape) -> bool:
    """Return True when ``category_dir`` holds exactly the planned files at the requested image size."""
    if not category_dir.is_dir():
        return False
    present = {p.relative_to(category_dir).as_posix() for p in category_dir.rglob("*") if p.is_file()}
    if present != {f"{group}/{name}" for group, names in files.items() for name in names}:
        return False
    with Image.open(category_dir / "train" / "good" / files["train/good"][0]) as probe:
        return probe.size == (shape[1], shape[0])


def write_category(category_dir: Path, texture: str, files: dict[str, list[str]], shape: Shape, seed: int) -> None:
    """(Re)create ``category_dir`` with every image and ground-truth mask of one texture."""
    shutil.rmtree(category_dir, ignore_errors=True)
    for group, names in files.items():
        if not group.startswith(("train/", "test/")):
            continue
        mask_dir = category_dir / group.replace("test/", "ground_truth/", 1)
        for index, name in enumerate(names):
            sample = render_sample(texture, group, index, shape, seed)
            save_png(category_dir / group / name, sample.defective)
            if sample.mask.any():
                save_png(mask_dir / _mask_name(name), sample.mask.astype(np.uint8) * np.uint8(255))


# -------------------------------------------------------------------------------------------- validation


def _as_names(value: Sequence[str] | str, kind: str, valid: Sequence[str]) -> tuple[str, ...]:
    """Normalise a name or sequence of names, rejecting empty, duplicated or unknown entries."""
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names:
        msg = f"At least one {kind} is required; valid {kind}s: {', '.join(valid)}."
        raise ValueError(msg)
    unknown = [name for name in names if name not in valid]
    if unknown:
        msg = f"Unknown {kind}(s) {unknown}; valid {kind}s: {', '.join(valid)}."
        raise ValueError(msg)
    if len(set(names)) != len(names):
        msg = f"Duplicate {kind}s in {list(names)}."
        raise ValueError(msg)
    return names


def _check_int(name: str, value: int, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (not bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        msg = f"{name} must be an integer >= {minimum}, got {value!r}."
        raise ValueError(msg)


def _check_image_size(image_size: ImageSize) -> Shape:
    """Return ``(H, W)`` of ``image_size``, rejecting sides below MIN_IMAGE_SIZE and non-integers."""
    if isinstance(image_size, Sequence) and not isinstance(image_size, str) and len(image_size) == 2:
        for name, side in zip(("image_size height", "image_size width"), image_size, strict=True):
            _check_int(name, side, MIN_IMAGE_SIZE)
    else:
        _check_int("image_size", image_size, MIN_IMAGE_SIZE)
    return image_shape(image_size)


# ------------------------------------------------------------------------------------------------ public


def generate_demo_dataset(
    root: str | Path,
    textures: Sequence[str] = DEMO_TEXTURES,
    image_size: ImageSize = 256,
    n_train: int = 64,
    n_test_good: int = 16,
    n_test_defect: int = 8,
    defects: Sequence[str] = DEFECT_TYPES,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the demo dataset in MVTec AD layout under ``root`` (one category per texture); return ``root``.

    ``image_size`` is a square side or ``(height, width)``; ``n_test_defect`` is per defect type. A category
    that already holds exactly the planned files is kept unless ``overwrite`` is True; an incomplete one is
    regenerated.
    """
    texture_names = _as_names(textures, "texture", DEMO_TEXTURES)
    defect_names = _as_names(defects, "defect", DEFECT_TYPES)
    shape = _check_image_size(image_size)
    for name, count in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        _check_int(name, count, 1)
    _check_int("seed", seed, 0)

    root = Path(root)
    files = planned_files(n_train, n_test_good, n_test_defect, defect_names)
    for texture in texture_names:
        category_dir = root / texture
        if overwrite or not category_complete(category_dir, files, shape):
            write_category(category_dir, texture, files, shape, int(seed))
    return root
