"""Multi-process training on CPU-only machines, and its faults in one line.

Detectron2 v0.6's ``launch`` hard-codes the NCCL backend and a CUDA device per
process, and ``create_ddp_model`` (v0.6 and current) always passes ``device_ids``,
which DistributedDataParallel rejects for CPU modules. With a GPU, Detectron2's
own functions are used unchanged; without one, the variants below run N gloo
processes on CPU.

Faults: a ``--dist-url`` port already in use on this machine is one line before any
process starts. On CPU, a process that fails records its rank in the process group's
store and aborts its connections, so that the processes of every machine, waiting for
it in a collective, stop within seconds (instead of at the process group's timeout)
with "another process failed (rank K): see its output".
"""
import contextlib
import errno
import gc
import logging
import os
import socket
import time
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults as d2_defaults
from detectron2.engine.launch import launch as _d2_launch
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..compat import (create_local_process_group, default_store, find_free_port, process_groups,
                      release_detectron2_process_groups)
from ..errors import OSFaultError, PeerFailedError, ProcessDiedError
from ..cli import quiet_logging_errors

__all__ = ["launch", "check_port", "create_ddp_model", "cpu_ddp_for_trainer", "destroy_process_group"]

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT = timedelta(minutes=30)
# the process group's store keys of a failure: the failing rank, and the peers that read it
FAILED_RANK_KEY, ACK_KEY = "fpn_rpn/failed_rank", "fpn_rpn/failure_seen"
# how long a failing process keeps the store (rank 0 hosts it) for its peers to read its rank
ACK_WAIT_S = 10.0
# what gloo says in a peer when a process's connections close
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None,
           args=(), timeout=DEFAULT_TIMEOUT):
    """
    Same arguments as :func:`detectron2.engine.launch`. With CUDA available, it is
    that function. Without CUDA, ``num_gpus_per_machine`` is the number of CPU
    processes per machine, joined with the gloo backend.

    When a process fails, torch stops the others on this machine and re-raises its
    exception; a process that dies without one (killed, for instance by the system
    when memory runs out) is a :class:`ProcessDiedError`.
    The port of ``dist_url`` is checked first on machine 0 (:func:`check_port`).
    """
    if num_machines * num_gpus_per_machine > 1 and machine_rank == 0:
        check_port(dist_url)
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
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    logger.info("No CUDA device: running %d CPU processes per machine with the gloo backend",
                num_gpus_per_machine)
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


def check_port(dist_url) -> None:
    """
    Raise OSFaultError when ``dist_url`` (tcp://HOST:PORT) names a port in use on this machine,
    before any process starts (torch would fail after spawning them, with a long traceback
    ending in EADDRINUSE). A HOST that is not an address of this machine is not checked.
    """
    if not dist_url or not dist_url.startswith("tcp://"):
        return
    url = urlparse(dist_url)
    try:
        host, port = url.hostname, url.port
    except ValueError:
        port = None
    if not host or not port:
        raise OSFaultError(f"--dist-url {dist_url}: expected tcp://HOST:PORT, or auto")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store binds it
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise OSFaultError(f"port {port} on {host} is in use (--dist-url {dist_url}): pick another "
                                   "or use --dist-url auto") from e
            # another machine's address (EADDRNOTAVAIL) or a name to resolve: torch reports it


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args,
                timeout):
    quiet_logging_errors()  # as run_cli does in the launching process
    rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=rank,
                            timeout=timeout)
    store = default_store()  # where a failing process records its rank
    try:
        create_local_process_group(num_per_machine, machine_rank)
        # processes share the cores instead of each starting one thread per core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_per_machine))
        comm.synchronize()
        main_func(*args)
    except Exception as e:
        if _peer_gone(e):
            _stop_for_peer(store, num_per_machine, machine_rank, e)
        _announce_failure(store, rank, world_size)
        raise
    destroy_process_group()


def _peer_gone(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it comes from) is gloo's "another process closed its connections"."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RuntimeError) and any(words in str(error) for words in PEER_GONE):
            return True
        error = error.__cause__ or error.__context__
    return False


def _stop_for_peer(store, num_per_machine: int, machine_rank: int, error: BaseException) -> None:
    """Raise PeerFailedError naming the failed rank, read from the store (unknown if the store is gone)."""
    try:
        store.set_timeout(timedelta(seconds=5))
        failed = int(store.get(FAILED_RANK_KEY))
        store.add(ACK_KEY, 1)
    except Exception:  # no rank recorded (a process killed), or rank 0 and its store are gone
        failed = None
    if failed is not None and failed // num_per_machine == machine_rank:
        # a process of this machine: torch.multiprocessing reports its error once it has exited,
        # and ends this one; raising here could be reported first
        time.sleep(ACK_WAIT_S + 30)
    which = f"rank {failed}" if failed is not None else "its connection closed"
    raise PeerFailedError(f"another process failed ({which}): see its output") from error


def _announce_failure(store, rank: int, world_size: int) -> None:
    """Record ``rank`` as failed in the store and abort this process's connections, so that the
    peers' collectives fail now; rank 0, which hosts the store, waits (a while) for them to read it."""
    try:
        store.set_timeout(timedelta(seconds=5))
        store.set(FAILED_RANK_KEY, str(rank))
    except Exception:
        store = None
    for group in process_groups():
        with contextlib.suppress(Exception):
            group.abort()
    with contextlib.suppress(Exception):
        destroy_process_group()
    if store is None or rank != 0:
        return
    deadline = time.monotonic() + ACK_WAIT_S
    with contextlib.suppress(Exception):
        while store.add(ACK_KEY, 0) < world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.05)


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
    release_detectron2_process_groups()
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
