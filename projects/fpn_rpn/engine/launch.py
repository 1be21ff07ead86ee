"""Multi-process training on CPU-only machines.

Detectron2 v0.6's ``launch`` hard-codes the NCCL backend and a CUDA device per
process, and ``create_ddp_model`` (v0.6 and current) always passes ``device_ids``,
which DistributedDataParallel rejects for CPU modules. With a GPU, Detectron2's
own functions are used unchanged; without one, the variants below run N gloo
processes on CPU.
"""
import contextlib
import gc
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults as d2_defaults
from detectron2.engine.launch import _find_free_port
from detectron2.engine.launch import launch as _d2_launch
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..errors import ProcessDiedError

__all__ = ["launch", "create_ddp_model", "cpu_ddp_for_trainer", "destroy_process_group"]

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT = timedelta(minutes=30)


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None,
           args=(), timeout=DEFAULT_TIMEOUT):
    """
    Same arguments as :func:`detectron2.engine.launch`. With CUDA available, it is
    that function. Without CUDA, ``num_gpus_per_machine`` is the number of CPU
    processes per machine, joined with the gloo backend.

    When a process fails, torch stops the others on this machine and re-raises its
    exception; a process that dies without one (killed, for instance by the system
    when memory runs out) is a :class:`ProcessDiedError`.
    """
    try:
        return _launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout)
    except mp.ProcessExitedException as e:
        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with status {e.exit_code}"
        # the kernel's out-of-memory killer sends SIGKILL
        oom = " (as the system does when memory runs out: see dmesg)" if e.signal_name == "SIGKILL" else ""
        raise ProcessDiedError(
            f"process {e.error_index} of the {num_gpus_per_machine} on this machine {how}{oom} without a "
            "Python error; the others were stopped; training continues from its last checkpoint with --resume"
        ) from e


def _launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout):
    if torch.cuda.is_available():
        return _d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank,
                                dist_url, args=args, timeout=timeout)
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    logger.info("No CUDA device: running %d CPU processes per machine with the gloo backend",
                num_gpus_per_machine)
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


def _create_local_process_group(num_per_machine: int, machine_rank: int):
    if hasattr(comm, "create_local_process_group"):  # current Detectron2
        comm.create_local_process_group(num_per_machine)
        return
    # Detectron2 v0.6 keeps the group in a module variable
    for i in range(dist.get_world_size() // num_per_machine):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args,
                timeout):
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                            rank=machine_rank * num_per_machine + local_rank, timeout=timeout)
    _create_local_process_group(num_per_machine, machine_rank)
    # processes share the cores instead of each starting one thread per core
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_per_machine))
    comm.synchronize()
    main_func(*args)
    destroy_process_group()


def destroy_process_group() -> None:
    """
    ``torch.distributed.destroy_process_group()``, and gloo's threads ended now.

    torch's function leaves the groups' C++ objects, and their threads (gloo_tcp_loop,
    pt_gloo_runloop), alive while Python objects refer to them, and Detectron2 keeps two:
    ``comm._get_global_gloo_group``'s cache (the default group, once ``comm.gather`` ran)
    and ``comm._LOCAL_PROCESS_GROUP``. They were then destroyed during interpreter shutdown
    with their threads still running, and the process sometimes ended with SIGABRT
    ("terminate called without an active exception") after its work was done.
    """
    dist.destroy_process_group()
    comm._get_global_gloo_group.cache_clear()
    if hasattr(comm, "_LOCAL_PROCESS_GROUP"):
        comm._LOCAL_PROCESS_GROUP = None
    gc.collect()  # the groups are freed here, joining their threads


def create_ddp_model(model, **kwargs):
    """:func:`detectron2.engine.create_ddp_model`, without ``device_ids`` for CPU models."""
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        return DistributedDataParallel(model, **kwargs)
    return _d2_create_ddp_model(model, **kwargs)


_d2_create_ddp_model = d2_defaults.create_ddp_model


@contextlib.contextmanager
def cpu_ddp_for_trainer():
    """While constructing a DefaultTrainer, wrap CPU models in DDP without device_ids."""
    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = _d2_create_ddp_model
