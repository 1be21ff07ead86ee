"""DatasetEvaluator reporting the proposal recall of a ProposalNetwork."""
import contextlib
import copy
import io
import itertools
import logging
import os
from typing import Sequence

import numpy as np
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict, convert_to_coco_json
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from pycocotools.coco import COCO

from ..data.categories import category_groups as parse_category_groups
from ..data.categories import check_coco_categories
from ..data.proposal_files import write_proposal_file
from .duplicates import duplicates_per_image
from .proposal_recall import DEFAULT_BUDGETS, check_budgets, evaluate_recall, format_recall_table, gt_from_coco

__all__ = ["ProposalRecallEvaluator", "load_coco_ground_truth"]


class ProposalRecallEvaluator(DatasetEvaluator):
    """
    Class-agnostic AR of proposals at several budgets, IoU 0.50:0.05:0.95, areas
    all/small/medium/large, under both definitions of :mod:`fpn_rpn.evaluation.proposal_recall`:
    "d2" (Detectron2's COCOEvaluator, which skips images without proposals) and
    "coco" (COCOeval with ``useCats = 0``). Results are fractions, grouped as
    ``{"recall_d2": {"AR@100": ..., "AR_s@100": ...}, "recall_coco": {...}}``;
    COCOEvaluator's "box_proposals" reports the d2 AR@100/1000 in percent.

    Ground truth is the dataset's COCO json (metadata ``json_file``), or Detectron2's
    conversion of the registered dicts to COCO format, as COCOEvaluator does.

    It also reports near-duplicates (:mod:`fpn_rpn.evaluation.duplicates`): pairs among
    each image's top ``max(budgets)`` proposals with IoU above ``duplicate_iou``, as
    ``{"duplicates": {"pairs/img": mean, "max/img": ..., "images": images with any}}``.
    At the RPN's NMS threshold these are the pairs from different levels that per-level
    NMS keeps.

    With ``category_groups`` it also reports the AR of each group of categories, with
    only the group's boxes as ground truth and every proposal a candidate, as
    ``"recall_d2/<name>"`` and ``"recall_coco/<name>"`` (same metric names).

    In a trainer: ``ProposalRecallEvaluator(cfg, dataset_name, output_dir=...)`` takes
    the budgets from ``cfg.TEST.RECALL_BUDGETS``, the groups from
    ``cfg.TEST.RECALL_CATEGORY_GROUPS`` and ``duplicate_iou`` from ``cfg.MODEL.RPN.NMS_THRESH``.
    """

    @configurable
    def __init__(
        self,
        dataset_name: str,
        *,
        budgets: Sequence[int] = DEFAULT_BUDGETS,
        category_groups: Sequence = (),
        duplicate_iou: float = 0.7,
        distributed: bool = True,
        output_dir: str = None,
        save_proposals: bool = False,
    ):
        """
        Args:
            dataset_name: a registered dataset with COCO-format ground truth.
            budgets: proposals per image at which AR is reported.
            category_groups: [name, category spec] pairs (:mod:`fpn_rpn.data.categories`),
                e.g. ``[("seen", "voc"), ("novel", "nonvoc")]``; the dataset must number
                its categories as COCO does.
            duplicate_iou: IoU above which two proposals of an image are near-duplicates
                (Detectron2's default NMS threshold).
            distributed: gather the proposals of all processes and evaluate on the
                main one; otherwise evaluate what this process saw.
            output_dir: where ``box_proposals.pkl`` and, for datasets without a
                ``json_file``, the converted COCO json are written.
            save_proposals: write every proposal to ``output_dir/box_proposals.pkl``
                in Detectron2's precomputed-proposal format (``DATASETS.PROPOSAL_FILES_*``).
                Without it only the top ``max(budgets)`` of each image are kept.
        """
        self._budgets = check_budgets(budgets)
        self._category_groups = parse_category_groups(category_groups, "category_groups")
        self._duplicate_iou = duplicate_iou
        if save_proposals and not output_dir:
            raise ValueError("save_proposals=True needs an output_dir to write box_proposals.pkl")
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._save_proposals = save_proposals
        self._logger = logging.getLogger(__name__)
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name, *, distributed=True, output_dir=None, save_proposals=False):
        return {
            "dataset_name": dataset_name,
            "budgets": cfg.TEST.RECALL_BUDGETS,
            "category_groups": cfg.TEST.RECALL_CATEGORY_GROUPS,
            "duplicate_iou": cfg.MODEL.RPN.NMS_THRESH,
            "distributed": distributed,
            "output_dir": output_dir,
            "save_proposals": save_proposals,
        }

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        """
        Args:
            inputs: the model's inputs, each with an "image_id".
            outputs: ProposalNetwork outputs, each with "proposals": Instances with
                ``proposal_boxes`` (original image coordinates) and ``objectness_logits``.
        """
        for input, output in zip(inputs, outputs):
            if "proposals" not in output:
                raise ValueError(
                    "ProposalRecallEvaluator needs model outputs with 'proposals' (as "
                    f"ProposalNetwork returns), got keys {sorted(output)}"
                )
            proposals = output["proposals"].to("cpu")
            logits = proposals.objectness_logits.detach().float().numpy()
            order = np.argsort(-logits, kind="stable")
            if not self._save_proposals:
                order = order[: self._budgets[-1]]
            # compact arrays rather than Instances: smaller to keep and to gather
            self._predictions.append(
                {
                    "image_id": input["image_id"],
                    "boxes": proposals.proposal_boxes.tensor.detach().float().numpy()[order],
                    "objectness_logits": logits[order],
                }
            )

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions
        if not predictions:
            self._logger.warning("[ProposalRecallEvaluator] Did not receive valid predictions.")
            return {}

        by_image = {}
        for prediction in predictions:
            by_image.setdefault(prediction["image_id"], prediction)
        if len(by_image) < len(predictions):
            self._logger.warning(
                f"{len(predictions) - len(by_image)} images were predicted more than once; "
                "only their first proposals are evaluated."
            )
        if self._save_proposals:
            self._write_proposals(list(by_image.values()))

        coco_api = load_coco_ground_truth(self._dataset_name, self._output_dir)
        if self._category_groups:
            check_coco_categories({c["id"]: c["name"] for c in coco_api.dataset["categories"]},
                                  self._dataset_name, "TEST.RECALL_CATEGORY_GROUPS")
        gt = gt_from_coco(coco_api, by_image.keys())
        proposals = {
            img_id: {"boxes": p["boxes"], "scores": p["objectness_logits"]}
            for img_id, p in by_image.items()
        }
        results = evaluate_recall(gt, proposals, self._budgets, category_groups=self._category_groups)
        table = format_recall_table(results, self._budgets)
        pairs = duplicates_per_image(proposals, self._duplicate_iou, self._budgets[-1])
        results["duplicates"] = {
            "pairs/img": float(pairs.mean()), "max/img": float(pairs.max()), "images": float((pairs > 0).sum())
        }
        num_empty = sum(len(p["scores"]) == 0 for p in proposals.values())
        self._logger.info(
            f"Proposal recall on {len(proposals)} images ({num_empty} without proposals, "
            "which the d2 definition skips); AR as fractions, mean recall over IoU "
            "0.50:0.05:0.95:\n" + table
            + f"\nNear-duplicates (pairs with IoU > {self._duplicate_iou} in the top {self._budgets[-1]}): "
            f"{pairs.mean():.2f} per image, at most {pairs.max()}, in {(pairs > 0).sum()} of {len(pairs)} images"
        )
        return copy.deepcopy(results)

    def _write_proposals(self, predictions):
        path = os.path.join(self._output_dir, "box_proposals.pkl")
        write_proposal_file(path, *([p[k] for p in predictions] for k in ("image_id", "boxes", "objectness_logits")))
        self._logger.info(f"Saved the proposals of {len(predictions)} images to {path}")


def load_coco_ground_truth(dataset_name: str, cache_dir: str = None) -> COCO:
    """
    The dataset's COCO json (metadata ``json_file``), or Detectron2's conversion of its
    dicts, cached in ``cache_dir`` when given, as COCOEvaluator does.
    """
    metadata = MetadataCatalog.get(dataset_name)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        if hasattr(metadata, "json_file"):
            return COCO(PathManager.get_local_path(metadata.json_file))
        if cache_dir:
            cache_path = os.path.join(cache_dir, f"{dataset_name}_coco_format.json")
            convert_to_coco_json(dataset_name, cache_path)
            return COCO(PathManager.get_local_path(cache_path))
        coco = COCO()
        coco.dataset = convert_to_coco_dict(dataset_name)
        coco.createIndex()
        return coco
