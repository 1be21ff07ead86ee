from detectron2.config import CfgNode as CN


def add_fpn_rpn_config(cfg):
    """
    Add config for fpn_rpn. Call before ``merge_from_file()``.

    Only keys Detectron2 lacks are added, under ``MODEL.FPN_RPN``. Sizes, offset,
    IoU thresholds, sampling, top-K, NMS threshold, min size, loss type/weights and
    box-transform weights are Detectron2's own ``MODEL.ANCHOR_GENERATOR.*``,
    ``MODEL.RPN.*`` and ``MODEL.PROPOSAL_GENERATOR.MIN_SIZE`` keys.
    """
    cfg.MODEL.FPN_RPN = CN()
    # Anchor aspect ratios as width / height (w = s*sqrt(r), h = s/sqrt(r)), one list
    # per level or one list for all levels. Read by FPNAnchorGenerator instead of
    # MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS, which Detectron2 defines as height / width.
    # Ratios 0.5, 1, 2 listed in Detectron2's anchor order (its height / width 0.5, 1, 2)
    # so that model-zoo RPN weights keep their meaning.
    cfg.MODEL.FPN_RPN.ANCHOR_RATIOS = [[2.0, 1.0, 0.5]]
    # "sigmoid": one logit per anchor (Detectron2, loads model-zoo RPN weights);
    # "softmax": two scores per anchor, background then object (Faster R-CNN's original).
    cfg.MODEL.FPN_RPN.OBJECTNESS = "sigmoid"
    # "cross_level": one class-agnostic NMS over the proposals of all levels of an
    # image, so a box found on two levels survives once; "per_level": NMS inside each
    # level only (Detectron2's RPN, reproduced exactly).
    cfg.MODEL.FPN_RPN.NMS_MODE = "cross_level"
    # On CPU, compute the head's gradients only where the losses reach (the sampled
    # anchors): about 3x faster training steps, gradients equal up to float rounding.
    # False keeps autograd's dense backward, reproducing Detectron2's training bit for bit.
    cfg.MODEL.FPN_RPN.SPARSE_HEAD_BACKWARD = True
    # Drop proposals whose objectness probability is below this, before NMS; 0 keeps all.
    cfg.MODEL.FPN_RPN.SCORE_THRESH_TEST = 0.0
    # Divisors of the summed losses. "batch_size": BATCH_SIZE_PER_IMAGE x images
    # (Detectron2); "num_sampled": sampled anchors; "num_positive": positive anchors;
    # "anchor_locations": feature-map locations (N_reg in Faster R-CNN, paired with
    # MODEL.RPN.BBOX_REG_LOSS_WEIGHT = 10 for its lambda).
    cfg.MODEL.FPN_RPN.CLS_LOSS_NORMALIZER = "batch_size"
    cfg.MODEL.FPN_RPN.LOC_LOSS_NORMALIZER = "batch_size"

    # Outside MODEL because they describe data and evaluation, not the network.
    # COCO-format datasets to register before training/evaluation, so that a JSON file and
    # an image folder can be used from the command line without code: a list of
    # [name, json_file, image_root]; names then go in DATASETS.TRAIN / DATASETS.TEST.
    cfg.DATASETS.REGISTER_COCO = []
    # Proposal budgets (proposals per image) at which the recall evaluator reports AR.
    cfg.TEST.RECALL_BUDGETS = [10, 20, 50, 100, 300, 1000]
    return cfg
