"""``key=value`` overrides of a LazyConfig, checked against the config's keys.

Detectron2's ``LazyConfig.apply_overrides`` adds any key it is given: ``train.max_itr=3``
trains for the configured number of iterations, ``trian.max_iter=3`` becomes a new
top-level key, and neither says a word. :func:`apply_overrides` refuses a key the config
lacks, naming the closest existing one (as ``setup_cfg`` does for the YAML configs). A
key is known when the config holds it, or when it is an argument of a ``LazyCall``
node's target that the config leaves at its default (``model.proposal_generator.nms_mode``).
Hydra's ``+key=value`` adds a new key on purpose and is not checked.
"""
import difflib
import inspect
from typing import Iterable, List, Optional, Set

from omegaconf import DictConfig, ListConfig

from ..errors import ConfigError, first_line

__all__ = ["apply_overrides", "check_override_keys"]

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def apply_overrides(cfg, overrides: Iterable[str], where: str = ""):
    """:func:`check_override_keys`, then ``LazyConfig.apply_overrides(cfg, overrides)``."""
    from detectron2.config import LazyConfig

    overrides = list(overrides)
    check_override_keys(cfg, overrides, where)
    return LazyConfig.apply_overrides(cfg, overrides)


def check_override_keys(cfg: DictConfig, overrides: Iterable[str], where: str = "") -> None:
    """
    Raise ConfigError "<key> is not a config key<where>; did you mean <closest>?" for the
    first override whose key ``cfg`` lacks; ``where`` names the config file (" (in x.py)").
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as e:  # hydra's OverrideParseException: "key=value" expected
        raise ConfigError(f"cannot parse the overrides {list(overrides)} ({first_line(e)}): give key=value") from e
    for override in parsed:
        if override.is_add() or override.is_force_add():  # +key=value, ++key=value: added on purpose
            continue
        key = override.key_or_group
        candidates = _unknown(cfg, key.split("."))
        if candidates is not None:
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{key} is not a config key{where}{hint} (+{key}=VALUE adds a new one)")


def _unknown(node, parts: List[str], prefix: str = "") -> Optional[List[str]]:
    """None if the dotted key ``parts`` exists in ``node``; otherwise the known keys, to suggest from."""
    part, rest = parts[0], parts[1:]
    if isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
        child = node._get_node(int(part))
    elif isinstance(node, DictConfig) and part in node:
        child = node._get_node(part)
    elif isinstance(node, DictConfig) and not rest and part in _arguments(node):
        return None  # an argument the config leaves at its default
    else:
        return _keys(node, prefix)
    if not rest:
        return None
    if not isinstance(child, (DictConfig, ListConfig)):
        return _keys(node, prefix)  # a value, not a group
    return _unknown(child, rest, f"{prefix}{part}.")


def _keys(node, prefix: str = "") -> List[str]:
    """Every dotted key under ``node`` (list items by index), and its LazyCall arguments."""
    if isinstance(node, ListConfig):
        items = [(str(i), node._get_node(i)) for i in range(len(node))]
    elif isinstance(node, DictConfig):
        items = [(str(k), node._get_node(k)) for k in node.keys()]
    else:
        return []
    keys = [f"{prefix}{name}" for name in _arguments(node)] if isinstance(node, DictConfig) else []
    for name, child in items:
        keys.append(f"{prefix}{name}")
        keys += _keys(child, f"{prefix}{name}.")
    return sorted(set(keys))


def _arguments(node: DictConfig) -> Set[str]:
    """The named arguments of a LazyCall node's ``_target_`` (an empty set if it takes ``**kwargs``
    without a base class naming them, or for a plain dict)."""
    if "_target_" not in node:
        return set()
    target = node._get_node("_target_")._value()
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception:
            return set()
    # a subclass taking **kwargs passes them to its base (FPNRPN -> RPN): walk the MRO until one does not
    functions = [vars(c)["__init__"] for c in inspect.getmro(target) if "__init__" in vars(c)] \
        if inspect.isclass(target) else [target]
    names = set()
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return set()
        names |= {p.name for p in parameters if p.kind in _NAMED} - {"self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return names
    return set()
