"""Score images with an exported CflowPlus OpenVINO model and save anomalib's heat-map visualizations.

Usage:
    python scripts/predict_openvino.py --model results/.../weights/openvino/model.xml \
        --image path/to/image_or_folder --output results/predictions
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from anomalib.data import NumpyImageItem
from anomalib.deploy import OpenVINOInferencer
from anomalib.visualization.image.item_visualizer import visualize_image_item

from anomalib_cflow_plus.data.checks import probe_image
from anomalib_cflow_plus.quantization import cpu_inference_config

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def openvino_cache_dir() -> Path:
    """Return the user cache folder for OpenVINO's compiled models (under ``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "anomalib_cflow_plus" / "openvino"


def load_inferencer(model: Path, device: str, f32: bool) -> OpenVINOInferencer:
    """Build anomalib's ``OpenVINOInferencer``, with OpenVINO's model cache in the user cache folder.

    anomalib (2.7) creates ``./openvino_cache`` in the current folder and fills it with tens of MB; its model is
    compiled here from a temporary folder instead, with ``CACHE_DIR`` set to :func:`openvino_cache_dir`.
    """
    config = {"CACHE_DIR": str(openvino_cache_dir())}
    if device.upper() == "CPU":
        config.update(cpu_inference_config(model))  # INT8 models: the f32 hint, which is faster for them
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    model, here = model.resolve(), Path.cwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)  # contextlib.chdir needs Python 3.11
        try:
            return OpenVINOInferencer(path=model, device=device, config=config)
        finally:
            os.chdir(here)


def image_paths(source: Path) -> list[Path]:
    """One image, or every image in a folder (sorted)."""
    if source.is_dir():
        return sorted(path for path in source.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    return [source]


def main() -> int:
    """Predict, print one line per image, and write a heat-map overlay per image.

    An image that cannot be read is reported by name, with the reason, and the others are still scored. The
    exit status is 1 only if no image could be scored.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="exported model.xml")
    parser.add_argument("--image", type=Path, required=True, help="an image or a folder of images")
    parser.add_argument("--output", type=Path, required=True, help="a .png file (one image) or a folder")
    parser.add_argument("--device", default="CPU", help="OpenVINO device, e.g. CPU, GPU, AUTO")
    parser.add_argument("--f32", action="store_true", help="force FP32 (CPUs with bf16 otherwise run in bf16)")
    args = parser.parse_args()

    inferencer = load_inferencer(args.model, args.device, args.f32)
    paths = image_paths(args.image)
    single_file = len(paths) == 1 and args.output.suffix.lower() == ".png"
    skipped = []
    for path in paths:
        problem = probe_image(path).problem
        if problem is not None:
            skipped.append(path)
            print(f"{path}: skipped, cannot be read: {problem}", file=sys.stderr)
            continue
        prediction = inferencer.predict(path)
        item = NumpyImageItem(
            image=prediction.image[0],
            image_path=str(path),
            anomaly_map=prediction.anomaly_map[0],
            pred_score=prediction.pred_score[0],
            pred_label=prediction.pred_label[0],
            pred_mask=prediction.pred_mask[0] if prediction.pred_mask is not None else None,
        )
        picture = visualize_image_item(
            item, fields=["image", "anomaly_map"], overlay_fields=[("image", ["anomaly_map"])]
        )
        target = args.output if single_file else args.output / f"{path.stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target)
        label = "anomalous" if bool(prediction.pred_label[0]) else "normal"
        print(f"{path}: score {float(prediction.pred_score[0]):.4f} ({label}) -> {target}")
    scored = len(paths) - len(skipped)
    if skipped:
        print(f"Scored {scored} of {len(paths)} images; skipped {len(skipped)} that cannot be read.", file=sys.stderr)
    return 0 if scored else 1


if __name__ == "__main__":
    sys.exit(main())
