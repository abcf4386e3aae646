"""The fused linear loss head: one primitive, several backends, every method.

`fused_linear_loss` is the head's entry point: it resolves a method given by name among the methods of
`hf_plugins.losses`, which are written against this package's method interface (`LossMethod`, `Rows`, `Targets`,
`Chunk`). So the entry point sits above the method math and the rest of this package below it; it is loaded on first
use, and importing the interface (as every method module does) never imports the methods back.
"""

from typing import TYPE_CHECKING

from .method import Chunk, LogitTransform, LossMethod, Rows, Targets


if TYPE_CHECKING:  # the lazy exports, for type checkers, IDEs and the API docs
    from .dispatch import BACKENDS, fused_linear_loss

#: Names loaded on first use, and the module of this package that defines each
_LAZY_EXPORTS = {"BACKENDS": "dispatch", "fused_linear_loss": "dispatch"}

__all__ = ["BACKENDS", "Chunk", "LogitTransform", "LossMethod", "Rows", "Targets", "fused_linear_loss"]


def __getattr__(name):
    if name in _LAZY_EXPORTS:
        from . import dispatch

        value = getattr(dispatch, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_plugins.ops' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY_EXPORTS])
