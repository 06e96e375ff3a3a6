"""Digest of a seeded CflowPlus run's scores and maps, to show that a refactor changes no result.

Trains CflowPlus on a small demo dataset through anomalib's ``Engine`` (seeded), predicts the test split and
prints a JSON line: the test metrics, the first scores, and SHA-256 digests of every image score and anomaly map
rounded to ``--decimals`` places. Run it before and after a change; equal digests mean equal results.

    python scripts/score_digest.py --out digest.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch


def digest(values: np.ndarray, decimals: int) -> str:
    """SHA-256 (16 hex digits) of ``values`` rounded to ``decimals`` places, as float64 bytes."""
    rounded = np.round(values.astype(np.float64), decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    return hashlib.sha256(rounded.tobytes()).hexdigest()[:16]


def run(root: Path, backbone: str, epochs: int, seed: int, decimals: int, precision: str) -> dict:
    """Train, test and predict; return the metrics and digests."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_cflow_plus import CflowPlus
    from anomalib_cflow_plus.data import generate_demo_dataset

    data_root = generate_demo_dataset(
        root / "data", textures=("grass",), seed=0, image_size=128, n_train=24, n_test_good=8, n_test_defect=8
    )
    datamodule = MVTecAD(root=data_root, category="grass", train_batch_size=8, eval_batch_size=8, num_workers=0)
    seed_everything(seed)
    model = CflowPlus(backbone=backbone)
    engine = Engine(
        max_epochs=epochs,
        default_root_dir=root / "run",
        accelerator="cpu",
        devices=1,
        logger=False,
        precision=precision,
    )
    engine.fit(model, datamodule=datamodule)
    metrics = engine.test(model, datamodule=datamodule)[0]
    batches = engine.predict(model, datamodule=datamodule, return_predictions=True)
    scores = torch.cat([batch.pred_score.float().flatten() for batch in batches]).numpy()
    maps = torch.cat([batch.anomaly_map.float().flatten() for batch in batches]).numpy()
    return {
        "metrics": {name: round(float(value), 6) for name, value in sorted(metrics.items())},
        "first_scores": [round(float(score), 6) for score in scores[:4]],
        "score_digest": digest(scores, decimals),
        "map_digest": digest(maps, decimals),
        "decimals": decimals,
    }


def main() -> None:
    """Parse the options, run, print (and write) the digest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decimals", type=int, default=5)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp), args.backbone, args.epochs, args.seed, args.decimals, args.precision)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
