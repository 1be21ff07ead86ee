"""Export of fpn_rpn models to TorchScript (tracing or scripting) and ONNX, with Detectron2's
own export pieces (``TracingAdapter``, ``scripting_with_instances``, ``dump_torchscript_IR``),
as Detectron2's ``tools/deploy/export_model.py`` does; ``tools/export_model.py`` is its
command line.

- Tracing (TorchScript or ONNX) works for ProposalNetwork and GeneralizedRCNN with
  fpn_rpn's components, FPNRPN and CascadeRPN. The traced graph follows the input's size:
  inputs and outputs are flattened by ``TracingAdapter``, whose ``outputs_schema`` turns
  the outputs back into Instances. The batch size (one image) is fixed, as in Detectron2.
- Scripting works for ProposalNetwork with FPNRPN, through
  :class:`ScriptableProposalNetwork` (ProposalNetwork's ``forward`` takes untyped dicts).

fpn_rpn's modules take their plain code paths under ``torch.jit.trace`` and
``torch.jit.script`` (no custom head backward, no ``.tolist()``, sizes from
the graph); the proposals are those of eager mode.
"""
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from .compat import detectron2_export

__all__ = [
    "EXPORT_FORMATS", "EXPORT_METHODS", "ONNX_OPSET", "ScriptableProposalNetwork",
    "export_model", "proposals_of", "run_exported", "sample_image",
]

EXPORT_FORMATS = ("torchscript", "onnx")
EXPORT_METHODS = ("tracing", "scripting")
# GridSample (Cascade RPN's adaptive convolution) needs opset 16; FPNRPN alone exports at 11
ONNX_OPSET = 16


class ScriptableProposalNetwork(nn.Module):
    """
    A ProposalNetwork's inference on one image, in a form ``torch.jit.script`` compiles
    (ProposalNetwork's own ``forward`` takes untyped dicts, which it does not): the same
    normalisation, padding, backbone and proposal generator. Its output is the proposals
    ProposalNetwork returns for an input without "height" and "width" (no rescaling).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.proposal_generator = model.proposal_generator
        self.register_buffer("pixel_mean", model.pixel_mean, persistent=False)
        self.register_buffer("pixel_std", model.pixel_std, persistent=False)
        self.size_divisibility: int = model.backbone.size_divisibility

    def forward(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """image: (C, H, W) in the model's input format. Returns proposal_boxes (R, 4), objectness_logits (R,)."""
        images = ImageList.from_tensors([(image - self.pixel_mean) / self.pixel_std], self.size_divisibility)
        features = self.backbone(images.tensor)
        proposals, _ = self.proposal_generator(images, features, None)
        return {"proposal_boxes": proposals[0].proposal_boxes.tensor,
                "objectness_logits": proposals[0].objectness_logits}


def sample_image(cfg, path: Optional[str] = None, size: Tuple[int, int] = (480, 640), seed: int = 0) -> torch.Tensor:
    """
    The model's input (C, H, W) for one image, resized as at test time
    (``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``, as Detectron2's export tool does
    with ``--sample-image``): the image file at ``path``, or, with no path, a random
    ``size`` (H, W) image drawn with ``seed``.
    """
    from detectron2.data.detection_utils import read_image

    if path is not None:
        image = read_image(path, format=cfg.INPUT.FORMAT)
    else:
        image = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(image.astype("float32").transpose(2, 0, 1)))


def _tracing_adapter(model: nn.Module, image: torch.Tensor):
    from detectron2.modeling import GeneralizedRCNN

    inference = None  # ProposalNetwork: the model itself
    if isinstance(model, GeneralizedRCNN):
        def inference(model, inputs):
            # do_postprocess=False, as Detectron2's export tool: the graph returns the network's outputs
            return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]
    # eval() too: torch.onnx.export restores the adapter's mode afterwards, which a new module has as training
    return detectron2_export().TracingAdapter(model, [{"image": image}], inference).eval()


def export_model(model: nn.Module, image: torch.Tensor, output_dir: str, fmt: str = "torchscript",
                 method: str = "tracing"):
    """
    Export ``model`` (in eval mode) into ``output_dir``: ``model.ts`` (TorchScript, with
    its IR dumped beside it by ``dump_torchscript_IR``) or ``model.onnx``. ``image`` (C, H, W)
    is the sample input that tracing runs; any other size works with the exported model.

    Returns:
        (path of the file, the TracingAdapter for tracing or None): the adapter's
        ``outputs_schema`` turns a traced model's outputs back into Instances.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    if method not in EXPORT_METHODS:
        raise ValueError(f"export method must be one of {EXPORT_METHODS}, got {method!r}")
    if fmt == "onnx" and method != "tracing":
        raise ValueError("ONNX export traces the model: use the export method 'tracing'")
    export = detectron2_export()
    model.eval()
    os.makedirs(output_dir, exist_ok=True)
    if method == "scripting":
        adapter = None
        exported = export.scripting_with_instances(
            ScriptableProposalNetwork(model).eval(), {"proposal_boxes": Boxes, "objectness_logits": torch.Tensor}
        )
    else:
        adapter = _tracing_adapter(model, image)
        if fmt == "onnx":
            path = os.path.join(output_dir, "model.onnx")
            torch.onnx.export(adapter, (image,), path, opset_version=ONNX_OPSET, dynamo=False,
                              input_names=["image"], dynamic_axes={"image": {1: "height", 2: "width"}})
            return path, adapter
        exported = torch.jit.trace(adapter, (image,))
    path = os.path.join(output_dir, "model.ts")
    torch.jit.save(exported, path)
    export.dump_torchscript_IR(exported, output_dir)
    return path, adapter


def run_exported(path: str, image: torch.Tensor, adapter=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Proposals (boxes (R, 4), objectness logits (R,)) of the exported model at ``path`` for
    ``image`` (C, H, W); ``adapter``: what :func:`export_model` returned for a traced one.
    ONNX models run in ONNX Runtime on CPU.
    """
    if path.endswith(".onnx"):
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        outputs = session.run(None, {session.get_inputs()[0].name: image.cpu().numpy()})
        outputs = [torch.from_numpy(o) for o in outputs]
    else:
        module = torch.jit.load(path, map_location=image.device)
        with torch.no_grad():
            outputs = module(image)
        if adapter is None:  # scripted: ScriptableProposalNetwork's dict
            return outputs["proposal_boxes"], outputs["objectness_logits"]
    return proposals_of(adapter.outputs_schema(outputs))


def proposals_of(outputs: List[Dict[str, Instances]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Boxes and scores of the first image of a model's outputs (ProposalNetwork or GeneralizedRCNN)."""
    if "proposals" in outputs[0]:
        instances = outputs[0]["proposals"]
        return instances.proposal_boxes.tensor, instances.objectness_logits
    instances = outputs[0]["instances"]
    return instances.pred_boxes.tensor, instances.scores
