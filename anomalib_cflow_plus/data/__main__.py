"""Command line: ``python -m anomalib_cflow_plus.data --root datasets/demo --image-size 256 --n-train 64``.

``--image-size 256x640`` writes non-square images, 256 px high and 640 px wide (a long part).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from anomalib_cflow_plus.data.demo import DEFECT_TYPES, DEMO_TEXTURES, generate_demo_dataset


def parse_image_size(text: str) -> int | tuple[int, int]:
    """``"256"`` -> 256 (square), ``"256x640"`` -> ``(256, 640)`` (height x width)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(part.strip().isdigit() for part in parts):
        msg = f"expected a side such as 256 or HEIGHTxWIDTH such as 256x640, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    sides = [int(part) for part in parts]
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the demo dataset generator."""
    parser = argparse.ArgumentParser(
        prog="python -m anomalib_cflow_plus.data",
        description="Write the demo texture dataset (MVTec AD layout) with synthetic defects and exact masks.",
    )
    parser.add_argument("--root", type=Path, default=Path("datasets/demo"), help="output folder (default: %(default)s)")
    parser.add_argument("--textures", nargs="+", default=list(DEMO_TEXTURES), choices=DEMO_TEXTURES)
    parser.add_argument("--defects", nargs="+", default=list(DEFECT_TYPES), choices=DEFECT_TYPES)
    parser.add_argument(
        "--image-size",
        type=parse_image_size,
        default=256,
        help="image side in px, or HEIGHTxWIDTH such as 256x640 (default: %(default)s)",
    )
    parser.add_argument("--n-train", type=int, default=64, help="normal training images per texture")
    parser.add_argument("--n-test-good", type=int, default=16, help="normal test images per texture")
    parser.add_argument("--n-test-defect", type=int, default=8, help="test images per texture and defect type")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="regenerate categories that are already complete")
    return parser


def count_pngs(category_dir: Path) -> dict[str, int]:
    """Return the number of PNG files in each ``<split>/<label>`` folder of one category."""
    return {
        folder.relative_to(category_dir).as_posix(): len(list(folder.glob("*.png")))
        for folder in sorted(category_dir.glob("*/*"))
        if folder.is_dir()
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the dataset, print where it was written and the file counts; return the exit code."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        root = generate_demo_dataset(
            root=args.root,
            textures=args.textures,
            image_size=args.image_size,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_defect=args.n_test_defect,
            defects=args.defects,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Demo dataset at {root.resolve()} ({time.perf_counter() - start:.1f} s)")
    for texture in args.textures:
        counts = ", ".join(f"{folder}={n}" for folder, n in count_pngs(root / texture).items())
        print(f"  {texture}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
