"""configs/lazy/*.py against their YAML twins (same modules, settings and proposals for the
same weights and input), training and evaluation with tools/lazyconfig_train_net.py on a
Detectron2 that ships its LazyConfig files, and the one-line error on one that does not."""
import fpn_rpn  # noqa: F401  # before detectron2

import json
import math
import re
from argparse import Namespace

import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from fpn_rpn import CascadeRPN, FPNRPN, FPNAnchorGenerator, FPNRPNHead, add_fpn_rpn_config
from fpn_rpn.errors import ConfigError
from fpn_rpn.lazy_config import lazy_config_problem

from conftest import REPO, load_tool

PAIRS = {  # LazyConfig file: its YAML twin
    "fpn_rpn_R_50_FPN_1x.py": "fpn_rpn_R_50_FPN_1x.yaml",
    "fpn_rpn_EffLite0_FPN_coco_cpu.py": "fpn_rpn_EffLite0_FPN_coco_cpu.yaml",
    "cascade_rpn_R_50_FPN_1x.py": "cascade_rpn_R_50_FPN_1x.yaml",
}
LAZY_DIR = REPO / "configs" / "lazy"
NO_LAZY = lazy_config_problem()
needs_lazy = pytest.mark.skipif(NO_LAZY is not None, reason=f"LazyConfig unsupported: {NO_LAZY}")


def test_every_lazy_config_has_a_yaml_twin():
    assert sorted(p.name for p in LAZY_DIR.glob("*.py")) == sorted(PAIRS)


def _yaml_cfg(name):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / name))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


_NOT_PLAIN = object()


