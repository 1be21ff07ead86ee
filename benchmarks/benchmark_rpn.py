#!/usr/bin/env python
"""
Time fpn_rpn against Detectron2's stock RPN, side by side: whole iterations of the
shipped configs (what users live with), and the proposal generator alone.

``--scope whole`` (benchmarks/whole_iteration.py): for each shipped config (the demo,
the EfficientNet-Lite0 CPU config, R50-FPN at 800 px), whole training iterations
(forward, losses, backward, optimizer step) and whole inference passes of the model
with Detectron2's stock RPN, with fpn_rpn, and with fpn_rpn with its sparse head backward
switched off, on the same real images (coco_mini, mapped as the config's
loader maps them). The table gives seconds per call and, per round, the stock / fpn_rpn
ratio and the share of the whole call that the sparse head backward saves.

``--scope rpn``: one process builds Detectron2's ``RPN`` (configs/stock_rpn_R_50_FPN_1x.yaml) and
``FPNRPN`` (configs/fpn_rpn_R_50_FPN_1x.yaml) in both NMS modes, with the same head
weights (Detectron2's random init, seeded), and runs them on the same inputs: R50-FPN
shaped features (P2-P6, 256 channels, random normal) of a batch of 800x1333 images
(padded to 800x1344), with the gt boxes of coco_mini val images scaled to 800x1333
(images taken in file order; the mean number of gts is printed). Settings:

- ``post``: from the head's outputs to the proposals (anchors, decoding, per-level
  top-K, NMS, top-K), at inference; the head is replaced by its precomputed outputs.
- ``head+post``: the whole proposal generator at inference.
- ``train``: one training step of the proposal generator: forward (head, anchor
  matching, sampling, losses, training proposals) and backward into the head's weights
  and the features, which require grad as they would under a backbone.

Each setting and batch size runs the models in turn, round after round (the order
is shuffled every round), after warm-up runs; the table gives the median time of each,
[min-max] over the rounds as the noise, and the ratio stock / ours. Peak memory is the
most memory allocated during one call beyond what was allocated before it: on CUDA
from ``torch.cuda.max_memory_allocated``; on CPU from the allocation events of
``torch.profiler`` (``profile_memory=True``), which count tensor memory (not the
allocator's free lists, nor Python objects), in a separate, untimed run.

    python benchmarks/benchmark_rpn.py [--device cpu|cuda] [--batch-sizes 1 2 8] [--repeats 5]
    python benchmarks/benchmark_rpn.py --quick     # batch 1 and 2, 3 rounds
    python benchmarks/benchmark_rpn.py --scope whole --configs demo "Lite0 CPU" --whole-repeats 5
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import warnings
from pathlib import Path

import torch

import fpn_rpn  # noqa: F401  # before detectron2
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn
from fpn_rpn import setup_cfg
from timing import synchronize, time_calls  # benchmarks/
from whole_iteration import SHIPPED_CONFIGS, benchmark_config, format_whole_table
from fpn_rpn.cli import ArgumentParser, non_negative_int, positive_int, run_cli

# Raised inside Detectron2 v0.6's stock anchor generator, which the benchmark runs as the reference.
warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEFAULT_GT_JSON = REPO.parent / "shared" / "data" / "coco_mini" / "annotations" / "instances_val2017.json"
LEVELS = ["p2", "p3", "p4", "p5", "p6"]
CHANNELS = 256
SETTINGS = ("post", "head+post", "train")
MODELS = ("stock", "ours", "ours per-level")
TARGETS = {  # setting -> (batch size, minimum stock / ours) that the issue asks for, per device
    "cpu": {"post": (8, 1.5), "train": (None, 1.3)},
    "cuda": {"post": (8, 3.0), "train": (None, 1.3)},
}


def build_models(device):
    shapes = {f: ShapeSpec(channels=CHANNELS, stride=2 ** (i + 2)) for i, f in enumerate(LEVELS)}
    models = {}
    for name, config, nms_mode in (
        ("stock", "stock_rpn_R_50_FPN_1x.yaml", None),
        ("ours", "fpn_rpn_R_50_FPN_1x.yaml", "cross_level"),
        ("ours per-level", "fpn_rpn_R_50_FPN_1x.yaml", "per_level"),
    ):
        cfg = setup_cfg(str(CONFIGS / config), ["MODEL.FPN_RPN.NMS_MODE", nms_mode] if nms_mode else [])
        torch.manual_seed(0)
        models[name] = build_proposal_generator(cfg, shapes).to(device)
    for name in ("ours", "ours per-level"):
        models[name].load_state_dict(models["stock"].state_dict(), strict=True)
    return models


def load_gt(path, num_images, height, width):
    """gt boxes (xyxy) of the first ``num_images`` annotated images, scaled to height x width."""
    data = json.loads(Path(path).read_text())
    boxes_by_image = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            boxes_by_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    images = [im for im in data["images"] if im["id"] in boxes_by_image]
    gts = []
    for k in range(num_images):
        im = images[k % len(images)]
        xywh = torch.tensor(boxes_by_image[im["id"]], dtype=torch.float32)
        scale = torch.tensor([width / im["width"], height / im["height"]] * 2)
        gts.append(torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), dim=1) * scale)
    return gts


def make_inputs(batch_size, height, width, gt_boxes, device, seed=0):
    padded = [-(-height // 32) * 32, -(-width // 32) * 32]
    g = torch.Generator().manual_seed(seed)
    features = {
        f: torch.randn(batch_size, CHANNELS, -(-padded[0] // 2 ** (i + 2)), -(-padded[1] // 2 ** (i + 2)),
                       generator=g).to(device)
        for i, f in enumerate(LEVELS)
    }
    images = ImageList(torch.zeros(batch_size, 3, *padded, device=device), [(height, width)] * batch_size)
    gt_instances = []
    for boxes in gt_boxes:
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(boxes.to(device))
        gt_instances.append(inst)
    return images, features, gt_instances


class FixedOutputs(nn.Module):
    """Stands in for the head: returns precomputed outputs, so only post-processing is timed."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, features):
        return self.outputs


