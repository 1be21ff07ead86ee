"""
Support for fpn_rpn's LazyConfig files (``configs/lazy/*.py``).

They take their data loaders, optimizer, schedule and training options from
Detectron2's own LazyConfig files (``configs/common`` in its sources, installed as
``detectron2/model_zoo/configs/common``), as Detectron2's model-zoo ``.py`` configs
do. Detectron2 v0.6 from the registry's sdist (the Makefile's fallback) ships none of
them, so there a LazyConfig file stops with a one-line :class:`ConfigError` instead of
a deep traceback; the YAML configs work on both.
"""
import os
from typing import Optional

from .errors import ConfigError

__all__ = ["lazy_config_problem", "get_common_config"]

# the file every LazyConfig of fpn_rpn loads first (its data loaders)
_PROBE = "common/data/coco.py"


def lazy_config_problem() -> Optional[str]:
    """None when Detectron2's LazyConfig files are installed; otherwise why not, in one line."""
    import detectron2
    from detectron2 import model_zoo

    configs = os.path.join(os.path.dirname(model_zoo.__file__), "configs")
    if os.path.isfile(os.path.join(configs, _PROBE)):
        return None
    return (
        f"the Detectron2 at {os.path.dirname(detectron2.__file__)} has no LazyConfig files "
        f"(model_zoo/configs/{_PROBE}; the v0.6 sdist installs none): use the YAML configs, "
        "or a Detectron2 built from its official sources"
    )


def get_common_config(path: str):
    """
    ``detectron2.model_zoo.get_config(path)`` for one of Detectron2's ``common/*.py``
    LazyConfig files, or a :class:`ConfigError` saying why this Detectron2 cannot give it.
    """
    problem = lazy_config_problem()
    if problem is not None:
        raise ConfigError(f"LazyConfig is not supported here: {problem}")
    from detectron2 import model_zoo

    return model_zoo.get_config(path)
