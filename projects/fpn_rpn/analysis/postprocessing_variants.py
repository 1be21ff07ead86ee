"""Several post-processings of one trained RPN from one network pass per image.

NMS mode, NMS threshold, top-K, score threshold and min size act after the RPN head, so
variants of one set of weights differ only there. :func:`run_postprocessing_variants`
runs the backbone and head once per image and gives the head outputs to the
``predict_proposals`` of one proposal generator per variant, each built from the
variant's config: what each variant returns is exactly what the model built from its
config returns (tests check this). Running the head once matters because the backbone
and head are most of an inference pass: the selection after them is a small share
(docs/study_cross_level_nms.md#cost).

The head outputs are the arguments that the generator's own ``forward`` (Detectron2's
``RPN.forward``, or ``CascadeRPN.forward`` with its stage-1 boxes) hands to
``predict_proposals``, the hook a subclass overrides: the model's generator is rebuilt as
a subclass (:func:`head_outputs_generator`) whose ``predict_proposals`` keeps them
instead of selecting proposals.

Near-duplicates of the variants: :mod:`fpn_rpn.evaluation.duplicates`.
"""
import functools
import time
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch import ProposalNetwork
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.structures import Instances
from tqdm import tqdm

from ..engine.checkpoint import CheckedCheckpointer
from ..errors import ConfigError

__all__ = [
    "POSTPROCESSING_KEYS",
    "head_outputs_generator",
    "network_key",
    "proposals_of",
    "run_postprocessing_variants",
]

# The config keys that act after the RPN head at inference.
POSTPROCESSING_KEYS = (
    "MODEL.FPN_RPN.NMS_MODE",
    "MODEL.FPN_RPN.SCORE_THRESH_TEST",
    "MODEL.RPN.NMS_THRESH",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "MODEL.PROPOSAL_GENERATOR.MIN_SIZE",
)


def network_key(cfg) -> str:
    """The config with the post-processing keys blanked: equal keys mean one network."""
    cfg = cfg.clone()
    cfg.defrost()
    for key in POSTPROCESSING_KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            node = node.get(name)
            if node is None:
                break
        else:
            node.pop(leaf, None)
    return cfg.dump()


def proposals_of(instances: Instances) -> Dict[str, np.ndarray]:
    """An image's proposals as arrays: "boxes" (R, 4) float32 XYXY and "scores" (R,) float32."""
    instances = instances.to("cpu")
    return {
        "boxes": instances.proposal_boxes.tensor.detach().float().numpy(),
        "scores": instances.objectness_logits.detach().float().numpy(),
    }


def _load_model(cfg, random_init: bool):
    """
    The model of ``cfg`` in eval mode. Its weights are loaded as ``train_net.py
    --eval-only`` loads them: every parameter must be in the file
    (:class:`CheckedCheckpointer`), so an untrained model is never evaluated by mistake.
    ``random_init`` keeps Detectron2's random initialisation (seed 0) instead, for a
    deliberate untrained baseline. Any meta-architecture with ``preprocess_image``,
    ``backbone`` and ``proposal_generator`` (ProposalNetwork, GeneralizedRCNN) is run up
    to its proposals.
    """
    torch.manual_seed(0)  # the initialisation random_init keeps
    model = build_model(cfg)
    model.eval()
    if not isinstance(model, ProposalNetwork) and not all(
        hasattr(model, a) for a in ("preprocess_image", "backbone", "proposal_generator")
    ):
        raise ConfigError(
            f"{type(model).__name__} has no proposal generator to run "
            "(expected a ProposalNetwork or a GeneralizedRCNN-like model)"
        )
    if not random_init:
        # only the parts that make proposals need weights (a detector's box head may lack them)
        used = torch.nn.Module()
        used.backbone, used.proposal_generator = model.backbone, model.proposal_generator
        CheckedCheckpointer(used, require_all=True).load(cfg.MODEL.WEIGHTS)
    return model


class _KeepsHeadOutputs:
    """Mixin for a proposal generator class: ``predict_proposals`` keeps its arguments in
    ``head_outputs`` and returns no proposals (a ProposalNetwork then returns none)."""

    def predict_proposals(self, *args):
        self.head_outputs = args
        return []


@functools.lru_cache(maxsize=None)
def _keeps_head_outputs(generator_class: type) -> type:
    return type(f"{generator_class.__name__}HeadOutputs", (_KeepsHeadOutputs, generator_class), {})


def head_outputs_generator(generator, cfg, input_shape):
    """
    A copy of ``generator`` (a proposal generator built from ``cfg``, of any class: its
    weights are loaded) as a subclass of its class whose ``predict_proposals`` keeps its
    arguments (anchors or stage-1 boxes, objectness logits, anchor deltas, image sizes) in
    ``head_outputs`` instead of selecting proposals.
    """
    copy = _keeps_head_outputs(type(generator))(cfg, input_shape)  # @configurable: from_config(cfg, ...)
    copy.load_state_dict(generator.state_dict())
    return copy.to(next(generator.parameters()).device).train(generator.training)


def _head_outputs(model, inputs) -> tuple:
    """The head outputs (see :func:`head_outputs_generator`) of ``model`` for ``inputs``."""
    if isinstance(model, ProposalNetwork):
        model(inputs)  # its forward preprocesses (v0.6's has no preprocess_image)
    else:
        images = model.preprocess_image(inputs)
        model.proposal_generator(images, model.backbone(images.tensor), None)
    return model.proposal_generator.head_outputs


def run_postprocessing_variants(
    cfgs: Sequence, dataset_dicts: Sequence[dict], progress: bool = False, random_init: bool = False
) -> List[Tuple[Dict[Any, Dict[str, np.ndarray]], float]]:
    """
    Proposals of every config of ``cfgs`` (one network, one set of weights: equal
    :func:`network_key` and ``MODEL.WEIGHTS``) for each image.

    Returns:
        for each config: image_id -> {"boxes", "scores"} in original image coordinates,
        and seconds per image (the shared network pass plus the variant's post-processing).
    """
    cfgs = list(cfgs)
    keys = {(network_key(cfg), cfg.MODEL.WEIGHTS) for cfg in cfgs}
    if len(keys) != 1:
        raise ValueError("post-processing variants must share the network config and weights")
    model = _load_model(cfgs[0], random_init)
    shapes = model.backbone.output_shape()
    generators = []
    for cfg in cfgs:
        generator = build_proposal_generator(cfg, shapes).to(model.device).eval()
        generator.load_state_dict(model.proposal_generator.state_dict())
        generators.append(generator)
    # the model's own generator, with its weights, now hands over the head outputs
    model.proposal_generator = head_outputs_generator(model.proposal_generator, cfgs[0], shapes)
    mapper = DatasetMapper(cfgs[0], is_train=False)
    proposals = [{} for _ in cfgs]
    seconds = np.zeros(len(cfgs))
    for record in (tqdm(dataset_dicts, desc="proposals", unit="img", disable=not progress)):
        inputs = [mapper(record)]
        start = time.perf_counter()
        with torch.no_grad():
            args = _head_outputs(model, inputs)
        seconds += time.perf_counter() - start
        for v, generator in enumerate(generators):
            start = time.perf_counter()
            with torch.no_grad():
                found = generator.predict_proposals(*args)[0]
                instances = detector_postprocess(found, inputs[0]["height"], inputs[0]["width"])
            seconds[v] += time.perf_counter() - start
            proposals[v][record["image_id"]] = proposals_of(instances)
    seconds /= max(len(dataset_dicts), 1)
    return [(proposals[v], float(seconds[v])) for v in range(len(cfgs))]