def make_step(setting, model, images, features, gt_instances, head_outputs):
    """A closure running one call of ``setting``; its ``reset()`` drops what a call leaves behind."""
    if setting == "post":
        def step():
            head, model.rpn_head = model.rpn_head, FixedOutputs(head_outputs)
            try:
                with torch.no_grad():
                    return model.eval()(images, features)
            finally:
                model.rpn_head = head
    elif setting == "head+post":
        def step():
            with torch.no_grad():
                return model.eval()(images, features)
    else:
        train_features = {k: v.detach().requires_grad_() for k, v in features.items()}

        def step():
            reset()
            model.train()
            torch.manual_seed(0)  # sampling draws from the global RNG
            with EventStorage():
                proposals, losses = model(images, train_features, gt_instances)
            sum(losses.values()).backward()
            return proposals, losses

    def reset():
        model.zero_grad(set_to_none=True)
        for f in features.values() if setting != "train" else train_features.values():
            f.grad = None

    step.reset = reset
    return step


def peak_memory(step, device):
    """Bytes allocated at the peak of one call of ``step`` beyond those allocated before it."""
    if device.type == "cuda":
        step.reset()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step.reset()  # frees before profiling starts would be events of unknown size
    with _native_stderr_to_devnull(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _native_stderr_to_devnull():
    """Drop what C++ code writes to stderr meanwhile: the profiler logs "USDT ... profiler_start/stop"."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} torch threads"


def check_parity(outputs):
    """Per-level mode must give Detectron2's losses and proposal scores exactly."""
    (stock_props, stock_losses), (ours_props, ours_losses) = outputs["stock"], outputs["ours per-level"]
    same_losses = all(torch.equal(stock_losses[k], ours_losses[k]) for k in stock_losses)
    same_scores = all(torch.equal(a.objectness_logits.sort().values, b.objectness_logits.sort().values)
                      for a, b in zip(stock_props, ours_props))
    return same_losses, same_scores


def main():
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example (the whole-iteration table of docs/performance.md; its duration is there too):\n"
               "    python benchmarks/benchmark_rpn.py --scope whole --whole-repeats 3\n"
               "More on what each scope times: the module docstring (benchmarks/benchmark_rpn.py).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N) (default: %(default)s)")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 2, 8],
                        help="--scope rpn: images per batch, one table row each (default: 1 2 8)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                        help="--scope rpn: post (post-processing only), head+post (the generator at inference), "
                             "train (one training step) (default: all three)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="--scope rpn: timed rounds, each runs every model once (default: %(default)s)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="--scope rpn: batch sizes 1 and 2, 3 rounds (a quick look)")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (default 0: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="--scope rpn: skip the separate, untimed peak-memory runs")
    parser.add_argument("--height", type=positive_int, default=800, help="--scope rpn: image height the features are shaped for (default: %(default)s)")
    parser.add_argument("--width", type=positive_int, default=1333, help="--scope rpn: image width (default: %(default)s)")
    parser.add_argument("--gt-json", default=str(DEFAULT_GT_JSON), help="--scope rpn: COCO json whose boxes, scaled to the image size, are the gts (default: coco_mini's instances_val2017.json)")
    parser.add_argument("--scope", choices=("rpn", "whole", "both"), default="both",
                        help="rpn: the proposal generator alone on precomputed features; whole: whole training iterations "
                             "and inference passes of the shipped configs; both (default)")
    parser.add_argument("--configs", nargs="+", choices=list(SHIPPED_CONFIGS), default=list(SHIPPED_CONFIGS),
                        help="shipped configs for --scope whole (default: all three)")
    parser.add_argument("--whole-repeats", type=positive_int, default=3, help="timed rounds of --scope whole (default: %(default)s)")
    parser.add_argument("--train-dataset", default="coco_mini_train", help="registered dataset whose images feed the whole training iterations (default: %(default)s)")
    parser.add_argument("--test-dataset", default="coco_mini_val", help="registered dataset whose images feed the whole inference passes (default: %(default)s)")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.repeats = [1, 2], 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(f"device: {device_name(device)}; torch {torch.__version__}; python {sys.version.split()[0]}")
    if args.scope != "whole":
        rpn_scope(args, device)
    if args.scope != "rpn":
        whole_scope(args, device)


