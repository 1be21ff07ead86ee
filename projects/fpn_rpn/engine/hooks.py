"""Training hooks that let a fault on one process end a multi-process run promptly."""
from detectron2.engine import hooks

from ..compat import eval_hook_arguments

__all__ = ["EvalHook", "no_eval_after_failure"]


class EvalHook(hooks.EvalHook):
    """
    :class:`detectron2.engine.hooks.EvalHook` without the final evaluation of a failed run.

    Detectron2 evaluates after training when ``iter + 1 >= max_iter``, which also holds
    when the last iteration raised (``TrainerBase.train`` leaves ``iter == max_iter``
    only after a completed run). Evaluating then gathers results from all processes, so
    the failing process waits there, the others wait in their backward pass for it, and
    the run hangs until the process group's timeout (30 minutes) instead of ending.
    """

    def after_train(self):
        if self.trainer.iter < self.trainer.max_iter:  # the run failed
            return
        super().after_train()


def no_eval_after_failure(hook_list):
    """``hook_list`` with Detectron2's EvalHook replaced by :class:`EvalHook` (same period and function)."""
    return [EvalHook(*eval_hook_arguments(h)) if type(h) is hooks.EvalHook else h for h in hook_list]
