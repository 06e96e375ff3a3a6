"""One model for many part types (issue 29): one CflowPlus on seven types against one per type, and the union.

Three arms, each trained by anomalib's ``Engine`` on the packaged lite1 weights, 256 px, 3 epochs:

* **per type**: one CflowPlus per type (``real_data_job``, the job every real-data study runs), over ``--seeds``;
* **unified**: one CflowPlus on all types through :class:`~anomalib_cflow_plus.data.MultiCategory`, which recognizes
  each image's type, conditions its decoders on it and calibrates per type (``per_part_type=True``);
* **union**: the baseline, today's model trained on the same union as one part (``per_part_type=False``).

The unified and union jobs test on every type at once and read anomalib's evaluator output per type
(``image_AUROC/<type>``); they also time the OpenVINO IRs of the unified model and of a single-type model, side by
side in one process (batch 1 and 8, f32), and report checkpoint and IR sizes and the share of test images whose type
the unified model recognized.

Usage::

    python -m benchmarks.unified train --seeds 0 1 2 --unified-seeds 0     # all arms; jobs are cached by spec
    python -m benchmarks.unified report                                  # markdown table, benchmarks/out/unified.json
    python -m benchmarks.unified train --quick                           # the three demo textures, 1 epoch

``--data-root`` is an MVTec-AD-layout folder of real categories (default ``../shared/realdev``); the demo textures
are generated on first use.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything
from torchvision.transforms.v2 import Resize

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.backbones import load_encoder_weights, packaged_state_dict
from anomalib_cflow_plus.calibration import calibrate
from anomalib_cflow_plus.data import MultiCategory
from benchmarks import deploy_speed
from benchmarks.harness import (
    DEFAULT_REALDEV_ROOT,
    DEMO_PREFIX,
    METRIC_KEYS,
    METRICS,
    OUT_DIR,
    REAL_DATA_JOBS,
    cflow_plus_source,
    cflow_plus_spec,
    cpu_engine,
    dataset_location,
    demo_datamodule,
    environment,
    format_spread,
    mean_and_spread,
    real_categories,
    real_data_job,
    source_digest,
    spec_key,
    write_json,
)
from benchmarks.jobs import peak_rss_mb, run_job, serve

JOB_DIR = OUT_DIR / "unified" / "jobs"
IR_DIR = OUT_DIR / "unified" / "ir"
REPORT = OUT_DIR / "unified.json"
DEMO_TYPES = tuple(f"{DEMO_PREFIX}{texture}" for texture in ("brick", "grass", "gravel"))
ARMS = {"unified": True, "union": False}  # arm -> per_part_type
IMAGE_SIZE = 256


def datasets(data_root: Path, quick: bool, chosen: Sequence[str] | None = None) -> list[str]:
    """The part types: every real category of ``data_root`` and the three demo textures (the textures alone, quick).

    ``chosen`` (``--types``) picks some of them, e.g. to try a change on two categories first.
    """
    names = list(DEMO_TYPES) if quick else [*real_categories(data_root), *DEMO_TYPES]
    return [name for name in names if not chosen or name in chosen or type_name(name) in chosen]


def type_name(dataset: str) -> str:
    """A data set's part-type name: its category (``demo/brick`` -> ``brick``)."""
    return dataset.rsplit("/", 1)[-1]


