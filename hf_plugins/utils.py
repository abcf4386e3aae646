"""Small helpers shared across the library, with no dependency on the rest of it."""

from __future__ import annotations

import atexit
import numbers
import os
import threading
import time

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


def _other_threads_running(main_thread_id: int) -> bool | None:
    """Whether any thread of this process but `main_thread_id` is running or runnable (state `R` in
    `/proc/self/task/<tid>/stat`), or None where the kernel does not tell (not Linux)."""
    try:
        thread_ids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for thread_id in thread_ids:
        if int(thread_id) == main_thread_id:
            continue
        try:
            with open(f"/proc/self/task/{thread_id}/stat") as handle:
                stat = handle.read()
        except OSError:  # the thread has just exited
            continue
        if stat[stat.rindex(")") + 2] == "R":  # the state follows the command name, which may hold spaces
            return True
    return False


def wait_for_threads_to_idle(timeout: float = 5.0, interval: float = 0.005) -> bool | None:
    """Wait, releasing the GIL, until no other thread of this process is running or runnable, twice in a row, or until
    `timeout` seconds have passed; True if they went idle. Where the kernel does not report thread states, wait
    `interval` ten times and return None."""
    main_thread_id = threading.get_native_id()
    quiet_checks = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(interval)  # lets a thread that waits for the GIL take it and finish
        running = _other_threads_running(main_thread_id)
        if running is None:
            time.sleep(9 * interval)
            return None
        quiet_checks = 0 if running else quiet_checks + 1
        if quiet_checks == 2:
            return True
    return False


def _tear_down_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Destroying the group does not stop gloo's worker threads: they live as long as the group's C++ object, which
    # the DDP wrapper still holds. A worker that has just finished the run's last collective still has to drop its
    # tensors, and dropping a tensor that Python created takes the GIL. If interpreter finalisation has begun by then,
    # Python ends that thread inside the work's destructor, which is noexcept, and the process aborts with "terminate
    # called without an active exception" after training succeeded (on a loaded machine, where the worker is
    # descheduled for long enough). So let every thread finish what it is doing before finalisation starts.
    wait_for_threads_to_idle()


def destroy_process_group_at_exit() -> None:
    """At interpreter exit, destroy the default process group (if the script has not destroyed it itself) and let the
    process's threads finish their work before interpreter finalisation begins.

    gloo's worker threads outlive `destroy_process_group()` (the DDP wrapper keeps the group alive) and drop the
    tensors of the last collective some time after it completed. A thread that needs the GIL after finalisation
    has begun is ended by Python, which inside the collective's (noexcept) destructor aborts the process: "terminate
    called without an active exception" after a successful run. The `atexit` handler runs while the interpreter is
    still whole, after everything the script does with the other processes. Destroying a group is local (no
    collective), so it cannot wait on a rank that has already left, and the wait for idle threads is bounded (5 s).
    Idempotent; a no-op outside distributed runs.
    """
    global _teardown_registered
    if _teardown_registered or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    atexit.register(_tear_down_process_group)
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
