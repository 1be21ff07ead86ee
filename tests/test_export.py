"""Export (fpn_rpn.export, tools/export_model.py): TorchScript by tracing and by scripting, and
ONNX run in ONNX Runtime, give the eager model's proposals on images the export never saw,
of another size too; the fall-back paths these need keep eager results unchanged."""
import fpn_rpn  # noqa: F401  # before detectron2

from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from fpn_rpn import setup_cfg
from fpn_rpn.export import export_model, proposals_of, run_exported
from conftest import cli, load_tool

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# a small random-init model: R-18 with GroupNorm, 32-channel FPN, few proposals
SMALL = [
    "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.RESNETS.NORM", "GN",
    "MODEL.FPN.NORM", "GN", "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 200, "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
]
TRACED_HW, OTHER_HW = (128, 160), (160, 96)  # both multiples of 32: no padding, which a random image lacks too


def _model(config):
    cfg = setup_cfg(str(CONFIGS / config), SMALL)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # Spread the scores: at Detectron2's init (std 0.01) an untrained head's logits lie within
    # about 1e-3 of each other, where ONNX Runtime's convolution rounding (about 1e-6) swaps neighbours.
    g = torch.Generator().manual_seed(1)
    head = model.proposal_generator.rpn_head
    with torch.no_grad():
        for layer in (head.objectness_logits, head.anchor_deltas):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.2)
    return model


def _image(hw, seed):
    return torch.rand(3, *hw, generator=torch.Generator().manual_seed(seed)) * 255


CASES = [
    ("fpn_rpn_R_50_FPN_1x.yaml", "torchscript", "tracing"),
    ("fpn_rpn_R_50_FPN_1x.yaml", "torchscript", "scripting"),
    ("fpn_rpn_R_50_FPN_1x.yaml", "onnx", "tracing"),
    ("cascade_rpn_R_50_FPN_1x.yaml", "torchscript", "tracing"),
    ("cascade_rpn_R_50_FPN_1x.yaml", "onnx", "tracing"),
]


@pytest.mark.parametrize("config, fmt, method", CASES)
def test_exported_model_gives_the_eager_proposals_on_new_images_and_sizes(config, fmt, method, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    model = _model(config)
    assert torch.is_grad_enabled()  # tracing with grad on must not record the head's custom backward
    path, adapter = export_model(model, _image(TRACED_HW, 0), str(tmp_path), fmt, method)
    assert Path(path).is_file()
    # the traced image, another image of its size (NMS must not be frozen), and another size
    for image in (_image(TRACED_HW, 0), _image(TRACED_HW, 1), _image(OTHER_HW, 2)):
        with torch.no_grad():
            boxes, scores = proposals_of(model([{"image": image}]))
        exported_boxes, exported_scores = run_exported(path, image, adapter)
        assert 0 < len(boxes) <= 100
        # Same boxes, same order. TorchScript runs torch's kernels: the same numbers. ONNX Runtime's
        # convolutions round differently (relative 1e-6), which box decoding carries to the coordinates.
        rtol = 1e-5 if fmt == "onnx" else 0.0
        torch.testing.assert_close(exported_boxes, boxes, rtol=rtol, atol=1e-4)
        torch.testing.assert_close(exported_scores, scores, rtol=rtol, atol=1e-4)


def test_traced_graph_holds_nms_and_no_python_op(tmp_path):
    model = _model("fpn_rpn_R_50_FPN_1x.yaml")
    export_model(model, _image(TRACED_HW, 0), str(tmp_path), "torchscript", "tracing")
    code = (tmp_path / "model_ts_code.txt").read_text()
    assert "torchvision.nms" in code
    assert "_RPNHeadFunction" not in code and "PythonOp" not in (tmp_path / "model_ts_IR.txt").read_text()


def test_onnx_needs_tracing(tmp_path):
    with pytest.raises(ValueError, match="tracing"):
        export_model(nn.Identity(), _image(TRACED_HW, 0), str(tmp_path), "onnx", "scripting")


def test_tool_exports_and_checks_the_round_trip(capsys, tmp_path, caplog):
    caplog.set_level("INFO", logger="export_model")
    argv = ["--config-file", str(CONFIGS / "fpn_rpn_R_50_FPN_1x.yaml"), "--output", str(tmp_path),
            "--opts", *map(str, SMALL), "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192"]
    load_tool("export_model").main(argv)
    assert (tmp_path / "model.ts").is_file()
    lines = [r.getMessage() for r in caplog.records if "input: eager" in r.getMessage()]
    assert len(lines) == 2 and all(", 0 of them more than 1e-4 px apart" in line for line in lines), lines


@pytest.mark.parametrize("argv, message", [
    (["--format", "onnx", "--export-method", "scripting"], "--format onnx needs --export-method tracing"),
    (["--format", "tflite"], "invalid choice: 'tflite'"),
])
def test_tool_refuses_bad_arguments_in_one_line(capsys, tmp_path, argv, message):
    status, err = cli(capsys, "export_model", ["--config-file", str(CONFIGS / "fpn_rpn_R_50_FPN_1x.yaml"),
                                                "--output", str(tmp_path), *argv])
    assert status == 2 and len(err) == 1 and message in err[0], err
