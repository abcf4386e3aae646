"""Small helpers shared across the library, with no dependency on the rest of it."""

from __future__ import annotations

import atexit
import os

import torch

_teardown_registered = False


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
