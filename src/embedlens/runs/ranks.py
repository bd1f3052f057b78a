"""Several processes on one run, through ``accelerate``'s :class:`~accelerate.PartialState`.

Under ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process
runs the same command; :func:`process_state` joins them (NCCL between GPUs, gloo on CPUs) and the
helpers here say who is who. In a plain ``python`` or ``embedlens`` process the world is one process
and every helper is a no-op. The run engine uses them so that:

* rank 0 alone checks and sets up the run directory (and holds its lock); a problem there (other
  settings, a live owner) is raised on every rank, so no process waits for the others forever;
* every rank classifies its contiguous share and commits its own parts;
* after a barrier, rank 0 merges the parts (:func:`on_main`), the others return None.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from embedlens.errors import InputError

if TYPE_CHECKING:
    from accelerate import PartialState

_T = TypeVar("_T")


def launched_world() -> int:
    """The number of processes the launcher describes in the environment (1 without one)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def process_state(cpu: bool | None = None) -> PartialState:
    """The shared :class:`~accelerate.PartialState` (created, and the process group joined, once).

    Args:
        cpu: Join with gloo on CPUs (None: when no GPU is available). Only the first call decides.
    """
    import torch
    from accelerate import PartialState

    if cpu is None:
        cpu = not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def join(device: object = None) -> None:
    """Join the launcher's processes (if any) before any collective call, with gloo when the model
    runs on the CPU (``device`` a :class:`torch.device` or its name; None: gloo when no GPU)."""
    if launched_world() > 1:
        process_state(cpu=None if device is None else str(device).startswith("cpu"))


def process_device(requested: str = "auto") -> str:
    """The device this process should load the model on: under several processes with GPUs and
    ``requested`` ``"auto"``/``"cuda"``, its own GPU (``cuda:LOCAL_RANK``); otherwise ``requested``."""
    import torch

    if launched_world() > 1 and requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{process_state(cpu=False).local_process_index}"
    return requested


def rank() -> int:
    """This process's index (0 without a launcher)."""
    return process_state().process_index if launched_world() > 1 else 0


def world_size() -> int:
    """The number of processes (1 without a launcher)."""
    return process_state().num_processes if launched_world() > 1 else 1


def is_main() -> bool:
    """Whether this is rank 0, the process that sets up, locks and merges a run."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in one process)."""
    if world_size() > 1:
        process_state().wait_for_everyone()


def on_main(work: Callable[[], _T], *, share: bool = False) -> _T | None:
    """Run ``work`` on rank 0 only and return its result there (None elsewhere; with ``share``, rank
    0's result, pickled, on every rank).

    An :class:`InputError` raised by ``work`` on rank 0 is raised on every rank, so that no process
    is left waiting for the others. Every rank must call this at the same point.
    """
    if world_size() == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    result: _T | None = None
    message: list[object] = [None, None]  # [problem, result when shared]
    if is_main():
        try:
            result = work()
        except InputError as exc:
            message[0] = str(exc)
        if share:
            message[1] = result
    broadcast_object_list(message, from_process=0)
    if message[0] is not None:
        raise InputError(str(message[0]))
    return message[1] if share else result  # type: ignore[return-value]
