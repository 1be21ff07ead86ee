#!/usr/bin/env python
"""
Generate the embedded synthetic dataset (see fpn_rpn.data.synthetic_data): the files of
fpn_rpn_synthetic_train / fpn_rpn_synthetic_val, which must exist before they are used.
Does nothing when they are already there.

    python tools/make_synthetic_dataset.py                      # the default, as training uses it
    python tools/make_synthetic_dataset.py --root /tmp/shapes --num-train 50 --num-val 10

Names other than the default ones need ``DATASETS.REGISTER_COCO`` entries pointing at
the files printed here.
"""
import argparse

import fpn_rpn  # noqa: F401  (must precede detectron2, which fpn_rpn.data.datasets imports)
from fpn_rpn.data import synthetic_data
from fpn_rpn.data.datasets import synthetic_root
from fpn_rpn.cli import ArgumentParser, non_negative_int, positive_int, run_cli


def main():
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--root",
        default=str(synthetic_root()),
        help="output folder (default: the one register_datasets uses, $DETECTRON2_DATASETS/fpn_rpn_synthetic)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=synthetic_data.DEFAULT_SEED,
                        help="seed of every image's random generator; the same seed gives the same files (default: %(default)s)")
    parser.add_argument("--num-train", type=non_negative_int, default=synthetic_data.DEFAULT_NUM_TRAIN,
                        help="images in the train split (default: %(default)s)")
    parser.add_argument("--num-val", type=non_negative_int, default=synthetic_data.DEFAULT_NUM_VAL,
                        help="images in the val split (default: %(default)s)")
    parser.add_argument("--workers", type=positive_int, help="threads drawing images; the files do not depend on it (default: one per CPU core)")
    args = parser.parse_args()
    paths = synthetic_data.generate_synthetic_dataset(
        args.root, seed=args.seed, num_train=args.num_train, num_val=args.num_val, workers=args.workers
    )
    for split, (json_file, image_root) in paths.items():
        print(f"{split}: json_file={json_file} image_root={image_root}")


if __name__ == "__main__":
    run_cli(main)
