"""Mixed precision on this CPU: CflowPlus's training speed under ``bf16-mixed`` against ``32-true``, side by side.

Each round trains CflowPlus at its defaults (lite1, 256 px, fast recipe) for one epoch on a demo texture under each
precision in turn, in this process, through anomalib's ``Engine`` (validation off, so the epoch is the training
steps); the ratio is the median over rounds of the paired epoch times. Then one training batch is profiled under
each precision (``torch.profiler``, self CPU time per op), which shows what bounds the speed-up.

    python -m benchmarks.mixed_precision [--rounds 3] [--texture brick] [--threads 2]

Writes ``benchmarks/out/mixed_precision.json`` and prints markdown tables. The accuracy of both precisions on
``../shared/realdev`` comes from ``python -m benchmarks.real_data --models CflowPlus "CflowPlus bf16-mixed"``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import seed_everything

from anomalib_cflow_plus import CflowPlus, CflowPlusModel
from anomalib_cflow_plus.training import TRAINING_RECIPES, DecoderTraining
from benchmarks.harness import (
    EpochTimer,
    cpu_engine,
    demo_datamodule,
    ensure_demo_data,
    environment,
    paired_ratio,
    quiet_libraries,
    write_json,
)
from benchmarks.jobs import OUT_DIR

PRECISIONS = ("32-true", "bf16-mixed")
AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16}


def epoch_seconds(precision: str, data_root: Path, texture: str) -> float:
    """Wall time of one training epoch of CflowPlus's defaults under ``precision``."""
    seed_everything(0)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as run_dir:
        engine = cpu_engine(Path(run_dir), 1, [timer], precision=precision, limit_val_batches=0)
        engine.fit(CflowPlus(), datamodule=demo_datamodule(data_root, texture, num_workers=0))
    return timer.seconds[0]


def step_profile(precision: str, images: torch.Tensor, top: int = 8) -> dict[str, Any]:
    """Self CPU time of the ops of one training batch (after a warm-up batch) under ``precision``."""
    torch.manual_seed(0)
    model = CflowPlusModel()
    model.load_pretrained()
    recipe = TRAINING_RECIPES["fast"]
    training = DecoderTraining(model, recipe.fiber_batch_size, recipe.joint_layers, max_skipped_steps=20)
    optimizer = torch.optim.Adam(model.decoders.parameters(), lr=recipe.lr)
    dtype = AUTOCAST[precision]
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        training(images, optimizer)  # warm-up, and the ActNorms' initialization
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            training(images, optimizer)
    events = sorted(profile.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    return {
        "total_ms": total / 1e3,
        "top_ops": [
            {"op": event.key, "self_ms": event.self_cpu_time_total / 1e3, "share": event.self_cpu_time_total / total}
            for event in events[:top]
        ],
    }


def markdown(epochs: dict[str, list[float]], ratio: float, profiles: dict[str, dict[str, Any]]) -> str:
    """The epoch-time table and the per-op profile table."""
    lines = ["| precision | epoch s (median) | rounds |", "|---|---|---|"]
    lines += [f"| {p} | {statistics.median(s):.1f} | {', '.join(f'{x:.1f}' for x in s)} |" for p, s in epochs.items()]
    lines += ["", f"bf16-mixed speed-up (median of paired rounds): **{ratio:.2f}x**", ""]
    for precision, profile in profiles.items():
        lines += [f"{precision}, one batch: {profile['total_ms']:.0f} ms of op time", "", "| op | ms | share |"]
        lines += ["|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['self_ms']:.0f} | {o['share']:.0%} |" for o in profile["top_ops"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Time the epochs round-robin, profile one batch per precision, write the JSON and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texture", default="brick")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=OUT_DIR / "mixed_precision.json")
    args = parser.parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(args.threads)
    data_root = ensure_demo_data([args.texture])
    epochs: dict[str, list[float]] = {precision: [] for precision in PRECISIONS}
    for _ in range(args.rounds):
        for precision in PRECISIONS:
            epochs[precision].append(epoch_seconds(precision, data_root, args.texture))
    ratio = paired_ratio(epochs["32-true"], epochs["bf16-mixed"])
    datamodule = demo_datamodule(data_root, args.texture, num_workers=0)
    datamodule.setup("fit")
    images = next(iter(datamodule.train_dataloader())).image
    images = CflowPlus.configure_pre_processor()(images)  # the default pre-processing: resize to 256, normalize
    profiles = {precision: step_profile(precision, images) for precision in PRECISIONS}
    write_json(args.json, {"environment": environment(), "epoch_s": epochs, "speedup": ratio, "profiles": profiles})
    print(markdown(epochs, ratio, profiles))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
