"""Post-processing variants from one network pass equal the models built from their configs."""
import numpy as np
import pytest
import torch

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from fpn_rpn import setup_cfg
from fpn_rpn.analysis.postprocessing_variants import network_key, run_postprocessing_variants
from fpn_rpn.analysis.proposal_sources import get_dataset_dicts, run_model
from fpn_rpn.evaluation.duplicates import duplicates_per_image

from conftest import REPO

DEMO_CONFIG = str(REPO / "configs" / "demo" / "fpn_rpn_R_18_GN_synthetic.yaml")
SMALL_INPUT = ["INPUT.MIN_SIZE_TEST", 160, "INPUT.MAX_SIZE_TEST", 224]
VARIANTS = [
    ["MODEL.FPN_RPN.NMS_MODE", "cross_level"],
    [],  # the default, per_level
    ["MODEL.RPN.NMS_THRESH", 0.5, "MODEL.RPN.PRE_NMS_TOPK_TEST", 50, "MODEL.RPN.POST_NMS_TOPK_TEST", 100],
]


@pytest.fixture(scope="module")
def moved_weights(tmp_path_factory):
    """Random weights whose box deltas are large, so that proposals leave their anchors
    and levels propose overlapping boxes (as a trained RPN does)."""
    torch.manual_seed(0)
    model = build_model(setup_cfg(DEMO_CONFIG, SMALL_INPUT))
    with torch.no_grad():
        model.proposal_generator.rpn_head.anchor_deltas.weight.mul_(30.0)
    out = tmp_path_factory.mktemp("weights")
    DetectionCheckpointer(model, save_dir=str(out)).save("moved")
    return str(out / "moved.pth")


@pytest.fixture(scope="module")
def two_photos(coco_mini):
    if not (coco_mini / "annotations" / "instances_val2017.json").is_file():
        pytest.skip("coco_mini not found")
    return get_dataset_dicts("coco_mini_val", max_images=2)


def test_variants_equal_the_models_of_their_configs(moved_weights, two_photos):
    cfgs = [setup_cfg(DEMO_CONFIG, SMALL_INPUT + opts, moved_weights) for opts in VARIANTS]
    results = run_postprocessing_variants(cfgs, two_photos)
    for cfg, (proposals, seconds) in zip(cfgs, results):
        expected, _ = run_model(cfg, two_photos)  # its own model, its own pass
        assert seconds > 0
        for image_id, image in expected.items():
            np.testing.assert_array_equal(proposals[image_id]["boxes"], image["boxes"])
            np.testing.assert_array_equal(proposals[image_id]["scores"], image["scores"])
    # the budget of the third variant
    assert max(len(p["scores"]) for p in results[2][0].values()) <= 100


def test_per_level_nms_leaves_cross_level_duplicates_and_cross_level_none(moved_weights, two_photos):
    cfgs = [setup_cfg(DEMO_CONFIG, SMALL_INPUT + opts, moved_weights) for opts in VARIANTS[:2]]
    (cross, _), (per_level, _) = run_postprocessing_variants(cfgs, two_photos)
    # at the NMS threshold, 0.7, in the top 1000 (POST_NMS_TOPK_TEST)
    assert duplicates_per_image(cross, 0.7, 1000).tolist() == [0, 0]
    assert duplicates_per_image(per_level, 0.7, 1000).sum() > 0


def test_variants_must_share_the_network_and_weights(moved_weights):
    base = setup_cfg(DEMO_CONFIG, SMALL_INPUT, moved_weights)
    assert network_key(base) == network_key(setup_cfg(DEMO_CONFIG, SMALL_INPUT + VARIANTS[2], moved_weights))
    other = setup_cfg(DEMO_CONFIG, SMALL_INPUT + ["MODEL.FPN.OUT_CHANNELS", 64], moved_weights)
    assert network_key(base) != network_key(other)
    with pytest.raises(ValueError, match="share"):
        run_postprocessing_variants([base, other], [])
