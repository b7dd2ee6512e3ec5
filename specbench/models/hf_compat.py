"""How the project hands a KV cache to transformers modules across the supported versions.

Supported: transformers 4.56 up to the newest version tested (see pyproject.toml).  The KV cache
argument of a decoder (and of a decoder layer) is `past_key_values` in 4.56; later 5.x versions
renamed it `cache` and warn (FutureWarning) on the old name, which is to be removed.  The name is read
from the module's own forward signature rather than from the version number, so every model family
gets the name it accepts, whichever version renamed it.  (The other version differences the project
meets are sidestepped: target.BufferLayer keeps its own state instead of DynamicLayer's, and the
embedded model cache is written in a form every supported version loads, see loading.py.)
"""

from __future__ import annotations

import functools
import inspect

__all__ = ["cache_kwargs"]


@functools.cache
def _cache_arg(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters  # follows functools.wraps of transformers' decorators
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module, cache) -> dict:
    """Keyword arguments handing `cache` (a transformers Cache, or None for no caching) to `module`'s forward."""
    return {_cache_arg(type(module)): cache, "use_cache": cache is not None}
