"""Exported models give the same answers as the torch model they came from; INT8 keeps its accuracy.

The model is exported to ONNX once (``Engine.export``, the module's ``onnx_path``); the OpenVINO exports reuse
that file (``to_openvino`` is ``to_onnx``, then ``openvino.convert_model``, compression and saving) so that the
module stays within CI's time.
"""

import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.data.utils import read_image, read_mask
from anomalib.deploy import CompressionType, ExportType, OpenVINOInferencer, TorchInferencer
from anomalib.metrics import AUPRO, AUROC, F1Score
from torch.nn import functional as F  # noqa: N812

from anomalib_cflow_plus.calibration import calibrate
from anomalib_cflow_plus.quantization import decoder_weights, fp32_tail_names, graph_regions

from ..helpers import tiny_datamodule

pytestmark = pytest.mark.slow

# This CPU runs FP32 models in bf16 unless told otherwise; parity is measured at full precision.
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
INPUT_SIZE = (128, 128)  # the tiny dataset's image size
LOOP_OPS = {"Loop", "Scan", "TensorIterator"}


@pytest.fixture(scope="module")
def model(trained_run):
    return trained_run.model.eval()


@pytest.fixture(scope="module")
def datamodule(tiny_dataset):
    """A datamodule that has served no model: its images keep their size, the export's ``input_size``."""
    return tiny_datamodule(tiny_dataset)