def per_type_results(dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One CflowPlus trained on one type (``real_data_job``); with ``--reuse-source``, a cached job of that source.

    A job of an earlier source is taken only when asked (its spec equal but for ``source``): the single-type code
    path is unchanged when ``scripts/score_digest.py`` gives the same digest.
    """
    spec = cflow_plus_spec({}, dataset, seed, args.data_root, IMAGE_SIZE, args.epochs, args.threads)
    if args.reuse_source:
        for path in sorted(REAL_DATA_JOBS.glob("*.spec.json")):
            old = json.loads(path.read_text())
            result = path.with_name(path.name.replace(".spec.json", ".json"))
            same = {key: value for key, value in old.items() if key not in ("source", "evidence")} == {
                key: value for key, value in spec.items() if key != "source"
            }
            if same and old.get("source") == args.reuse_source and result.is_file():
                return {**json.loads(result.read_text()), "reused_source": args.reuse_source}
    return real_data_job(spec)


def unified_datamodule(spec: dict[str, Any], resize: bool = False) -> MultiCategory:
    """:class:`MultiCategory` over one anomalib ``MVTecAD`` datamodule per type of the spec.

    ``resize``: each child resizes its images itself (without a model, whose pre-processor would).
    """
    children = []
    augmentations = Resize((IMAGE_SIZE, IMAGE_SIZE)) if resize else None
    for dataset in spec["datasets"]:
        root, category = dataset_location(dataset, Path(spec["data_root"]))
        children.append(demo_datamodule(root, category, batch_size=16, num_workers=0, augmentations=augmentations))
    return MultiCategory(children, train_batch_size=16, eval_batch_size=16, num_workers=0)


def reference_model(model: CflowPlus, images: torch.Tensor) -> CflowPlus:
    """A single-type CflowPlus with the unified model's encoder and shared decoder weights, calibrated on a few images.

    For export and timing only. Its decoders must be trained ones: an untrained coupling's last layer is zero, and
    the exporter folds it away, which would make the single-type IR smaller and faster than any trained one.
    """
    single = CflowPlus(pre_processor=AnomalibModule.configure_pre_processor((IMAGE_SIZE, IMAGE_SIZE)))
    shared = {
        key: value
        for key, value in model.model.state_dict().items()
        if key.startswith(("encoder.", "decoders.")) and "type_" not in key
    }
    single.model.load_state_dict(shared, strict=False)
    calibrate(single.model, [single.pre_processor.transform(images)], torch.device("cpu"))
    single.post_processor = model.post_processor
    return single


def recognition_and_novelty(model: CflowPlus, datamodule: MultiCategory) -> dict[str, dict[str, float]]:
    """Per type: the share of its test images whose type the model recognized, and its image AUROC without the
    novelty term (the score of the calibrated maps alone), to weigh that term (``per_part_type`` models)."""
    from sklearn.metrics import roc_auc_score

    names = datamodule.part_types
    rows: list[tuple[int, bool, int, float]] = []  # true type, recognized, label, score without novelty
    model.eval()
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            images = model.pre_processor.transform(batch.image)
            evidence = model.model.evidence(images)
            _, score = model.model.anomaly_map(evidence.maps, tuple(images.shape[-2:]), evidence.part_type)
            found = [model.model.part_types.names[index] for index in evidence.part_type.tolist()]
            for index, name, label, value in zip(
                batch.part_type.tolist(), found, batch.gt_label.tolist(), score.tolist(), strict=True
            ):
                rows.append((index, names[index] == name, int(label), value))
    result: dict[str, dict[str, float]] = {"recognized": {}, "image_auroc_without_novelty": {}}
    for index, name in enumerate(names):
        mine = [row for row in rows if row[0] == index]
        result["recognized"][name] = sum(row[1] for row in mine) / len(mine)
        result["image_auroc_without_novelty"][name] = float(roc_auc_score([r[2] for r in mine], [r[3] for r in mine]))
    return result


def unified_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one model on all the spec's types and test it; per-type metrics, sizes and exported IRs."""
    torch.set_num_threads(spec["threads"])
    seed_everything(spec["seed"], workers=True)
    model = CflowPlus(
        per_part_type=spec["per_part_type"],
        pre_processor=AnomalibModule.configure_pre_processor((IMAGE_SIZE, IMAGE_SIZE)),
        evaluator=CflowPlus.configure_evaluator(),
    )
    load_encoder_weights(model.model.feature_encoder, packaged_state_dict(model.backbone), model.backbone)
    model.pre_trained = False  # loaded above, from the package
    datamodule = unified_datamodule(spec)
    with tempfile.TemporaryDirectory() as run_dir:
        engine = cpu_engine(Path(run_dir), spec["epochs"])
        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        train_s = time.perf_counter() - start
        (results,) = engine.test(model=model, datamodule=datamodule, verbose=False)
        checkpoint = Path(run_dir) / "benchmark.ckpt"
        engine.trainer.save_checkpoint(checkpoint)
        checkpoint_mb = checkpoint.stat().st_size / 2**20
    metrics = {}
    for name in [*datamodule.part_types, None]:
        suffix = "" if name is None else f"/{name}"
        metrics[name or "all"] = {key: float(results[f"{metric}{suffix}"]) for metric, key in METRIC_KEYS.items()}
    output = {
        **spec,
        "metrics": metrics,
        "part_types": datamodule.part_types,
        "train_images": len(datamodule.train_data),
        "train_s": train_s,
        "checkpoint_mb": checkpoint_mb,
        "peak_rss_mb": peak_rss_mb(),
    }
    if spec["per_part_type"]:
        output |= recognition_and_novelty(model, datamodule)
        images = next(iter(datamodule.train_dataloader())).image[:4]
        irs = {}
        for arm, candidate in (("unified", model), ("single type", reference_model(model, images))):
            irs[arm] = {}
            for batch in (1, 8):
                folder = IR_DIR / spec_key(spec) / deploy_speed.slug(arm) / f"b{batch}"
                irs[arm][str(batch)] = deploy_speed._export(candidate.cpu().eval(), folder, IMAGE_SIZE, batch)
        output["irs"] = irs
        output["ir_mb"] = {
            arm: Path(paths["1"]).with_suffix(".bin").stat().st_size / 2**20 for arm, paths in irs.items()
        }
    return output


def novelty_study(args: argparse.Namespace) -> dict[str, Any]:
    """How far beyond its type's training range each test image's descriptor lies, and an unseen type's images.

    The descriptors come from the frozen encoder alone, so no decoder is trained: per type, the prototype and the
    training range (largest distance, std) as :func:`~anomalib_cflow_plus.calibration.calibrate` fits them; then
    each test image's excess ``(d - d_max) / d_std`` over its nearest type, and, leaving each type out, its images'
    excess over the nearest of the others (what :data:`~anomalib_cflow_plus.part_types.NOVELTY_MARGIN` must separate).
    """
    from anomalib_cflow_plus.part_types import image_descriptors
    from anomalib_cflow_plus.torch_model import CflowPlusModel

    names = datasets(args.data_root, args.quick, args.types)
    model = CflowPlusModel().eval()
    load_encoder_weights(model.feature_encoder, packaged_state_dict(model.backbone), model.backbone)
    transform = AnomalibModule.configure_pre_processor((IMAGE_SIZE, IMAGE_SIZE)).transform
    datamodule = unified_datamodule({"datasets": names, "data_root": str(args.data_root)}, resize=True)
    datamodule.setup("fit")
    found: dict[str, list[torch.Tensor]] = {"train": [], "test": []}
    kinds: dict[str, list[torch.Tensor]] = {"train": [], "test": []}
    labels: list[torch.Tensor] = []
    with torch.no_grad():
        for split, loader in (("train", datamodule.train_dataloader()), ("test", datamodule.test_dataloader())):
            for batch in loader:
                found[split].append(image_descriptors(model.encode(transform(batch.image))))
                kinds[split].append(batch.part_type.flatten())
                if split == "test":
                    labels.append(batch.gt_label.flatten())
    train, test = torch.cat(found["train"]), torch.cat(found["test"])
    train_type, test_type, label = torch.cat(kinds["train"]), torch.cat(kinds["test"]), torch.cat(labels)

    def excess(chosen: list[int], descriptors: torch.Tensor) -> torch.Tensor:
        prototypes = torch.stack([torch.nn.functional.normalize(train[train_type == t].mean(0), dim=0) for t in chosen])
        ranges = []
        for index, kind in enumerate(chosen):
            distance = 1 - train[train_type == kind] @ prototypes[index]
            ranges.append((distance.max(), distance.std(unbiased=False).clamp_min(1e-6)))
        similarity = descriptors @ prototypes.T
        nearest = similarity.argmax(dim=1)
        maximum = torch.stack([r[0] for r in ranges])[nearest]
        spread = torch.stack([r[1] for r in ranges])[nearest]
        return (1 - similarity.max(dim=1).values - maximum) / spread

    everyone = list(range(len(names)))
    seen = excess(everyone, test)
    report: dict[str, Any] = {}
    for index, name in enumerate(names):
        mine = test_type == index
        unseen = excess([t for t in everyone if t != index], test[mine])
        report[type_name(name)] = {
            "good_max": float(seen[mine & (label == 0)].max()),
            "good_q95": float(seen[mine & (label == 0)].quantile(0.95)),
            "anomalous_max": float(seen[mine & (label == 1)].max()),
            "unseen_min": float(unseen.min()),
            "unseen_median": float(unseen.median()),
        }
    return report


def arm_spec(args: argparse.Namespace, seed: int, per_part_type: bool, names: Sequence[str]) -> dict[str, Any]:
    """The spec of a unified or union job."""
    return {
        "datasets": list(names),
        "data_root": str(args.data_root.resolve()),
        "seed": seed,
        "per_part_type": per_part_type,
        "epochs": args.epochs,
        "threads": args.threads,
        "source": cflow_plus_source(),
        "script": source_digest([Path(__file__)]),
    }


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run every arm's jobs (cached by spec) and time the unified IRs; write the raw results."""
    names = datasets(args.data_root, args.quick, args.types)
    report: dict[str, Any] = {"environment": environment(), "types": [type_name(name) for name in names]}
    report["per_type"] = {
        type_name(name): [per_type_results(name, seed, args) for seed in args.seeds] for name in names
    }
    for arm, per_part_type in ARMS.items():
        report[arm] = []
        if arm not in args.arms:
            continue
        for seed in args.unified_seeds:
            spec = arm_spec(args, seed, per_part_type, names)
            result = run_job("benchmarks.unified", "job", spec, JOB_DIR, spec_key(spec), reuse=True, label=arm)
            report[arm].append(result)
    unified = [run for run in report["unified"] if "irs" in run]
    if unified and not args.quick:
        timing_args = argparse.Namespace(repeats=args.repeats, warmup=3, threads=args.threads)
        configs = [{"precision": "f32", "batch": batch} for batch in (1, 8)]
        report["timing"] = deploy_speed.time_irs(
            unified[0]["irs"], configs, timing_args, "unified_time", reference="single type"
        )
    write_json(REPORT, report)
    return report


def markdown(report: dict[str, Any]) -> str:
    """The table of the issue: per type, each arm's image AUROC, pixel AUROC and AUPRO; then the costs."""
    arms = ["per type", *(arm for arm in ARMS if report.get(arm))]
    lines = [
        "| type | " + " | ".join(f"{arm} {metric}" for metric in METRICS for arm in arms) + " |",
        "|---|" + "---|" * (len(arms) * len(METRICS)),
    ]
    means: dict[str, dict[str, list[float]]] = {arm: {m: [] for m in METRICS} for arm in arms}
    for name in report["types"]:
        cells = []
        for metric in METRICS:
            for arm in arms:
                runs = report["per_type"][name] if arm == "per type" else report[arm]
                values = [run[metric] if arm == "per type" else run["metrics"][name][metric] for run in runs]
                entry = mean_and_spread(values)
                means[arm][metric].append(entry["mean"])
                cells.append(format_spread(entry))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    mean_cells = [f"{statistics.fmean(means[arm][metric]):.3f}" for metric in METRICS for arm in arms]
    lines.append("| **mean** | " + " | ".join(mean_cells) + " |")
    lines += ["", *cost_lines(report)]
    return "\n".join(lines)


def cost_lines(report: dict[str, Any]) -> list[str]:
    """Training time, checkpoint and IR sizes, latency and type recognition, as markdown lines."""
    per_type_s = sum(statistics.fmean(run["train_s"] for run in runs) for runs in report["per_type"].values())
    per_type_mb = statistics.fmean(run["checkpoint_mb"] for runs in report["per_type"].values() for run in runs)
    lines = [f"- Training, sum of the per-type models: {per_type_s:.0f} s (mean over seeds)."]
    for arm in ARMS:
        runs = [run for run in report[arm] if "train_s" in run]
        if runs:
            seconds = statistics.fmean(run["train_s"] for run in runs)
            megabytes = statistics.fmean(run["checkpoint_mb"] for run in runs)
            lines.append(
                f"- {arm}: training {seconds:.0f} s ({seconds / per_type_s:.2f}x the sum); checkpoint {megabytes:.1f} "
                f"MiB ({megabytes / per_type_mb:.2f}x a per-type model's {per_type_mb:.1f} MiB)."
            )
    unified = [run for run in report["unified"] if "ir_mb" in run]
    if unified:
        sizes = unified[0]["ir_mb"]
        lines.append(
            f"- IR: unified {sizes['unified']:.1f} MiB, single type {sizes['single type']:.1f} MiB "
            f"({sizes['unified'] / sizes['single type']:.2f}x)."
        )
        shares = {name: statistics.fmean(run["recognized"][name] for run in unified) for name in report["types"]}
        lines.append("- Test images whose type was recognized: " + ", ".join(f"{n} {s:.3f}" for n, s in shares.items()))
    return lines + timing_lines(report.get("timing"))


def timing_lines(timing: dict[str, Any] | None) -> list[str]:
    """The unified IR's OpenVINO latency against the single-type IR's, per batch size, as markdown lines."""
    lines = []
    for result in (timing or {}).get("results", []):
        entry = result["summary"]["unified"]
        lines.append(
            f"- OpenVINO f32 batch {result['batch']}: unified {entry['ms_per_image']:.1f} ms per image, "
            f"{entry.get('vs_reference', float('nan')):.2f}x the single-type model (median of per-round ratios)."
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Train the arms, or report them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["train", "report", "novelty", "time"])
    parser.add_argument("--job", help="time: the unified job (its spec key) whose IRs to time")
    parser.add_argument("--single-ir", type=Path, help="time: a trained single-type IR (dynamic batch) to time against")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_REALDEV_ROOT, help="MVTec-AD-layout real categories")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the per-type models")
    parser.add_argument("--unified-seeds", type=int, nargs="+", default=[0], help="seeds of the unified and union")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30, help="OpenVINO timing rounds")
    parser.add_argument("--reuse-source", help="take per-type jobs of this earlier source hash from the job cache")
    parser.add_argument("--types", nargs="+", help="only these part types (e.g. screw demo/brick)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="one model on all types")
    parser.add_argument("--quick", action="store_true", help="the three demo textures only, 1 epoch, 1 seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.unified_seeds = 1, [0], [0]
    elif not args.data_root.is_dir() and args.command == "train":
        parser.error(
            f"--data-root {args.data_root} does not exist: give a folder of real categories in MVTec AD layout "
            "(<root>/<category>/train/good, test/<defect>, ground_truth/<defect>), or run --quick on the demo alone."
        )
    if args.command == "time":  # a unified job's IRs against a trained single-type IR, side by side
        unified = json.loads((JOB_DIR / f"{args.job}.json").read_text())
        irs = {
            "unified": unified["irs"]["unified"],
            "single type": {"1": str(args.single_ir), "8": str(args.single_ir)},
        }
        timing_args = argparse.Namespace(repeats=args.repeats, warmup=3, threads=args.threads)
        configs = [{"precision": "f32", "batch": batch} for batch in (1, 8)]
        timing = deploy_speed.time_irs(irs, configs, timing_args, "unified_time", reference="single type")
        sizes = {name: Path(by_batch["1"]).with_suffix(".bin").stat().st_size / 2**20 for name, by_batch in irs.items()}
        write_json(OUT_DIR / "unified_time.json", {"job": args.job, "ir_mb": sizes, "timing": timing})
        print("\n".join(timing_lines(timing)))
        print(f"- IR: unified {sizes['unified']:.1f} MiB, single type {sizes['single type']:.1f} MiB.")
        return
    if args.command == "novelty":
        study = novelty_study(args)
        write_json(OUT_DIR / "unified_novelty.json", study)
        print("| type | good, max | good, 95th pct | anomalous, max | left out: min | left out: median |")
        print("|---|---|---|---|---|---|")
        for name, row in study.items():
            print(f"| {name} | " + " | ".join(f"{value:.1f}" for value in row.values()) + " |")
        return
    report = train(args) if args.command == "train" else json.loads(REPORT.read_text())
    print(markdown(report))


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "job":
        serve({"job": unified_job})
    else:
        main()
