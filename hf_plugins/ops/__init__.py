"""The fused linear loss head: one primitive, several backends, every method."""

from .dispatch import BACKENDS, fused_linear_loss
from .method import Chunk, LogitTransform, LossMethod, Rows, Targets

__all__ = ["BACKENDS", "Chunk", "LogitTransform", "LossMethod", "Rows", "Targets", "fused_linear_loss"]
