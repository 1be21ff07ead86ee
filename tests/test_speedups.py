"""Each speed-up switched off gives the same losses and proposals as with it on."""
import fpn_rpn  # noqa: F401  # before detectron2

import pytest
import torch
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.utils.events import EventStorage

from fpn_rpn.modeling import proposal_generator, proposal_selection
from fpn_rpn.modeling.speedups import SPEEDUPS, speedups_off

from test_proposal_generator import SHAPES, _cfg, _inputs, _randomize_head

SWITCHES = ["early_stopping_nms", "threaded_cpu_nms", "anchor_cache", "batched_matching"]


def _run(rpn, images, features, gt):
    """Training losses and proposals (seeded sampling), then inference proposals."""
    rpn.train()
    torch.manual_seed(0)
    with EventStorage():
        train_proposals, losses = rpn(images, features, gt)
    rpn.eval()
    with torch.no_grad():
        test_proposals, _ = rpn(images, features)
    return train_proposals, losses, test_proposals


def _assert_same(a, b):
    (train_a, losses_a, test_a), (train_b, losses_b, test_b) = a, b
    assert losses_a.keys() == losses_b.keys()
    for k in losses_a:
        assert torch.equal(losses_a[k], losses_b[k]), k
    for x, y in zip(train_a + test_a, train_b + test_b):
        assert torch.equal(x.proposal_boxes.tensor, y.proposal_boxes.tensor)
        assert torch.equal(x.objectness_logits, y.objectness_logits)


@pytest.mark.parametrize("nms_mode", ["per_level", "cross_level"])
@pytest.mark.parametrize("switch", SWITCHES)
def test_each_speedup_off_gives_the_same_results(switch, nms_mode, monkeypatch, request):
    # few enough kept proposals that NMS stops early; for the threads, enough boxes in one NMS call
    top_k = 2000 if switch == "threaded_cpu_nms" else 50
    rpn = build_proposal_generator(
        _cfg(NMS_MODE=nms_mode, POST_NMS_TOPK_TRAIN=top_k, POST_NMS_TOPK_TEST=top_k), SHAPES)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # threads need two
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    _randomize_head(rpn)
    images, features, gt = _inputs()
    assert sum(min(f.shape[2] * f.shape[3] * 3, 1000) for f in features.values()) * 2 >= \
        proposal_selection._THREADED_NMS_MIN_BOXES
    calls = {"nms_first_k": 0, "match_and_sample": 0, "ThreadPoolExecutor": 0}
    for module, name in ((proposal_selection, "nms_first_k"), (proposal_generator, "match_and_sample"),
                         (proposal_selection, "ThreadPoolExecutor")):
        monkeypatch.setattr(module, name, _counted(getattr(module, name), name, calls))
    on = _run(rpn, images, features, gt)
    assert calls["nms_first_k"] == 2 and calls["match_and_sample"] == 1
    assert (calls["ThreadPoolExecutor"] > 0) == (switch == "threaded_cpu_nms")
    assert len(rpn.anchor_generator._anchor_cache)
    before = dict(calls)
    rpn.anchor_generator._anchor_cache.clear()
    with speedups_off(switch):
        assert getattr(SPEEDUPS, switch) is False
        off = _run(rpn, images, features, gt)
    assert getattr(SPEEDUPS, switch) is True
    _assert_same(on, off)
    # the switch took the plain path: its fast one was not called again
    fast_path = {"early_stopping_nms": "nms_first_k", "batched_matching": "match_and_sample",
                 "threaded_cpu_nms": "ThreadPoolExecutor"}
    if switch in fast_path:
        assert calls[fast_path[switch]] == before[fast_path[switch]]
    else:
        assert len(rpn.anchor_generator._anchor_cache) == 0


def _counted(function, name, calls):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)
    return wrapper


def test_unknown_switch_is_refused():
    with pytest.raises(ValueError, match="unknown speed-up"):
        with speedups_off("fast_mode"):
            pass
