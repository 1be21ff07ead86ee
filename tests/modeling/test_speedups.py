"""Each speed-up switched off gives the same losses and proposals as with it on."""
import fpn_rpn  # noqa: F401  # before detectron2

import pytest
import torch
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.utils.events import EventStorage

from fpn_rpn.modeling import proposal_selection
from fpn_rpn.modeling.speedups import SPEEDUPS, speedups_off

from test_proposal_generator import SHAPES, _cfg, _inputs, _randomize_head

SWITCHES = ["threaded_cpu_nms", "anchor_cache"]


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
    rpn = build_proposal_generator(_cfg(NMS_MODE=nms_mode), SHAPES)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # threads need two
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    _randomize_head(rpn)
    images, features, gt = _inputs()
    assert sum(min(f.shape[2] * f.shape[3] * 3, 1000) for f in features.values()) * 2 >= \
        proposal_selection._THREADED_NMS_MIN_BOXES
    calls = {"ThreadPoolExecutor": 0}
    monkeypatch.setattr(proposal_selection, "ThreadPoolExecutor",
                        _counted(proposal_selection.ThreadPoolExecutor, "ThreadPoolExecutor", calls))
    on = _run(rpn, images, features, gt)
    assert calls["ThreadPoolExecutor"] > 0
    assert len(rpn.anchor_generator._anchor_cache)
    before = dict(calls)
    rpn.anchor_generator._anchor_cache.clear()
    with speedups_off(switch):
        assert getattr(SPEEDUPS, switch) is False
        off = _run(rpn, images, features, gt)
    assert getattr(SPEEDUPS, switch) is True
    _assert_same(on, off)
    # the switch took the plain path: its fast one was not called again
    if switch == "threaded_cpu_nms":
        assert calls["ThreadPoolExecutor"] == before["ThreadPoolExecutor"]
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
