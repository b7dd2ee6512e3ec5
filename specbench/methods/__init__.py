"""Speculative decoding methods, one module each, registered as `specbench.methods` entry points."""

from .base import ENTRY_POINT_GROUP, Drafter, DrafterBase, Method, available_methods, get_method

__all__ = ["ENTRY_POINT_GROUP", "Drafter", "DrafterBase", "Method", "available_methods", "get_method"]
