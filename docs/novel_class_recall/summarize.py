"""
The study's tables: mean [min, max] over the two seeds of each trained model, and Selective
Search, per test set, box group and budget, from compare_recall.py's recall_table.csv files.

    python docs/novel_class_recall/summarize.py output/novel
"""
import csv
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "output/novel"
names = {"sig": "sigmoid objectness, VOC only", "oln": "centerness objectness, VOC only",
         "all": "sigmoid objectness, all 80 (upper bound)"}
budgets = ["AR@10", "AR@20", "AR@50", "AR@100", "AR@300", "AR@1000"]
for definition in ("d2", "coco"):
    for ds in ("coco_mini_val", "coco_extra_val"):
        rows = list(csv.DictReader(open(f"{root}/compare_{ds}/recall_table.csv")))
        rows = [r for r in rows if r["definition"] == definition]
        for group in ("novel", "seen", "all"):
            print(f"\n{ds}, {group} boxes, definition {definition}\n")
            print("| model | " + " | ".join(budgets) + " |")
            print("|---|" + "---|" * len(budgets))
            for m, label in names.items():
                vals = {s: next(r for r in rows if r["source"] == f"{m}_s{s}" and r["categories"] == group) for s in (1, 2)}
                cells = []
                for b in budgets:
                    a, c = float(vals[1][b]), float(vals[2][b])
                    cells.append(f"{(a + c) / 2:.3f} [{min(a, c):.3f}, {max(a, c):.3f}]")
                print(f"| {label} | " + " | ".join(cells) + " |")
            ss = next(r for r in rows if r["source"] == "selective_search" and r["categories"] == group)
            print("| Selective Search (fast) | " + " | ".join(f"{float(ss[b]):.3f}" for b in budgets) + " |")
