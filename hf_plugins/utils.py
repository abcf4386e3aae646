"""Small helpers shared across the library, with no dependency on the rest of it."""

from __future__ import annotations

import atexit
import numbers
import os

import torch
from accelerate.logging import MultiProcessAdapter
from accelerate.logging import get_logger as accelerate_get_logger
from accelerate.state import PartialState


_teardown_registered = False


class _MainProcessLogger(MultiProcessAdapter):
    """accelerate's logger, which logs on the main process only, also before anything has set up accelerate's state
    (a library function called outside any trainer): then there is one process as far as this one knows, and the
    record goes to the underlying logger as is. accelerate's own adapter raises a `RuntimeError` there."""

    def log(self, level, msg, *args, **kwargs):
        if PartialState._shared_state:
            kwargs.setdefault("stacklevel", 3)  # point at the caller, past this override and accelerate's `log`
            super().log(level, msg, *args, **kwargs)
            return
        kwargs.pop("main_process_only", None)
        kwargs.pop("in_order", None)
        kwargs.setdefault("stacklevel", 2)
        self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> MultiProcessAdapter:
    """The logger of module `name`: accelerate's, so that under several processes only the main one logs (as TRL's
    trainers log); `main_process_only=False` logs on every process. Usable before any `Accelerator` exists."""
    return _MainProcessLogger(accelerate_get_logger(name).logger, {})


def is_integer(value) -> bool:
    """Whether `value` is an `int` and not a `bool` (which Python counts as one, but `True` is no count or seed)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value) -> bool:
    """Whether `value` is a real number (int, float, numpy scalar) and not a `bool`."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, if the script has not destroyed it itself.

    A process that exits with a live gloo process group leaves gloo's worker threads to be torn down during
    interpreter finalisation, when their pending work (tensors holding Python references) can no longer take the GIL:
    the process then aborts with "terminate called without an active exception" after training succeeded. An `atexit`
    handler runs while the interpreter is still whole, after everything the script does with the other processes.
    Destroying a group is local (no collective), so it cannot wait on a rank that has already left. Idempotent; a no-op
    outside distributed runs and for scripts that call `destroy_process_group()` (or `Trainer.end()`) themselves.
    """
    global _teardown_registered
    if _teardown_registered or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    atexit.register(_destroy_process_group)
    _teardown_registered = True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, or anywhere under the Triton interpreter (tests on CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or interpreter_enabled()