def _plain(value):
    """``value`` with tuples as lists (LazyConfig passes lists where YAML gives tuples) if it
    holds only numbers, strings and None; otherwise _NOT_PLAIN."""
    if isinstance(value, (ListConfig, DictConfig)):  # what instantiate() passes for lists and dicts
        value = OmegaConf.to_container(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if _NOT_PLAIN in items else items
    if isinstance(value, dict):
        items = {k: _plain(v) for k, v in value.items()}
        return _NOT_PLAIN if _NOT_PLAIN in items.values() else items
    return value if isinstance(value, (bool, int, float, str, type(None))) else _NOT_PLAIN


def _settings(obj, depth=0):
    """The plain attributes of ``obj`` and of the non-module objects it holds
    (Box2BoxTransform, Matcher, ...), as nested dicts."""
    out = {}
    for key, value in vars(obj).items():
        if key == "training" or key.startswith("_") and "hook" in key:
            continue
        plain = _plain(value)
        if plain is not _NOT_PLAIN:
            out[key] = plain
        elif not isinstance(value, (torch.nn.Module, torch.Tensor, list, tuple, dict)) and depth < 2:
            out[key] = (type(value).__name__, _settings(value, depth + 1) if hasattr(value, "__dict__") else None)
    return out


@pytest.fixture(scope="module", params=sorted(PAIRS))
def twins(request):
    """(model from the LazyConfig, model from the YAML config), same weights, eval mode."""
    if NO_LAZY is not None:
        pytest.skip(f"LazyConfig unsupported: {NO_LAZY}")
    torch.manual_seed(0)
    yaml_model = build_model(_yaml_cfg(PAIRS[request.param])).eval()
    lazy_model = instantiate(LazyConfig.load(str(LAZY_DIR / request.param)).model).eval()
    lazy_model.load_state_dict(yaml_model.state_dict())
    return lazy_model, yaml_model


def test_same_modules_and_settings(twins):
    lazy_model, yaml_model = twins
    assert repr(lazy_model) == repr(yaml_model)
    lazy_modules, yaml_modules = dict(lazy_model.named_modules()), dict(yaml_model.named_modules())
    assert list(lazy_modules) == list(yaml_modules)
    for name, module in yaml_modules.items():
        assert type(lazy_modules[name]) is type(module), name
        assert _settings(lazy_modules[name]) == _settings(module), name
    # frozen stages (MODEL.BACKBONE.FREEZE_AT) and buffers
    assert [(n, p.requires_grad) for n, p in lazy_model.named_parameters()] == [
        (n, p.requires_grad) for n, p in yaml_model.named_parameters()
    ]
    assert [n for n, _ in lazy_model.named_buffers()] == [n for n, _ in yaml_model.named_buffers()]


@needs_lazy
@pytest.mark.parametrize("lazy_name", sorted(PAIRS))
def test_same_data_and_schedule(lazy_name):
    lazy, cfg = LazyConfig.load(str(LAZY_DIR / lazy_name)), _yaml_cfg(PAIRS[lazy_name])
    train, test = lazy.dataloader.train, lazy.dataloader.test
    for names, yaml_names in ((train.dataset.names, cfg.DATASETS.TRAIN), (test.dataset.names, cfg.DATASETS.TEST)):
        assert ([names] if isinstance(names, str) else _plain(names)) == list(yaml_names)
    from fpn_rpn.data.build import category_dataset_dicts

    assert train.dataset._target_ is category_dataset_dicts
    assert _plain([train.dataset.categories]) == list(cfg.DATASETS.TRAIN_CATEGORIES)
    assert train.dataset.filter_empty == cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    assert train.mapper.image_format == test.mapper.image_format == cfg.INPUT.FORMAT
    (resize, flip), (test_resize,) = train.mapper.augmentations, test.mapper.augmentations
    assert _plain(resize.short_edge_length) == list(cfg.INPUT.MIN_SIZE_TRAIN) and resize.sample_style == "choice"
    assert resize.max_size == cfg.INPUT.MAX_SIZE_TRAIN and flip.horizontal
    assert (test_resize.short_edge_length, test_resize.max_size) == (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    assert train.mapper.use_instance_mask == cfg.MODEL.MASK_ON
    assert (train.total_batch_size, train.num_workers) == (cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS)
    assert lazy.optimizer.lr == cfg.SOLVER.BASE_LR and lazy.optimizer.momentum == cfg.SOLVER.MOMENTUM
    assert lazy.optimizer.weight_decay == cfg.SOLVER.WEIGHT_DECAY
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED:
        from fpn_rpn.engine.solver import clipped_sgd

        assert lazy.optimizer._target_ is clipped_sgd
        assert (lazy.optimizer.clip_type, lazy.optimizer.clip_value, lazy.optimizer.norm_type) == (
            clip.CLIP_TYPE, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:
        assert "clip_value" not in lazy.optimizer
    assert lazy.train.max_iter == cfg.SOLVER.MAX_ITER
    assert lazy.train.checkpointer.period == cfg.SOLVER.CHECKPOINT_PERIOD
    assert lazy.train.init_checkpoint == cfg.MODEL.WEIGHTS
    # the learning-rate multiplier over the whole schedule, warm-up and steps included
    from detectron2.solver import build_lr_scheduler

    yaml_multiplier = build_lr_scheduler(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
    lazy_multiplier = instantiate(lazy.lr_multiplier)
    wheres = [i / cfg.SOLVER.MAX_ITER for i in range(0, cfg.SOLVER.MAX_ITER, max(1, cfg.SOLVER.MAX_ITER // 500))]
    torch.testing.assert_close([lazy_multiplier(w) for w in wheres], [yaml_multiplier._multiplier(w) for w in wheres])


def _inputs():
    torch.manual_seed(1)
    # near MODEL.PIXEL_MEAN: a randomly initialised R-50 then gives varied deltas and scores
    images = [torch.randint(100, 125, (3, 96, 128), dtype=torch.uint8) for _ in range(2)]
    inputs = [{"image": img, "height": 96, "width": 128} for img in images]
    for record, boxes in zip(inputs, ([[8.0, 10.0, 60.0, 70.0]], [[30.0, 5.0, 120.0, 50.0], [2.0, 40.0, 40.0, 90.0]])):
        instances = Instances((96, 128))
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.zeros(len(boxes), dtype=torch.int64)
        record["instances"] = instances
    return inputs


def test_same_proposals(twins):
    lazy_model, yaml_model = twins
    with torch.no_grad():
        lazy_out, yaml_out = lazy_model(_inputs()), yaml_model(_inputs())
    for lazy, ref in zip(lazy_out, yaml_out):
        lazy, ref = lazy["proposals"], ref["proposals"]
        assert len(ref) > 50  # of the 3072 anchors on 96 x 128 px, kept by NMS
        torch.testing.assert_close(lazy.proposal_boxes.tensor, ref.proposal_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(lazy.objectness_logits, ref.objectness_logits, rtol=0, atol=0)


def test_same_training_losses(twins):
    losses = []
    for model in twins:
        model.train()
        torch.manual_seed(2)  # the same anchor sampling
        with EventStorage():
            losses.append(model(_inputs()))
        model.eval()
    stage1 = {"loss_rpn_stage1_loc"} if type(twins[1].proposal_generator) is CascadeRPN else set()
    assert set(losses[0]) == {"loss_rpn_cls", "loss_rpn_loc"} | stage1
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


@pytest.mark.skipif(NO_LAZY is None, reason="this Detectron2 ships its LazyConfig files")
def test_lazy_config_without_detectron2_lazy_files_is_a_one_line_error(monkeypatch, capsys):
    with pytest.raises(ConfigError, match="LazyConfig is not supported here: .* has no LazyConfig files"):
        LazyConfig.load(str(LAZY_DIR / "fpn_rpn_R_50_FPN_1x.py"))
    tool = load_tool("lazyconfig_train_net")
    monkeypatch.setattr("sys.argv", ["lazyconfig_train_net.py", "--config-file",
                                     str(LAZY_DIR / "fpn_rpn_R_50_FPN_1x.py")])
    with pytest.raises(SystemExit) as exit_info:
        tool.invoke_main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("lazyconfig_train_net.py: error: LazyConfig is not supported here")
    assert "the YAML configs" in err[0]


# ---- overrides and weights: checked as train_net.py checks them --------------------------


def _lazy_cfg():
    """A LazyConfig as LazyConfig.load gives it (objects allowed), without Detectron2's common files."""
    from detectron2.config import LazyCall as L
    from detectron2.modeling import ProposalNetwork

    model = L(ProposalNetwork)(proposal_generator=L(FPNRPN)(nms_thresh=0.7), pixel_std=[1.0, 1.0, 1.0])
    return OmegaConf.create({"train": {"max_iter": 90000, "init_checkpoint": ""}, "model": model},
                            flags={"allow_objects": True})


UNKNOWN_OVERRIDES = [
    ("train.max_itr=3", "train.max_itr", "train.max_iter"),
    ("trian.max_iter=3", "trian.max_iter", "train.max_iter"),
    # nms_mode: an argument of FPNRPN the config leaves at its default, suggested all the same
    ("model.proposal_generator.nms_mod=cross_level", "model.proposal_generator.nms_mod",
     "model.proposal_generator.nms_mode"),
    ("model.pixel_std.3=1.0", "model.pixel_std.3", "model.pixel_std.2"),
]  # fmt: skip


@pytest.mark.parametrize("override, key, closest", UNKNOWN_OVERRIDES, ids=[o for o, *_ in UNKNOWN_OVERRIDES])
def test_override_of_an_unknown_key_names_the_closest(override, key, closest):
    from fpn_rpn.engine.lazy_overrides import apply_overrides

    cfg = _lazy_cfg()
    with pytest.raises(ConfigError) as info:
        apply_overrides(cfg, [override], " (in x.py)")
    assert str(info.value) == f"{key} is not a config key (in x.py); did you mean {closest}? (+{key}=VALUE adds a new one)"
    assert cfg.train.max_iter == 90000 and "trian" not in cfg  # nothing applied


def test_override_of_an_existing_key_or_argument_applies():
    from fpn_rpn.engine.lazy_overrides import apply_overrides

    cfg = apply_overrides(_lazy_cfg(), [
        "train.max_iter=3", "model.pixel_std.0=2.0", "model.proposal_generator.nms_thresh=0.5",
        "model.proposal_generator.nms_mode=cross_level",  # FPNRPN's own argument
        "model.proposal_generator.batch_size_per_image=128",  # RPN's, through FPNRPN's **kwargs
        "+train.note=added",  # Hydra's syntax for a new key
    ])  # fmt: skip
    assert cfg.train.max_iter == 3 and cfg.model.pixel_std[0] == 2.0 and cfg.train.note == "added"
    generator = cfg.model.proposal_generator
    assert (generator.nms_thresh, generator.nms_mode, generator.batch_size_per_image) == (0.5, "cross_level", 128)


TINY_LAZY = """
import torch
from detectron2.config import LazyCall as L

model = L(torch.nn.Linear)(in_features=2, out_features=2)
train = dict(output_dir={output_dir!r}, init_checkpoint="", max_iter=10, device="cpu")
"""


@pytest.mark.parametrize("flags, opts, words", [
    ([], ["train.max_itr=3"], "train.max_itr is not a config key (in {config}); did you mean train.max_iter?"),
    (["--eval-only"], ["train.init_checkpoint="],
     "no checkpoint to load (train.init_checkpoint is empty): the model would be random"),
])  # fmt: skip
def test_lazyconfig_train_net_stops_with_one_line(tmp_path, flags, opts, words):
    import os
    import subprocess
    import sys

    config = tmp_path / "tiny.py"
    config.write_text(TINY_LAZY.format(output_dir=str(tmp_path / "out")))
    cmd = [sys.executable, str(REPO / "tools" / "lazyconfig_train_net.py"), "--config-file", str(config), *flags, *opts]
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    err = run.stderr.strip().splitlines()
    assert run.returncode == 1 and err[-1].startswith(f"lazyconfig_train_net.py: error: {words.format(config=config)}"), err
    assert "Traceback" not in run.stderr


def _tiny_coco(root, name, num_images):
    """``num_images`` random 96 x 128 images with one or two boxes each, as COCO json + jpgs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(1, num_images + 1):
        Image.fromarray(rng.integers(100, 125, (96, 128, 3), dtype=np.uint8)).save(root / f"{name}{i}.jpg")
        images.append({"id": i, "file_name": f"{name}{i}.jpg", "width": 128, "height": 96})
        for x, y, w, h in ([10, 12, 50, 40], [60, 30, 60, 60])[: 1 + i % 2]:
            annotations.append({"id": len(annotations) + 1, "image_id": i, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0, "category_id": 1})
    json_file = root / f"{name}.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": [{"id": 1, "name": "thing"}]}))
    return str(json_file)


@needs_lazy
def test_lazyconfig_train_net_trains_and_evaluates(tmp_path, catalogs):
    register = [[name, _tiny_coco(tmp_path, name, n), str(tmp_path)] for name, n in (("lz_train", 4), ("lz_val", 2))]
    tool = load_tool("lazyconfig_train_net")
    overrides = [
        f"train.output_dir={tmp_path / 'out'}", "train.init_checkpoint=", "train.max_iter=2",
        "train.eval_period=0", "train.device=cpu", f"datasets.register_coco={register!r}",
        "dataloader.train.dataset.names=lz_train", "dataloader.test.dataset.names=lz_val",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[96]",
        "dataloader.test.mapper.augmentations.0.short_edge_length=96",
        # GroupNorm from random initialisation, as the README advises: FrozenBN's features
        # are about 1e4 there, and so are the deltas, which leave no box inside the image
        "model.backbone.bottom_up.stem.norm=GN", "model.backbone.bottom_up.stages.norm=GN",
        "model.backbone.norm=GN", "model.backbone.bottom_up.freeze_at=0",
    ]
    args = Namespace(config_file=str(LAZY_DIR / "fpn_rpn_R_50_FPN_1x.py"), opts=overrides,
                     eval_only=False, resume=False, num_gpus=1)
    torch.manual_seed(0)
    latest = tool.main(args)
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert math.isfinite(latest["loss_rpn_cls"][0]) and math.isfinite(latest["loss_rpn_loc"][0])
    assert (tmp_path / "out" / "config.yaml").is_file()  # default_setup saved the LazyConfig

    args.eval_only = True
    args.opts = overrides + [f"train.init_checkpoint={tmp_path / 'out' / 'model_final.pth'}"]
    results = tool.main(args)
    assert 0.0 <= results["recall_d2"]["AR@1000"] <= 1.0
    assert 0.0 <= results["recall_coco"]["AR@100"] <= 1.0


@needs_lazy
def test_readme_lazy_example_puts_the_components_into_mask_rcnn():
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (code,) = [b for b in blocks if "common/models/mask_rcnn_fpn.py" in b]
    namespace = {}
    exec(code, namespace)
    model = namespace["mask_rcnn"].eval()
    rpn = model.proposal_generator
    assert type(rpn) is FPNRPN and type(rpn.rpn_head) is FPNRPNHead
    assert type(rpn.anchor_generator) is FPNAnchorGenerator and rpn.nms_mode == "cross_level"
    with torch.no_grad():
        outputs = model(_inputs())
    assert [sorted(out) for out in outputs] == [["instances"], ["instances"]]
