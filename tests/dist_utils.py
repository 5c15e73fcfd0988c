"""Run a function in real ``torch.distributed`` processes (gloo on CPU, NCCL on GPUs), never a mock.

Example:
    def _body(rank: int, world_size: int, out: dict) -> None:
        ...  # torch.distributed is initialised here
    results = run_distributed(_body, world_size=2)   # one return value per rank

``guard_collectives()`` (on by default in ``run_distributed``; a context manager for Lightning
scripts) makes gloo as strict as NCCL: a collective during a Lightning setup hook, on a tensor
off ``group_device(group)`` or non-contiguous fails the test.
"""

from __future__ import annotations

import datetime
import functools
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from statplug.distributed.group import group_device


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    out_dir: str,
    guard: bool,
    group_timeout: float | None,
    backend: str | None,
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    options: dict[str, Any] = {}
    if group_timeout is not None:  # a hang becomes an error on the rank that waits
        options["timeout"] = datetime.timedelta(seconds=group_timeout)
    if backend == "nccl":
        torch.cuda.set_device(rank)  # one GPU per rank, as a launcher sets it
    dist.init_process_group(backend, rank=rank, world_size=world_size, **options)
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        with guard_collectives() if guard else nullcontext():
            result = fn(rank, world_size, *args)
        with open(path, "wb") as f:
            pickle.dump(("ok", result), f)
        dist.barrier()  # no rank leaves while another still finishes its last collective
    except BaseException as err:  # report to the parent, which re-raises
        with open(path, "wb") as f:
            pickle.dump(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"), f)
    # Leave without torch's gloo teardown: with DDP it aborts the process now and then
    # ("terminate called without an active exception"; measured 4 in 30 runs of a plain DDP
    # model with no statplug code at all). Everything the parent needs is in the file.
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout: float = 120.0,
    guard: bool = True,
    group_timeout: float | None = None,
    backend: str | None = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    ``fn`` must be a module-level function (it is pickled into spawned processes). An exception on
    any rank is re-raised here as ``RuntimeError`` carrying that rank's traceback. With ``guard``
    every collective runs under :func:`guard_collectives`; ``group_timeout`` (seconds) is the
    process group's own timeout, so a rank waiting for a collective its peers skip fails there.
    ``backend="nccl"`` (CUDA tests) gives rank ``r`` the GPU ``r``; None gives torch's defaults.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, port, fn, args, out_dir, guard, group_timeout, backend),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"distributed test did not finish within {timeout} s (a hang)")
        results: list[Any] = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results


# ------------------------------------------------------------------ the collective guard
# Collectives that take tensors, and where their tensors are: (positional index, keyword).
_GUARDED: dict[str, tuple[int, str]] = {
    "all_reduce": (0, "tensor"),
    "broadcast": (0, "tensor"),
    "reduce": (0, "tensor"),
    "all_gather": (1, "tensor"),  # the output list is checked too, below
    "all_gather_into_tensor": (1, "input_tensor"),
    "reduce_scatter_tensor": (1, "input"),
    "all_to_all_single": (1, "input"),
}
_OUTPUTS: dict[str, tuple[int, str]] = {
    "all_gather": (0, "tensor_list"),
    "all_gather_into_tensor": (0, "output_tensor"),
    "reduce_scatter_tensor": (0, "output"),
    "all_to_all_single": (0, "output"),
}


class CollectiveMisuse(AssertionError):
    """A collective statplug (or a test) made that NCCL would refuse or that would hang."""


def _in_callback_setup() -> str | None:
    """The Lightning setup hook on the stack, if any: collectives there run before the strategy
    moved the model to its device (``Trainer._run`` calls ``Callback.setup`` before
    ``strategy.setup``)."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_call_setup_hook":
            return "Lightning's setup hooks (`_call_setup_hook`)"
        if code.co_name == "setup":
            owner = frame.f_locals.get("self")
            if owner is not None and any(c.__name__ == "Callback" for c in type(owner).__mro__):
                return f"{type(owner).__name__}.setup"
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for t in value if isinstance(t, torch.Tensor)]
    return []


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], where: tuple[int, str]) -> Any:
    index, key = where
    return args[index] if len(args) > index else kwargs.get(key)


def _check_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    hook = _in_callback_setup()
    if hook is not None:
        raise CollectiveMisuse(
            f"dist.{name} ran inside {hook}: the strategy has not moved the model to its device "
            "yet (NCCL would refuse the CPU tensors); run it in on_fit_start or later"
        )
    expected = group_device(kwargs.get("group"))
    tensors = _tensors(_argument(args, kwargs, _GUARDED[name]))
    if name in _OUTPUTS:
        tensors += _tensors(_argument(args, kwargs, _OUTPUTS[name]))
    for t in tensors:
        if t.device != expected:
            raise CollectiveMisuse(
                f"dist.{name}: a {tuple(t.shape)} {t.dtype} tensor on {t.device}, expected "
                f"group_device(group) = {expected}; move it there before the collective"
            )
        if not t.is_contiguous():
            raise CollectiveMisuse(
                f"dist.{name}: a non-contiguous {tuple(t.shape)} tensor (NCCL needs contiguous "
                "memory); pass `.contiguous()`"
            )


@contextmanager
def guard_collectives() -> Iterator[list[str]]:
    """Inside, ``torch.distributed``'s tensor collectives still run (the real gloo ones), but
    each first fails with :class:`CollectiveMisuse` when it runs during a Lightning setup hook,
    or when a tensor is not on ``group_device(group)`` or not contiguous -- the mistakes NCCL
    catches and gloo lets through. Yields the names of the collectives called, in order."""
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in _GUARDED}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            _check_call(name, args, kwargs)
            calls.append(name)
            return fn(*args, **kwargs)

        return guarded

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
