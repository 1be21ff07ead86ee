"""Drawing proposals, coloured by FPN level, and ground truth over an image.

Drawn with PIL, not Detectron2's ``Visualizer``, because a level must have one colour in
every box and in the legend: Visualizer blends box edges with the image (alpha 0.5),
antialiases them and draws no legend. The measurement (``benchmarks/proposal_drawing.py``):
docs/proposal_tools.md#why-not-detectron2s-visualizer.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes
from PIL import Image, ImageDraw, ImageFont

__all__ = ["LEVEL_COLOURS", "GT_COLOUR", "anchor_size_levels", "draw_proposals", "fpn_levels"]

# matplotlib's tab10, one colour per level; ground truth in white over a black outline
LEVEL_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194)]
GT_COLOUR = (255, 255, 255)


def fpn_levels(
    boxes: np.ndarray,
    scale: float = 1.0,
    min_level: int = 2,
    max_level: int = 6,
    canonical_box_size: int = 224,
    canonical_level: int = 4,
) -> Tuple[np.ndarray, List[str]]:
    """
    FPN's level of each box, k = floor(4 + log2(sqrt(wh) / 224)) clamped to [2, 6]
    (Eqn. 1 of the FPN paper, Detectron2's ``assign_boxes_to_levels``), on the box
    sides times ``scale`` (the network's input resolution over the image's).

    Returns:
        (N,) level index (0 for ``min_level``) and the level names "P2", "P3", ...
    """
    scaled = Boxes(torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * scale))
    index = assign_boxes_to_levels([scaled], min_level, max_level, canonical_box_size, canonical_level)
    return index.numpy(), [f"P{k}" for k in range(min_level, max_level + 1)]


def anchor_size_levels(
    boxes: np.ndarray, level_sizes: Sequence[Sequence[float]], level_names: Sequence[str], scale: float = 1.0
) -> Tuple[np.ndarray, List[str]]:
    """
    The level whose anchor sizes are nearest (in log scale, to their geometric mean) to
    each box's sqrt(wh) times ``scale``: the level the RPN most likely proposed it from.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    side = np.sqrt(np.clip((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-6, None)) * scale
    centres = np.array([np.mean(np.log(s)) for s in level_sizes])
    return np.abs(np.log(side)[:, None] - centres[None, :]).argmin(axis=1), [n.upper() for n in level_names]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def draw_proposals(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    levels: np.ndarray,
    level_names: Sequence[str],
    gt_boxes: Optional[np.ndarray] = None,
    top: int = 20,
    title: str = "",
) -> Image.Image:
    """
    The ``top`` highest-scoring proposals over ``image``, each in its level's colour
    with its score, the ground truth in white, and a legend.

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) XYXY in image coordinates; scores (N,); levels (N,) indices into
            ``level_names``.
        gt_boxes: (G, 4) XYXY, or None.
    """
    canvas = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 320))  # lines stay visible on large images
    font = _font(max(10, round(max(canvas.size) / 55)))
    for box in np.asarray(gt_boxes if gt_boxes is not None else np.zeros((0, 4))).reshape(-1, 4):
        draw.rectangle(box.tolist(), outline=(0, 0, 0), width=width + 2)
        draw.rectangle(box.tolist(), outline=GT_COLOUR, width=width)
    order = np.argsort(-np.asarray(scores), kind="stable")[:top][::-1]  # best drawn last, on top
    for i in order:
        colour = LEVEL_COLOURS[int(levels[i]) % len(LEVEL_COLOURS)]
        x0, y0, x1, y1 = boxes[i].tolist()
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        label = f"{float(scores[i]):.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((x0, y0), label, font=font)
        draw.rectangle([tx0, ty0, tx1, ty1], fill=colour)
        draw.text((x0, y0), label, fill=(255, 255, 255), font=font)

    # legend: one swatch per level present in the drawn proposals' palette, then gt
    entries = [(name, LEVEL_COLOURS[n % len(LEVEL_COLOURS)]) for n, name in enumerate(level_names)]
    entries.append(("gt", GT_COLOUR))
    if title:
        entries.insert(0, (title, None))
    line = draw.textbbox((0, 0), "Pg", font=font)[3] + 4
    legend_w = max(draw.textbbox((0, 0), name, font=font)[2] for name, _ in entries) + line + 12
    draw.rectangle([0, 0, legend_w, line * len(entries) + 6], fill=(0, 0, 0))
    for n, (name, colour) in enumerate(entries):
        y = 4 + n * line
        if colour is None:
            draw.text((6, y), name, fill=(255, 255, 255), font=font)
            continue
        draw.rectangle([6, y + 2, 6 + line - 6, y + line - 4], fill=colour)
        draw.text((6 + line, y), name, fill=(255, 255, 255), font=font)
    return canvas
