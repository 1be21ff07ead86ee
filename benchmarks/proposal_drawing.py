"""Why :mod:`fpn_rpn.analysis.proposal_drawing` draws with PIL rather than Detectron2's
``Visualizer``: the same 20 proposals (each in its level's colour, with its score) over a
640x480 image, drawn by both. A level's colour must read the same in every box and in
the legend; the measure is the share of box-edge pixels whose colour is exactly their
level's, and the time per image:

    .venv/bin/python benchmarks/proposal_drawing.py

Visualizer (``overlay_instances`` with ``assigned_colors``) blends box edges with the
image (alpha 0.5) and antialiases them, and has no legend.
"""
import time

import numpy as np

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.utils.visualizer import Visualizer
from fpn_rpn.analysis.proposal_drawing import LEVEL_COLOURS, draw_proposals


def _edge_pixels(boxes):
    """Pixels on each box's left edge, away from corners and labels: (box index, y, x)."""
    return [(i, y, int(round(x0))) for i, (x0, y0, x1, y1) in enumerate(boxes.tolist())
            for y in range(int(y0) + 20, int(y1) - 5)]


def main():
    rng = np.random.RandomState(0)
    image = (rng.rand(480, 640, 3) * 80).astype(np.uint8)
    # boxes far apart enough that their left edges do not cross
    x0 = np.arange(20) * 30 + 10.0
    y0 = rng.uniform(10, 200, 20)
    boxes = np.stack([x0, y0, x0 + 25, y0 + rng.uniform(80, 260, 20)], 1).astype(np.float32)
    scores = np.linspace(1, 0.05, 20).astype(np.float32)
    levels = np.arange(20) % 5
    names = ["P2", "P3", "P4", "P5", "P6"]
    colours = [LEVEL_COLOURS[k] for k in levels]

    def ours():
        return np.asarray(draw_proposals(image, boxes, scores, levels, names, top=20))

    def visualizer():
        v = Visualizer(image)
        return v.overlay_instances(boxes=boxes, labels=[f"{s:.2f}" for s in scores],
                                   assigned_colors=[tuple(c / 255.0 for c in colour) for colour in colours]).get_image()

    for name, draw in (("fpn_rpn draw_proposals (PIL)", ours), ("Detectron2 Visualizer", visualizer)):
        draw()  # warm-up
        start = time.perf_counter()
        for _ in range(5):
            canvas = draw()
        seconds = (time.perf_counter() - start) / 5
        pixels = _edge_pixels(boxes)
        exact = np.mean([tuple(canvas[y, x]) == colours[i] for i, y, x in pixels])
        print(f"{name}: {seconds * 1000:.0f} ms per image; box-edge pixels exactly their level's colour: {exact:.0%}")


if __name__ == "__main__":
    main()
