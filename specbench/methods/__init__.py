"""Speculative decoding methods, one module each, registered as `specbench.methods` entry points.

`catalogue` names every method the papers' tables use (implemented or not); importing this
package or the catalogue needs no torch (the method modules do).
"""

from .base import (
    ENTRY_POINT_GROUP,
    Drafter,
    DrafterBase,
    Method,
    available_methods,
    get_method,
)
from .catalogue import Identity

__all__ = ["ENTRY_POINT_GROUP", "Drafter", "DrafterBase", "Identity", "Method", "available_methods", "get_method"]
