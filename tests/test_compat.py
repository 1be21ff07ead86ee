import fpn_rpn  # noqa: F401  # applies the compat workarounds

import importlib
import sys

import numpy as np
import pytest
from PIL import Image

import detectron2
from fpn_rpn import compat


@pytest.mark.parametrize("module", ["detectron2.layers", "detectron2.data", "detectron2.evaluation",
                                    "detectron2.engine", "detectron2.modeling"])
def test_detectron2_modules_import(module):
    importlib.import_module(module)


@pytest.mark.skipif(compat.is_complete_detectron2(), reason="a complete Detectron2 is installed: nothing was patched")
def test_removed_numpy_and_pillow_names_exist():
    assert np.int is int and np.float is float
    assert np.bool in (bool, np.bool_)  # numpy 2 has np.bool again
    assert Image.LINEAR == Image.BILINEAR


def test_incomplete_detectron2_gets_the_placeholder():
    if "_fpn_rpn_placeholder" not in vars(sys.modules["detectron2._C"]):
        pytest.skip("a complete Detectron2 is installed: nothing was patched")
    assert compat.is_complete_detectron2() is False
    with pytest.raises(AttributeError, match="nms_rotated"):
        detectron2._C.nms_rotated  # an op the placeholder cannot provide fails by name


@pytest.fixture
def unpatched(monkeypatch):
    """The process as before compat.apply(), restored afterwards."""
    monkeypatch.setattr(compat, "_applied", False)
    monkeypatch.delitem(sys.modules, "detectron2._C", raising=False)
    monkeypatch.delattr(detectron2, "_C", raising=False)
    monkeypatch.delattr(np, "int", raising=False)
    monkeypatch.delattr(Image, "LINEAR", raising=False)
    return monkeypatch


def test_apply_does_nothing_for_a_complete_detectron2(unpatched):
    unpatched.setattr(compat, "is_complete_detectron2", lambda: True)
    compat.apply()
    assert "detectron2._C" not in sys.modules and not hasattr(detectron2, "_C")
    assert not hasattr(np, "int") and not hasattr(Image, "LINEAR")
    assert compat._applied is False


def test_apply_installs_the_placeholder_for_an_incomplete_detectron2(unpatched):
    # the converse of the test above, so that it cannot pass with an apply() that never patches
    unpatched.setattr(compat, "is_complete_detectron2", lambda: False)
    compat.apply()
    assert sys.modules["detectron2._C"]._fpn_rpn_placeholder is True
    assert detectron2._C is sys.modules["detectron2._C"]
    assert np.int is int and compat._applied is True
