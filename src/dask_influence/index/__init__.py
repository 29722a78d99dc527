"""The gradient index: projected training gradients on disk, scored against any number of test sets.

See :class:`GradientIndex` and ``docs/gradient-index.md``.
"""

from .gradient_index import PRECONDITIONERS, GradientIndex, TopK
from .layout import is_index
from .projector import Projector

__all__ = ["PRECONDITIONERS", "GradientIndex", "Projector", "TopK", "is_index"]
