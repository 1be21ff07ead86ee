"""tools/demo.py judges its goal on the default post-processing's row of the study."""
import csv

import pytest

from conftest import load_tool

demo = load_tool("demo")


def _study_csv(path, ar100):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["dataset", "definition", "kind", "source", "AR@100"])
        writer.writeheader()
        for (definition, source), value in ar100.items():
            writer.writerow({"dataset": "fpn_rpn_synthetic_val", "definition": definition, "kind": "sources",
                             "source": source, "AR@100": value})
        writer.writerow({"dataset": "fpn_rpn_synthetic_val", "definition": "d2", "kind": "paired",
                         "source": "", "AR@100": ""})
    return path


@pytest.mark.parametrize("default_ar, verdict", [(0.55, "met"), (0.45, "NOT met")])
def test_goal_reads_the_default_row_under_the_d2_definition(tmp_path, default_ar, verdict):
    path = _study_csv(tmp_path / "study.csv", {
        ("d2", "per_level NMS 0.5 top-K 1000"): 0.9,  # another NMS IoU: not the default
        ("d2", "per_level NMS 0.7 top-K 1000"): default_ar,
        ("coco", "per_level NMS 0.7 top-K 1000"): 0.9,
        ("d2", "cross_level NMS 0.7 top-K 1000"): 0.9,
        ("d2", "Selective Search (fast)"): 0.4,
    })
    line = demo.goal_line(path)
    assert line.startswith(f"Goal (AR@100 >= 0.5 and above Selective Search): {verdict}:")
    assert f"AR@100 {default_ar:.3f}, Selective Search 0.400" in line


def test_goal_needs_to_beat_selective_search(tmp_path):
    path = _study_csv(tmp_path / "study.csv", {("d2", "per_level NMS 0.7 top-K 1000"): 0.6,
                                               ("d2", "Selective Search (fast)"): 0.7})
    assert ": NOT met:" in demo.goal_line(path)