@pytest.fixture(scope="module")
def test_images(tiny_dataset):
    return sorted((tiny_dataset / "brick" / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def images(test_images):
    return [read_image(path, as_tensor=True)[None] for path in test_images]


@pytest.fixture(scope="module")
def masks(tiny_dataset, test_images):
    """Ground-truth masks ``(1, H, W)`` (zeros for good images)."""
    result = []
    for path in test_images:
        if path.parent.name == "good":
            result.append(torch.zeros(1, *INPUT_SIZE, dtype=torch.bool))
        else:
            mask_path = tiny_dataset / "brick" / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
            result.append(read_mask(mask_path, as_tensor=True)[None].bool())
    return result


@pytest.fixture(scope="module")
def torch_predictions(model, images):
    with torch.no_grad():
        return [model(image) for image in images]


@pytest.fixture(scope="module")
def onnx_path(trained_run, model, tmp_path_factory):
    """``Engine.export`` to ONNX; fails on tracer warnings (loops a tracer unrolled) or any warning about loops."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = trained_run.engine.export(
            model, ExportType.ONNX, export_root=tmp_path_factory.mktemp("onnx"), input_size=INPUT_SIZE
        )
    loops = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) or "loop" in str(w.message).lower()]
    assert not loops, [str(w.message) for w in loops]
    return path


@pytest.fixture
def reuse_onnx_export(model, onnx_path, monkeypatch):
    """Make ``model.to_onnx`` return the module's ONNX export (same model, same input size) instead of exporting."""
    monkeypatch.setitem(model.__dict__, "to_onnx", lambda *args, **kwargs: onnx_path)


def scope_of(node) -> str:
    """The torch module scopes that an exported ONNX node came from, e.g. ``"model.decoders.0.module_list.1..."``."""
    return {prop.key: prop.value for prop in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")


def ops_per_decoder(graph, op_types=frozenset({"Gemm", "MatMul"})):
    """Number of ``op_types`` nodes of an exported ONNX graph per module scope ``model.decoders.<i>``, or None."""
    counts = Counter()
    for node in graph.node:
        if node.op_type in op_types:
            decoder = re.search(r"model\.decoders\.\d+", scope_of(node))
            counts[decoder.group() if decoder else None] += 1
    return counts


def assert_matches_torch(predict, images, torch_predictions):
    """Scores within 1e-4, maps within 1e-3, labels identical (off the threshold's own tie), both labels seen.

    ``predict(image (1, 3, H, W) tensor) -> (pred_score, pred_label, anomaly_map)`` as numpy arrays.
    """
    labels = []
    for index, (image, expected) in enumerate(zip(images, torch_predictions, strict=True)):
        score, label, anomaly_map = predict(image)
        assert abs(float(score.flatten()[0]) - float(expected.pred_score[0])) <= 1e-4, index
        assert np.abs(anomaly_map.squeeze() - expected.anomaly_map[0].squeeze().numpy()).max() <= 1e-3, index
        # anomalib's adaptive threshold sits exactly on one validation image's score (normalized to 0.5); that
        # image's label is a tie that float rounding may break either way, so labels are compared off the tie.
        if abs(float(expected.pred_score[0]) - 0.5) > 1e-4:
            assert bool(label.flatten()[0]) == bool(expected.pred_label[0]), index
        labels.append(bool(label.flatten()[0]))
    assert any(labels) and not all(labels), "the comparison should cover both normal and anomalous predictions"


def test_onnx_export_runs_in_onnxruntime_like_torch(model, onnx_path, images, torch_predictions):
    graph = onnx.load(onnx_path).graph
    assert [value.name for value in graph.input] == ["input"]
    assert [value.name for value in graph.output] == ["pred_score", "pred_label", "anomaly_map", "pred_mask"]
    assert not {node.op_type for node in graph.node} & LOOP_OPS, "a loop was exported"
    # One call per decoder: at 256 px the first decoder gets 16x the fibers of the last, and the same number of
    # matmuls. A loop over fiber chunks, unrolled by the exporter, would repeat the first decoder's more often.
    per_decoder = ops_per_decoder(graph)
    decoders = {f"model.decoders.{index}" for index in range(len(model.model.decoders))}
    assert set(per_decoder) == decoders | {None}
    assert len({per_decoder[decoder] for decoder in decoders}) == 1, per_decoder
    # The map's upsampling and smoothing: one product per layer, and one for all layers (the OpenVINO test checks
    # that no resize or smoothing pass is left once the constant matrices are folded).
    assert per_decoder[None] == len(decoders) + 1
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]

    def predict(image):
        outputs = dict(zip(names, session.run(None, {"input": image.numpy()}), strict=True))
        return outputs["pred_score"], outputs["pred_label"], outputs["anomaly_map"]

    assert_matches_torch(predict, images, torch_predictions)
    batch = torch.cat(images[:3])  # the batch size is dynamic, and one image's answer does not depend on the others
    scores = session.run(["pred_score"], {"input": batch.numpy()})[0]
    np.testing.assert_allclose(scores, [float(p.pred_score[0]) for p in torch_predictions[:3]], atol=1e-4)


@pytest.mark.usefixtures("reuse_onnx_export")
def test_openvino_export_matches_torch(model, trained_run, images, torch_predictions, tmp_path):
    path = trained_run.engine.export(model, ExportType.OPENVINO, export_root=tmp_path, input_size=INPUT_SIZE)
    operations = {op.get_type_name() for op in ov.Core().read_model(path).get_ops()}
    assert not operations & LOOP_OPS, "a loop was exported"
    # The IR holds the weights and little else: no positional condition folded into a (h*w, hidden) constant.
    weight_bytes = sum(parameter.numel() * parameter.element_size() for parameter in model.model.parameters())
    assert Path(path).with_suffix(".bin").stat().st_size <= 1.02 * weight_bytes
    ir = ov.Core().read_model(path)
    regions = graph_regions(ir, decoder_weights(model.model.decoders))
    types = {
        region: Counter(
            op.get_type_name() for op in ir.get_ops() if op.get_friendly_name() in set(getattr(regions, region))
        )
        for region in ("flows", "tail")
    }
    # The map: matrix products, no resize, no smoothing convolution, no per-pixel Select.
    assert not types["tail"].keys() & {"Interpolate", "Convolution", "GroupConvolution", "Select"}, types["tail"]
    # The permutations: one Gather along the channels per inner coupling, none after the last, no transposes.
    inner_couplings = len(model.model.decoders) * (model.model.coupling_blocks - 1)
    assert types["flows"]["Gather"] == inner_couplings, types["flows"]
    assert not types["flows"].keys() & {"GatherND", "Transpose", "ScatterNDUpdate"}, types["flows"]
    inferencer = OpenVINOInferencer(path=path, device="CPU", config=F32)

    def predict(image):
        prediction = inferencer.predict(image[0])
        return prediction.pred_score, prediction.pred_label, prediction.anomaly_map

    assert_matches_torch(predict, images, torch_predictions)


def test_torch_export_matches_torch(model, trained_run, test_images, torch_predictions, tmp_path, monkeypatch):
    path = trained_run.engine.export(model, ExportType.TORCH, export_root=tmp_path)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib's opt-in to unpickle a whole exported model
    inferencer = TorchInferencer(path=path, device="cpu")
    # Every fourth image (good ones and each defect kind): eager inference is slow on a busy 2-core machine.
    for image_path, expected in list(zip(test_images, torch_predictions, strict=True))[::4]:
        actual = inferencer.predict(image_path)
        torch.testing.assert_close(actual.pred_score.flatten(), expected.pred_score.flatten(), atol=1e-6, rtol=0)
        assert bool(actual.pred_label.flatten()[0]) == bool(expected.pred_label.flatten()[0])


def metrics(scores, labels, maps, masks):
    """Image AUROC, image F1 and AUPRO of per-image ``scores``, ``labels`` and ``maps`` against ``masks``."""
    image_auroc, image_f1 = AUROC(fields=["pred_score", "gt_label"]), F1Score(fields=["pred_label", "gt_label"])
    aupro = AUPRO(fields=["anomaly_map", "gt_mask"], strict=False)
    for score, label, anomaly_map, mask in zip(scores, labels, maps, masks, strict=True):
        anomaly_map = torch.as_tensor(anomaly_map).reshape(1, 1, *anomaly_map.shape[-2:])
        gt_mask = F.interpolate(mask[None].float(), size=anomaly_map.shape[-2:], mode="nearest")[0].bool()
        batch = ImageBatch(
            image=torch.zeros(1, 3, *anomaly_map.shape[-2:]),
            gt_label=gt_mask.flatten(1).any(dim=1),
            gt_mask=gt_mask,
            pred_score=torch.as_tensor(score).reshape(1),
            pred_label=torch.as_tensor(label).reshape(1).bool(),
            anomaly_map=anomaly_map,
        )
        for metric in (image_auroc, image_f1, aupro):
            metric.update(batch)
    return {
        "image_auroc": float(image_auroc.compute()),
        "image_f1": float(image_f1.compute()),
        "aupro": float(aupro.compute()),
    }


def torch_metrics(torch_predictions, masks):
    return metrics(
        [p.pred_score for p in torch_predictions],
        [p.pred_label for p in torch_predictions],
        [p.anomaly_map for p in torch_predictions],
        masks,
    )


def openvino_metrics(model, images, masks):
    compiled = ov.Core().compile_model(model, "CPU", F32)
    outputs = [compiled(image.numpy()) for image in images]
    scores = [output["pred_score"] for output in outputs]
    assert np.std(np.concatenate(scores)) > 0.05, "scores collapsed to a constant"
    labels = [output["pred_label"] for output in outputs]
    return metrics(scores, labels, [output["anomaly_map"] for output in outputs], masks)


def quantizers(model):
    return {op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "FakeQuantize"}


@pytest.mark.usefixtures("reuse_onnx_export")
def test_int8_ptq_keeps_accuracy_with_the_scoring_tail_in_fp32(
    model, trained_run, datamodule, images, masks, torch_predictions, tmp_path
):
    path = trained_run.engine.export(
        model,
        ExportType.OPENVINO,
        export_root=tmp_path,
        input_size=INPUT_SIZE,
        compression_type=CompressionType.INT8_PTQ,
        datamodule=datamodule,
    )
    quantized = ov.Core().read_model(path)
    assert len(quantizers(quantized)) >= 20, "the encoder and the flows should be quantized"
    assert not quantizers(quantized) & set(fp32_tail_names(quantized)), "a quantizer sits in the scoring tail"
    fp32, int8 = torch_metrics(torch_predictions, masks), openvino_metrics(quantized, images, masks)
    assert int8["image_auroc"] >= fp32["image_auroc"] - 0.01, (int8, fp32)
    assert int8["aupro"] >= fp32["aupro"] - 0.02, (int8, fp32)


def test_int8_acq_stays_within_max_drop(model, datamodule, onnx_path, images, masks, torch_predictions):
    # By name, as ``anomalib export ... --compression_type INT8_ACQ --metric AUROC`` passes it.
    quantized = model._accuracy_control_quantization_ov(ov.convert_model(onnx_path), datamodule, "AUROC", max_drop=0.01)
    assert quantizers(quantized), "the accuracy control gave up on INT8 altogether"
    assert not quantizers(quantized) & set(fp32_tail_names(quantized)), "a quantizer sits in the scoring tail"
    fp32, int8 = torch_metrics(torch_predictions, masks), openvino_metrics(quantized, images, masks)
    # The tiny dataset's validation split is its test split: the control's own criterion, recomputed here.
    assert int8["image_auroc"] >= fp32["image_auroc"] - 0.01, (int8, fp32)
    assert int8["aupro"] >= fp32["aupro"] - 0.02, (int8, fp32)


def test_int8_regions_hold_for_an_encoder_with_linear_layers(tmp_path: Path) -> None:
    """timm's test_convnext has MLPs of nn.Linear, MatMuls in the graph as the flows' are: they stay the encoder's."""
    from torch import nn

    from anomalib_cflow_plus import CflowPlus

    model = CflowPlus(
        backbone="test_convnext", pre_trained=False, coupling_blocks=1, condition_vector=16,
        pre_processor=CflowPlus.configure_pre_processor((64, 64)), visualizer=False, image_calibration="layer",
    )  # fmt: skip
    encoder_linears = sum(isinstance(module, nn.Linear) for module in model.model.encoder.modules())
    flow_linears = sum(isinstance(module, nn.Linear) for module in model.model.decoders.modules())
    assert encoder_linears > 0
    calibrate(model.model, [model.pre_processor.transform(torch.rand(2, 3, 64, 64))], torch.device("cpu"))
    exported = ov.Core().read_model(model.to_openvino(export_root=tmp_path, input_size=(64, 64)))
    types = {op.get_friendly_name(): op.get_type_name() for op in exported.get_ops()}
    regions = graph_regions(exported, decoder_weights(model.model.decoders))
    matmuls = {
        region: sum(types[name] == "MatMul" for name in getattr(regions, region))
        for region in ("encoder", "flows", "tail")
    }
    assert matmuls["encoder"] == encoder_linears
    assert 0 < matmuls["flows"] <= flow_linears  # the condition's projections are folded into constants
    assert matmuls["tail"] == len(model.model.decoders) + 1  # the map's upsampling and smoothing
    assert set(regions.tail) == set(fp32_tail_names(exported, decoder_weights(model.model.decoders)))


def test_a_position_calibrated_image_score_exports_like_torch(tmp_path: Path) -> None:
    """The per-position statistics are buffers: OpenVINO scores an image as torch does (f32), maps included."""
    from anomalib_cflow_plus import CflowPlus

    torch.manual_seed(0)
    model = CflowPlus(
        backbone="efficientnet_lite0", pre_trained=False, coupling_blocks=1, condition_vector=16,
        pre_processor=CflowPlus.configure_pre_processor((64, 64)), post_processor=False, visualizer=False,
        image_calibration="position",
    ).eval()  # fmt: skip
    training = [model.pre_processor.transform(torch.rand(4, 3, 64, 64)) for _ in range(2)]
    calibrate(model.model, training, torch.device("cpu"))
    assert model.model.anomaly_map.position_calibrated
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        layer_scores = model.model.anomaly_map.scores_of(
            model.model.anomaly_map.layer_scores(model.model.image_log_likelihood_maps(model.pre_processor(images))),
            expected.anomaly_map,
            "paper",
        )
    assert (layer_scores - expected.pred_score).abs().min() > 1e-2  # the position statistics change the scores
    path = model.to_openvino(export_root=tmp_path, input_size=(64, 64))
    outputs = ov.Core().compile_model(ov.Core().read_model(path), "CPU", F32)(images.numpy())
    np.testing.assert_allclose(outputs["pred_score"], expected.pred_score.numpy(), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(outputs["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)


def test_a_neighbourhood_model_exports_like_torch(tmp_path: Path) -> None:
    """The 3x3 average before the flows (an AveragePool without padding in the count) scores in OpenVINO as in torch."""
    from anomalib_cflow_plus import CflowPlus

    torch.manual_seed(0)
    model = CflowPlus(
        backbone="efficientnet_lite0", pre_trained=False, coupling_blocks=1, condition_vector=16, neighbourhood=3,
        pre_processor=CflowPlus.configure_pre_processor((64, 64)), post_processor=False, visualizer=False,
    ).eval()  # fmt: skip
    training = [model.pre_processor.transform(torch.rand(4, 3, 64, 64)) for _ in range(2)]
    model.model.initialize_normalization(model.model.encode(training[0]))
    with torch.no_grad():  # non-trivial decoders, as after training
        for parameter in model.model.decoders.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    calibrate(model.model, training, torch.device("cpu"))
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
    path = model.to_openvino(export_root=tmp_path, input_size=(64, 64))
    ov_model = ov.Core().read_model(path)
    assert any(op.get_type_name() == "AvgPool" for op in ov_model.get_ops())
    outputs = ov.Core().compile_model(ov_model, "CPU", F32)(images.numpy())
    np.testing.assert_allclose(outputs["pred_score"], expected.pred_score.numpy(), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(outputs["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)
