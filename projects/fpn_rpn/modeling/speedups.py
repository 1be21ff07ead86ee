"""
Switches for fpn_rpn's speed-ups, so that each one's worth can be measured on whole
training iterations and inference passes (``tools/benchmark_rpn.py --scope whole``).

Every speed-up leaves the results unchanged (tests compare each one off against on);
turning one off only takes the plainer path. The head's sparse backward is the
config key ``MODEL.FPN_RPN.SPARSE_HEAD_BACKWARD`` (``FPNRPNHead.sparse_backward``)
rather than a switch here, because it changes gradients by float rounding.
"""
import contextlib
from dataclasses import dataclass, fields

__all__ = ["SPEEDUPS", "SpeedUps", "speedups_off"]


@dataclass
class SpeedUps:
    # On CPU, the NMS of the images (or image levels) of a batch run on torch's threads
    threaded_cpu_nms: bool = True
    # FPNAnchorGenerator keeps the anchors of recent feature-map sizes
    anchor_cache: bool = True


SPEEDUPS = SpeedUps()


@contextlib.contextmanager
def speedups_off(*names: str):
    """Turn the named speed-ups off inside the block (for benchmarks and tests)."""
    known = [f.name for f in fields(SpeedUps)]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown speed-up(s) {unknown}; known: {known}")
    saved = {n: getattr(SPEEDUPS, n) for n in names}
    try:
        for n in names:
            setattr(SPEEDUPS, n, False)
        yield
    finally:
        for n, value in saved.items():
            setattr(SPEEDUPS, n, value)
