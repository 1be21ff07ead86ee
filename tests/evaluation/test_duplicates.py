import numpy as np
import torch

import fpn_rpn  # noqa: F401  (before detectron2)
from fpn_rpn.evaluation.duplicates import count_duplicates, duplicates_per_image

# IoUs: (0, 1) 90/100 = 0.9, (0, 2) 0.8, (1, 2) 80/90 = 0.889; the last box overlaps none
BOXES = np.array([[0.0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 8], [20, 20, 30, 30]], np.float32)


def test_count_duplicates_counts_pairs_above_the_threshold():
    assert count_duplicates(torch.from_numpy(BOXES), 0.85) == 2
    assert count_duplicates(torch.from_numpy(BOXES), 0.8) == 2  # strictly above: (0, 2) at 0.8 is not
    assert count_duplicates(torch.from_numpy(BOXES), 0.95) == 0
    assert count_duplicates(torch.from_numpy(BOXES[:1]), 0.0) == 0


def test_duplicates_per_image_looks_at_the_best_scored_top_k():
    proposals = {
        7: {"boxes": BOXES, "scores": np.array([0.1, 0.9, 0.8, 0.7], np.float32)},
        3: {"boxes": BOXES[:0], "scores": np.zeros(0, np.float32)},
    }
    # top 2 by score: boxes 1 and 2 (IoU 0.889); top 3 adds box 3, which overlaps none
    assert duplicates_per_image(proposals, 0.85, 2).tolist() == [1, 0]
    assert duplicates_per_image(proposals, 0.85, 4).tolist() == [2, 0]