def whole_scope(args, device):
    print(f"\nwhole iterations: {args.whole_repeats} timed rounds after {args.warmup} warm-up; training on "
          f"{args.train_dataset}, inference on {args.test_dataset} images; learning rate 0, so that every round "
          "computes the same thing", flush=True)
    results = []
    for name in args.configs:
        config, batch_size = SHIPPED_CONFIGS[name]
        results += benchmark_config(name, str(REPO / config), batch_size, args.train_dataset, args.test_dataset,
                                    args.whole_repeats, args.warmup, ["MODEL.DEVICE", str(device)])
        print(format_whole_table([r for r in results if r.config == name]), flush=True)
    print("\n" + format_whole_table(results))


def rpn_scope(args, device):
    print(f"input {args.height}x{args.width}, R50-FPN features P2-P6 x {CHANNELS} channels; "
          f"{args.repeats} timed rounds after {args.warmup} warm-up; times in ms, median [min-max]")
    models = build_models(device)
    gt_all = load_gt(args.gt_json, max(args.batch_sizes), args.height, args.width)
    rows = []
    for batch_size in args.batch_sizes:
        gt_boxes = gt_all[:batch_size]
        images, features, gt_instances = make_inputs(batch_size, args.height, args.width, gt_boxes, device)
        print(f"\nbatch {batch_size}: {sum(len(b) for b in gt_boxes) / batch_size:.1f} gts per image", flush=True)
        head_outputs = None
        if "post" in args.settings:
            with torch.no_grad():
                head_outputs = models["stock"].rpn_head([features[f] for f in LEVELS])
        for setting in args.settings:
            steps = {name: make_step(setting, m, images, features, gt_instances, head_outputs)
                     for name, m in models.items()}
            times = time_calls(steps, args.repeats, args.warmup, device)
            memory = {} if args.no_memory else {name: peak_memory(step, device) for name, step in steps.items()}
            parity = check_parity({name: step() for name, step in steps.items()}) if setting == "train" else None
            rows.append((setting, batch_size, times, memory, parity))
            print(format_row(rows[-1]), flush=True)

    print("\n" + format_table(rows, device))


def _ms(seconds):
    return statistics.median(seconds) * 1000


def format_row(row):
    setting, batch_size, times, memory, parity = row
    parts = [f"{setting:10s} batch {batch_size}:"]
    for name in MODELS:
        t = [x * 1000 for x in times[name]]
        mem = f", peak {memory[name] / 2 ** 20:.0f} MiB" if memory else ""
        parts.append(f"{name} {statistics.median(t):.1f} [{min(t):.1f}-{max(t):.1f}]{mem}")
    line = " | ".join(parts)
    if parity is not None:
        line += f" | per-level == stock: losses {parity[0]}, proposal scores {parity[1]}"
    return line


def format_table(rows, device):
    targets = TARGETS["cuda" if device.type == "cuda" else "cpu"]
    header = ("| setting | batch | stock ms | ours ms (ratio) | ours per-level ms (ratio) | "
              "peak MiB stock / ours / per-level | target | met? |")
    lines = [header, "|" + "---|" * 8]
    for setting, batch_size, times, memory, _ in rows:
        stock = _ms(times["stock"])
        cells = [setting, str(batch_size), f"{stock:.1f}"]
        ratios = []
        for name in ("ours", "ours per-level"):
            ratios.append(stock / _ms(times[name]))
            cells.append(f"{_ms(times[name]):.1f} ({ratios[-1]:.2f}x)")
        cells.append(" / ".join(f"{memory[n] / 2 ** 20:.0f}" for n in MODELS) if memory else "-")
        target_batch, target = targets.get(setting, (None, 1.0))
        if target_batch not in (None, batch_size):
            target = 1.0
        met = min(ratios) >= target and (not memory or max(memory["ours"], memory["ours per-level"])
                                         <= memory["stock"])
        cells += [f">= {target}x" + (", mem <=" if memory else ""), "yes" if met else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
