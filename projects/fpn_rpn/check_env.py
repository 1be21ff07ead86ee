"""
What this environment holds, as fpn_rpn sees it: ``python -m fpn_rpn.check_env``.

Prints the interpreter, torch (its CUDA build and whether a GPU is usable),
torchvision, where Detectron2 was imported from, whether its compiled ``_C``
extension is present (a complete Detectron2, such as one built from the official
sources) or stood in for by :mod:`fpn_rpn.compat` (the v0.6 sdist route), whether
LazyConfig configs can be used, and where fpn_rpn itself was imported from.
Every install route of the Makefile ends with it.
"""
import os
import sys
from typing import List, Tuple

from . import compat
from .lazy_config import lazy_config_problem

__all__ = ["environment_report", "main"]


def _module_dir(module) -> str:
    return os.path.dirname(os.path.abspath(module.__file__))


def environment_report() -> List[Tuple[str, str]]:
    """(item, what was found) pairs, in the order printed by :func:`main`."""
    import detectron2
    import torch
    import torchvision

    import fpn_rpn

    if compat.is_complete_detectron2():
        import detectron2._C as C

        c_state = f"compiled ({os.path.basename(C.__file__)}, CUDA ops: {'yes' if C.has_cuda() else 'no'})"
    else:
        c_state = "missing: fpn_rpn.compat's placeholder stands in (v0.6 without its C++ extension)"
    cuda = torch.version.cuda or "none (CPU-only build)"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    problem = lazy_config_problem()
    return [
        ("python", f"{sys.executable} ({sys.version.split()[0]})"),
        ("torch", f"{torch.__version__} at {_module_dir(torch)}"),
        ("CUDA", f"torch built with {cuda}; GPUs usable: {gpus}"),
        ("torchvision", torchvision.__version__),
        ("detectron2", f"{detectron2.__version__} at {_module_dir(detectron2)}"),
        ("detectron2._C", c_state),
        ("LazyConfig", "supported" if problem is None else f"not supported: {problem}"),
        ("fpn_rpn", _module_dir(fpn_rpn)),
    ]


def main() -> None:
    report = environment_report()
    width = max(len(item) for item, _ in report)
    for item, found in report:
        print(f"[check_env] {item:<{width}}  {found}")


if __name__ == "__main__":
    main()
