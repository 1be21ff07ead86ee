"""Make Detectron2 v0.6, installed without its compiled extension, importable on
current numpy and Pillow.

The registry's ``pb1-detectron2==0.6`` sdist carries the official v0.6 Python
sources but no C++ sources, so ``make`` installs it with the extension build off.
That install needs four workarounds, all applied here and nowhere else:

- ``detectron2._C`` is missing: an empty module stands in. fpn_rpn uses none of
  its ops (rotated boxes, deformable convs, ROIAlignRotated); calling one fails
  with an AttributeError naming the op. Only the three build-information
  functions that ``default_setup``'s environment report calls are provided.
- numpy >= 1.24 removed ``np.int``, ``np.bool`` and ``np.float``, which v0.6 uses
  (for example in ``detectron2.data.build``): they are restored as the builtins
  they used to alias.
- Pillow >= 10 removed ``Image.LINEAR``, a default argument in
  ``detectron2.data.transforms``: it is restored as ``Image.BILINEAR``.
- ``detectron2.model_zoo`` imports ``pkg_resources``: that is handled at install
  time by pinning ``setuptools<81`` (the Makefile does), not here.

A complete Detectron2 (one whose ``_C`` extension imports, such as the official
one built from source) is left untouched: :func:`apply` then does nothing.

:func:`quiet_torchscript_deprecation` is for any Detectron2 on torch >= 2.10: its
modules script functions when imported, each a FutureWarning a user can do nothing about.
"""
import contextlib
import importlib.util
import sys
import types
import warnings

__all__ = ["apply", "is_complete_detectron2", "quiet_torchscript_deprecation"]


@contextlib.contextmanager
def quiet_torchscript_deprecation():
    """Hide torch's "`torch.jit.script` is deprecated" FutureWarnings raised inside this block only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        yield

_applied = False


def is_complete_detectron2() -> bool:
    """True when Detectron2's compiled ``_C`` extension is importable."""
    if "detectron2._C" in sys.modules:
        return not getattr(sys.modules["detectron2._C"], "_fpn_rpn_placeholder", False)
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except ImportError:  # Detectron2 itself is missing: nothing to patch.
        return True


def _restore_numpy_aliases():
    import numpy as np

    for name, builtin in (("int", int), ("bool", bool), ("float", float)):
        # numpy 2 has ``np.bool`` again (as np.bool_); keep it when present.
        if name not in np.__dict__:
            setattr(np, name, builtin)


def _restore_pil_linear():
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def _install_placeholder_c():
    import detectron2

    module = types.ModuleType("detectron2._C")
    module.__doc__ = "Placeholder for Detectron2's compiled ops, installed by fpn_rpn.compat."
    module._fpn_rpn_placeholder = True
    module.get_compiler_version = lambda: "not built (Detectron2 installed without its C++ extension)"
    module.get_cuda_version = lambda: "not built"
    module.has_cuda = lambda: False
    sys.modules["detectron2._C"] = module
    detectron2._C = module


def apply():
    """Apply the workarounds once if Detectron2 is incomplete; otherwise do nothing."""
    global _applied
    if _applied or is_complete_detectron2():
        return
    _restore_numpy_aliases()
    _restore_pil_linear()
    _install_placeholder_c()
    _applied = True
