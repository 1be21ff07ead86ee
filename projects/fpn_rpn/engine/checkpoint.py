"""A checkpointer that stops on a checkpoint it cannot use, and never saves diverged weights.

Detectron2's DetectionCheckpointer only logs a warning for the parameters a file
does not provide, so a truncated or foreign file, or the checkpoint of another
model, leaves them randomly initialised without a word. :class:`CheckedCheckpointer`
raises :class:`CheckpointError` instead when:

- the file does not exist or cannot be read (truncated, not a checkpoint);
- it provides none of the model's parameters (a checkpoint of another network);
- it is a proposal file (``box_proposals.pkl``), not a checkpoint;
- some parameter is missing or has another shape, when resuming from a checkpoint
  of the output folder (``--resume``) or with ``require_all`` (evaluation): these
  must be checkpoints of this very model;
- as the start of a training run, it supplies under half of the backbone's parameter
  values (names and shapes matching): a checkpoint of another backbone, whose few
  matching tensors (say two head biases) would leave the model effectively random,
  unless ``allow_partial_backbone`` (``MODEL.FPN_RPN.ALLOW_PARTIAL_BACKBONE_WEIGHTS``).

Otherwise partial loads stay allowed, as Detectron2 intends them: ImageNet weights
provide only the backbone, a detector's weights may lack a head. Backbones that load
their ImageNet weights when built (EfficientNet-Lite) take no file (MODEL.WEIGHTS "").

It also names the file, not a checkpoint format, when the file cannot be read at all
(permissions) or is a folder.

On saving, it refuses weights with NaN or infinite values (FloatingPointError), so
that ``last_checkpoint`` keeps naming the last good checkpoint. It writes each
checkpoint and ``last_checkpoint`` to a temporary file that is then renamed, so that a
process killed while writing, or a full disk, leaves the previous ones and no partial
file; a full disk (or another fault of the machine) is an :class:`OSFaultError` naming
the file, the free space and the last checkpoint.
"""
import contextlib
import os
from collections.abc import Mapping

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..data.proposal_files import PROPOSAL_KEYS
from ..errors import SYSTEM_ERRNOS, CheckpointError, OSFaultError, examples, first_line, write_fault

__all__ = ["CheckpointError", "CheckedCheckpointer", "OSFaultError"]

# a start that supplies less of the backbone's parameter values than this is refused
MIN_BACKBONE_FRACTION = 0.5


class CheckedCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` with the checks of :mod:`fpn_rpn.engine.checkpoint`.
    """

    def __init__(self, model, save_dir: str = "", *, require_all: bool = False,
                 allow_partial_backbone: bool = False, weights_key: str = "MODEL.WEIGHTS",
                 allow_key: str = "MODEL.FPN_RPN.ALLOW_PARTIAL_BACKBONE_WEIGHTS", save_to_disk=None,
                 **checkpointables):
        """
        Args:
            require_all (bool): every model parameter must be loaded, as for evaluation;
                otherwise only when resuming.
            allow_partial_backbone (bool): accept a start (not resuming, not ``require_all``)
                that supplies under MIN_BACKBONE_FRACTION of the backbone's parameter values.
            weights_key, allow_key (str): the config keys of the weights file and of
                ``allow_partial_backbone``, named in the messages.
            Others: see :class:`DetectionCheckpointer`.
        """
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.require_all = require_all
        self.allow_partial_backbone = allow_partial_backbone
        self.weights_key = weights_key
        self.allow_key = allow_key
        self._resuming = False
        self._path = None  # the file being loaded, for messages

    def resume_or_load(self, path: str, *, resume: bool = True):
        self._resuming = resume and self.has_checkpoint()
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

    def load(self, path: str, *args, **kwargs):
        if not path:
            if self.require_all:
                raise CheckpointError(f"no checkpoint to load ({self.weights_key} is empty): the model would be random")
            return super().load(path, *args, **kwargs)
        if os.path.isdir(path):
            raise CheckpointError(f"checkpoint {path} is a folder, not a file (give {self.weights_key} a .pth or .pkl)")
        if not os.path.isfile(path):
            try:
                local = self.path_manager.get_local_path(path)  # downloads URLs
            except Exception as e:
                raise CheckpointError(
                    f"checkpoint {path} cannot be fetched ({type(e).__name__}: {first_line(e)})"
                ) from e
            if not os.path.isfile(local):
                raise CheckpointError(f"checkpoint {path} does not exist")
            path = local
        self._path = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._path = None

    def _load_file(self, filename: str):
        try:
            loaded = super()._load_file(filename)
        except OSError as e:  # the file, not its content: permissions, an I/O error
            if e.errno is None:
                raise CheckpointError(
                    f"{filename}: cannot be read as a checkpoint, it may be truncated or not a "
                    f"PyTorch/Detectron2 checkpoint ({type(e).__name__}: {first_line(e)})"
                ) from e
            raise CheckpointError(f"{filename}: cannot be read ({e.strerror or first_line(e)})") from e
        except Exception as e:
            raise CheckpointError(
                f"{filename}: cannot be read as a checkpoint, it may be truncated or not a "
                f"PyTorch/Detectron2 checkpoint ({type(e).__name__}: {first_line(e)})"
            ) from e
        weights = loaded.get("model") if isinstance(loaded, Mapping) else loaded
        if not isinstance(weights, Mapping):
            raise CheckpointError(
                f"{filename}: not a checkpoint: holds a {type(weights).__name__} where a dict of weights should be"
            )
        if set(PROPOSAL_KEYS) <= set(weights):
            raise CheckpointError(
                f"{filename}: is a proposal file ({', '.join(PROPOSAL_KEYS)}; for DATASETS.PROPOSAL_FILES_*), "
                f"not a checkpoint: give {self.weights_key} a model's .pth, e.g. OUTPUT_DIR/model_final.pth"
            )
        return loaded

    def _load_model(self, checkpoint):
        file_keys = list(checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        params = [name for name, _ in self.model.named_parameters()]
        not_loaded = set(incompatible.missing_keys) | {key for key, *_ in incompatible.incorrect_shapes}
        if params and not_loaded.issuperset(params):
            raise CheckpointError(
                f"{self._path}: has none of the model's {len(params)} parameters; it is not a checkpoint of "
                f"this model (its keys: {examples(sorted(file_keys)) or 'none'})"
            )
        if not_loaded and (self.require_all or self._resuming):
            why = "resuming" if self._resuming else "evaluating"
            reshaped = len(incompatible.incorrect_shapes)
            shapes = f" ({reshaped} with another shape)" if reshaped else ""
            raise CheckpointError(
                f"{self._path}: {why} needs every parameter, but it misses {len(not_loaded)}{shapes}: "
                f"{examples(sorted(not_loaded))}; is it a checkpoint of this config?"
            )
        if not (self.require_all or self._resuming or self.allow_partial_backbone):
            self._check_backbone_supplied(not_loaded)
        return incompatible

    def _check_backbone_supplied(self, not_loaded) -> None:
        """A start must supply at least MIN_BACKBONE_FRACTION of the backbone's parameter values."""
        sizes = {name: p.numel() for name, p in self.model.named_parameters() if name.startswith("backbone.")}
        total = sum(sizes.values())
        loaded = sum(n for name, n in sizes.items() if name not in not_loaded)
        if total and loaded < MIN_BACKBONE_FRACTION * total:
            raise CheckpointError(
                f"{self._path}: supplies {loaded / total:.1%} of the backbone's parameter values (names and shapes "
                f"matching, {loaded} of {total}); a checkpoint of another backbone leaves the model effectively "
                f"random: set {self.allow_key} True to train from it anyway"
            )

    def save(self, name: str, **kwargs) -> None:
        if self.save_dir and self.save_to_disk:
            bad = [key for key, value in self.model.state_dict().items()
                   if value.is_floating_point() and not bool(torch.isfinite(value).all())]
            if bad:
                last = self.get_checkpoint_file() if self.has_checkpoint() else "none"
                at = f" at iteration {kwargs['iteration']}" if "iteration" in kwargs else ""
                raise FloatingPointError(
                    f"training has diverged{at}: NaN or infinite values in {len(bad)} of the model's tensors "
                    f"({examples(sorted(bad))}); checkpoint {name} not saved, the last one is {last}"
                )
        if not (self.save_dir and self.save_to_disk and os.path.isdir(self.save_dir)):
            return super().save(name, **kwargs)  # nothing to save, or not a local folder: no atomic rename
        # as Checkpointer.save, through a temporary file
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        self._write(save_file, lambda f: torch.save(data, f), "wb")
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not os.path.isdir(self.save_dir):  # not a local folder: no atomic rename
            return super().tag_last_checkpoint(last_filename_basename)
        self._write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename), "w")

    def _write(self, path: str, write, mode: str) -> None:
        """``write(file)`` into ``path`` + ".tmp", renamed to ``path`` once complete; on a fault of the
        machine (a full disk) the temporary file is removed and the fault is an OSFaultError."""
        tmp = path + ".tmp"
        try:
            with open(tmp, mode) as f:
                write(f)
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            if isinstance(e, OSError) and e.errno in SYSTEM_ERRNOS:
                last = self.get_checkpoint_file() if self.has_checkpoint() else "none"
                raise write_fault(e, path, f"; the last checkpoint is {last}") from e
            raise
