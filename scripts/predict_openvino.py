"""Score images with an exported CflowPlus OpenVINO model and save anomalib's heat-map visualizations.

Usage:
    python scripts/predict_openvino.py --model results/.../weights/openvino/model.xml \
        --image path/to/image_or_folder --output results/predictions
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anomalib.data import NumpyImageItem
from anomalib.deploy import OpenVINOInferencer
from anomalib.visualization.image.item_visualizer import visualize_image_item

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def image_paths(source: Path) -> list[Path]:
    """One image, or every image in a folder (sorted)."""
    if source.is_dir():
        return sorted(path for path in source.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    return [source]


def main() -> None:
    """Predict, print one line per image, and write a heat-map overlay per image."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="exported model.xml")
    parser.add_argument("--image", type=Path, required=True, help="an image or a folder of images")
    parser.add_argument("--output", type=Path, required=True, help="a .png file (one image) or a folder")
    parser.add_argument("--device", default="CPU", help="OpenVINO device, e.g. CPU, GPU, AUTO")
    parser.add_argument("--f32", action="store_true", help="force FP32 (CPUs with bf16 otherwise run in bf16)")
    args = parser.parse_args()

    config = {"INFERENCE_PRECISION_HINT": "f32"} if args.f32 else None
    inferencer = OpenVINOInferencer(path=args.model, device=args.device, config=config)
    paths = image_paths(args.image)
    single_file = len(paths) == 1 and args.output.suffix.lower() == ".png"
    for path in paths:
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


if __name__ == "__main__":
    main()
