"""The one place where fpn_rpn works around Detectron2 v0.6 or reaches into Detectron2's
and torch's internals.

**Detectron2 v0.6 without its compiled extension, on current numpy and Pillow.**

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

**Internals**, each behind a function named for what it gives, so that a Detectron2 or
torch release that moves one breaks here, by name, and nowhere else:

- :func:`detectron2_export`: v0.6's ``detectron2.export`` without its Caffe2 exporter.
- :func:`find_free_port`, :func:`create_local_process_group`,
  :func:`release_detectron2_process_groups`: Detectron2's ``launch`` pieces that the CPU
  launcher (``fpn_rpn.engine.launch``) needs, and v0.6's module-level local group.
- :func:`default_store`, :func:`process_groups`: torch's process-group store and groups,
  with which a failing CPU process tells its peers.
- :func:`eval_hook_arguments`: the period and function of Detectron2's ``EvalHook``.
"""
import contextlib
import importlib
import importlib.util
import os
import sys
import types
import warnings

__all__ = ["apply", "create_local_process_group", "default_store", "detectron2_export", "eval_hook_arguments",
           "find_free_port", "is_complete_detectron2", "process_groups", "quiet_torchscript_deprecation",
           "release_detectron2_process_groups"]


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


# ---------------------------------------------------------------- internals

def detectron2_export():
    """
    ``detectron2.export``. Detectron2 v0.6's package ``__init__`` imports its Caffe2 exporter,
    which needs the ``caffe2`` package that current torch no longer ships (later Detectron2s
    make it optional); its TorchScript and tracing modules need none of it. Where that import
    fails, the package is registered without running its ``__init__``, and the two modules are
    imported from it.
    """
    try:
        return importlib.import_module("detectron2.export")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("caffe2"):
            raise
    import detectron2

    package = types.ModuleType("detectron2.export")
    package.__path__ = [os.path.join(os.path.dirname(detectron2.__file__), "export")]
    sys.modules["detectron2.export"] = package
    for name in ("flatten", "torchscript"):
        module = importlib.import_module(f"detectron2.export.{name}")
        setattr(package, name, module)
    package.TracingAdapter = package.flatten.TracingAdapter
    package.scripting_with_instances = package.torchscript.scripting_with_instances
    package.dump_torchscript_IR = package.torchscript.dump_torchscript_IR
    return package


def find_free_port() -> int:
    """A free TCP port on this machine, as Detectron2's ``launch`` picks for ``--dist-url auto``."""
    from detectron2.engine.launch import _find_free_port

    return _find_free_port()


def create_local_process_group(num_per_machine: int, machine_rank: int) -> None:
    """Detectron2's group of this machine's processes (``comm.get_local_rank`` and friends read it)."""
    import torch.distributed as dist
    from detectron2.utils import comm

    if hasattr(comm, "create_local_process_group"):  # current Detectron2
        comm.create_local_process_group(num_per_machine)
        return
    # Detectron2 v0.6 keeps the group in a module variable that its launch sets
    for i in range(dist.get_world_size() // num_per_machine):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def release_detectron2_process_groups() -> None:
    """Drop the two references to process groups that Detectron2's ``comm`` keeps (the cached
    gloo group and the local group), so that destroyed groups can be freed."""
    from detectron2.utils import comm

    comm._get_global_gloo_group.cache_clear()
    if hasattr(comm, "_LOCAL_PROCESS_GROUP"):
        comm._LOCAL_PROCESS_GROUP = None


def default_store():
    """
    The default process group's key-value store. Where torch no longer gives it, None, with a
    warning: a failing CPU process then cannot name itself to its peers, which stop at the
    process group's timeout instead (fpn_rpn.engine.launch).
    """
    import logging

    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except Exception as e:  # a private accessor: a torch release may move it
        logging.getLogger(__name__).warning(
            f"torch.distributed gives no default store ({type(e).__name__}: {e}): a failing process "
            "will not stop the others before the process group's timeout")
        return None


def process_groups() -> list:
    """Every process group of this process (the default one and the sub-groups)."""
    import torch.distributed as dist

    return list(dist.distributed_c10d._world.pg_names)


def eval_hook_arguments(hook) -> tuple:
    """(eval_period, eval_function) of a ``detectron2.engine.hooks.EvalHook``."""
    return hook._period, hook._func
