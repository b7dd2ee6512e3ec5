"""Draft heads: the protocol every feature-level draft head implements, a registry of architectures,
and their one strict checkpoint format.

A draft head (EAGLE's, FSPAD's, ...) reads the target's last-layer features and the next tokens and
predicts the next features; the tree drafters (`specbench.methods.head_drafters`) and the trainer
drive any registered head through `DraftHead`, so a new head is a module plus a `HeadArch` record.

Checkpoint directory: ``config.json`` (the architecture's own config keys, plus ``specbench_head``
naming the architecture; an official checkpoint names none and is read as the architecture its
method asks for, ``eagle`` when none asks) and ``model.safetensors`` or ``pytorch_model.bin``.
Loading is strict: a missing or unexpected key or a shape that differs from what the config
describes is a `CheckpointError` naming them. Keys that copy a target weight (EAGLE's trainer saves
``embed_tokens.weight``) are checked against the target (a head trained for another target is
refused) and dropped: the target's own module is used.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..artifacts import atomic_path, sha256_file, sha256_json, write_text
from ..errors import SpecbenchError

__all__ = [
    "ARCH_KEY",
    "DRAFT_VOCAB_FILE",
    "CheckpointError",
    "DraftHead",
    "HeadArch",
    "LoadedHead",
    "checkpoint_sha256",
    "head_arch",
    "head_architectures",
    "load_head",
    "read_checkpoint_config",
    "read_weights",
    "state_mismatch",
    "register_head",
    "save_head",
    "target_name",
    "target_parts",
    "weights_file",
]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ARCH_KEY = "specbench_head"  # config.json key naming the architecture
# Optional file of a checkpoint directory: token ids, most frequent first (written by training; ranks the
# drafters' reduced draft vocabulary).
DRAFT_VOCAB_FILE = "draft_vocab.json"
# Relative Frobenius distance allowed between a checkpoint's copy of a target weight and the target's
# (covers fp16/bf16 storage and GGUF re-quantisation of the same weights).
COPY_RTOL = 2e-2


class CheckpointError(SpecbenchError):
    """A draft checkpoint is missing, malformed, or does not match the target."""


class DraftHead(Protocol):
    """What the tree drafters and the trainer need of a draft head (an nn.Module).

    ``out = head(input_ids, features, position_ids, attention_mask=None, past_key_values=None)``:
    input_ids (B, T) the token after each feature's position, features (B, T, H), 4D bool/additive or
    2D padding masks as EAGLE's head takes them; `out` is whatever the head produces per position.
    `token_features(out)` go through the target's LM head (`logits`) to score the next token;
    `next_features(out)` are fed back as the features of the next draft depth.
    """

    hidden_size: int
    vocab_size: int

    def __call__(self, input_ids: torch.Tensor, features: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, past_key_values: Any = None) -> torch.Tensor: ...

    @property
    def lm_head(self) -> nn.Linear: ...

    @property
    def embed_tokens(self) -> nn.Embedding: ...

    def token_features(self, out: torch.Tensor) -> torch.Tensor: ...

    def next_features(self, out: torch.Tensor) -> torch.Tensor: ...

    def logits(self, features: torch.Tensor) -> torch.Tensor: ...

    # A head trained over a reduced draft vocabulary: the target id of each draft id (None: the full
    # vocabulary), and the LM-head rows `logits` scores, in draft-id order.
    @property
    def draft_ids(self) -> torch.Tensor | None: ...

    def scored_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class HeadArch:
    """A registered draft-head architecture.

    `build(target, config)`: a randomly initialised head for `target` (a specbench Target or an HF causal
    LM) from a checkpoint's config.json dict (None: the architecture's defaults for the target), on the
    target's device and in its dtype; it raises CheckpointError for a config that does not fit the target.
    `config(head)`: the config.json dict that rebuilds it. `copies`: checkpoint keys that duplicate a target
    weight, -> a function of the target giving that weight. `key_hint(config, differing keys)`: a
    clause for the error when a config flag decides which keys exist.
    """

    name: str
    build: Callable[[Any, dict | None], nn.Module]
    config: Callable[[nn.Module], dict]
    copies: dict[str, Callable[[Any], torch.Tensor]] = field(default_factory=dict)
    description: str = ""
    key_hint: Callable[[dict, list[str]], str] = lambda cfg, keys: ""  # why those keys differ, from config.json


@dataclass
class LoadedHead:
    """A head loaded from a checkpoint: where it came from and what identifies it in results files."""

    head: nn.Module
    arch: str
    source: Path | None = None  # the checkpoint directory (None: built in memory)
    weights_sha256: str | None = None
    draft_vocab_file: Path | None = None  # DRAFT_VOCAB_FILE of the directory, when present


# ------------------------------------------------------------------ registry

# Built-in architectures by module: imported on first use, so this module needs none of them.
_BUILTIN = {"eagle": "specbench.models.eagle_head:EAGLE_ARCH", "fspad": "specbench.models.fspad_head:FSPAD_ARCH"}
_ARCHS: dict[str, HeadArch] = {}


def register_head(arch: HeadArch) -> HeadArch:
    """Register a draft-head architecture (a plugin's or a built-in one) under `arch.name`."""
    if arch.name in _ARCHS and _ARCHS[arch.name] is not arch:
        raise ValueError(f"draft head architecture {arch.name!r} is already registered")
    _ARCHS[arch.name] = arch
    return arch


def head_arch(name: str) -> HeadArch:
    if name not in _ARCHS and name in _BUILTIN:
        module, attr = _BUILTIN[name].split(":")
        register_head(getattr(importlib.import_module(module), attr))
    if name not in _ARCHS:
        raise CheckpointError(f"unknown draft head architecture {name!r}; known: {', '.join(head_architectures())}")
    return _ARCHS[name]


def head_architectures() -> list[str]:
    return sorted({*_BUILTIN, *_ARCHS})


def target_name(target) -> str:
    """How error messages name `target` (a specbench Target or an HF causal LM)."""
    cfg = getattr(target, "config", None)
    return getattr(target, "name", "") or getattr(cfg, "_name_or_path", "") or "the target"


def target_parts(target) -> tuple[Any, nn.Embedding, nn.Linear, Any]:
    """(config, embed_tokens, lm_head, decoder body) of a specbench Target or an HF causal LM."""
    model = getattr(target, "model", None)
    if model is not None and hasattr(target, "body") and hasattr(target, "head"):
        return target.config, model.get_input_embeddings(), target.head, target.body
    if hasattr(target, "get_input_embeddings") and hasattr(target, "get_output_embeddings"):
        body = target.get_decoder() if hasattr(target, "get_decoder") else None
        return target.config, target.get_input_embeddings(), target.get_output_embeddings(), body
    raise TypeError(f"expected a specbench Target or a transformers causal LM, got {type(target).__name__}")


# ------------------------------------------------------------------ files


def weights_file(d: Path) -> Path:
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            return d / name
    raise CheckpointError(f"no draft weights in {d}: expected one of {', '.join(WEIGHT_FILES)}; train a head with "
                          "`specbench train --method M ...`")


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"draft checkpoint {d} is not a directory (expected config.json + "
                              "model.safetensors or pytorch_model.bin)")
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"draft checkpoint {d} has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg_file}: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file} is not a JSON object")
    return cfg


def read_weights(f: Path) -> dict[str, torch.Tensor]:
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(f), device="cpu")
        else:
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - many loader error types, one clear message
        raise CheckpointError(f"cannot read draft weights {f}: {type(e).__name__}: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{f} is not a flat state dict of tensors")
    return sd


def state_mismatch(given: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> list[str]:
    """What keeps state dict `given` from loading where `wanted` is expected: missing and unexpected keys
    and shape mismatches, one phrase each (empty when it fits)."""
    missing, unexpected = sorted(set(wanted) - set(given)), sorted(set(given) - set(wanted))
    bad = sorted(k for k in set(wanted) & set(given) if tuple(given[k].shape) != tuple(wanted[k].shape))
    parts = [f"missing key(s): {', '.join(missing)}"] if missing else []
    parts += [f"unexpected key(s): {', '.join(unexpected)}"] if unexpected else []
    return parts + [f"{k}: shape {tuple(given[k].shape)} vs {tuple(wanted[k].shape)}" for k in bad]


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of the checkpoint's weight file (what results files record as the draft hash)."""
    return sha256_file(weights_file(Path(path)))


def checkpoint_provenance(path: str | os.PathLike | None) -> dict | None:
    """How a trained checkpoint was made, from its MANIFEST.json, for results files: the training `seed`,
    the head's `variant` (None: the method's main arm), the `data` it was trained on, the `epochs`, a hash
    of the rest of its training options (`recipe`) and the `draft_vocab` size it was trained over.
    Claims compare methods only when their heads share data and epochs, and spread over seeds. None when
    the directory has no manifest (a converted or hand-made head), or `path` is no directory."""
    if path is None or not (Path(path) / "MANIFEST.json").is_file():
        return None
    try:
        man = json.loads((Path(path) / "MANIFEST.json").read_text())
        data, training = man.get("data") or {}, man.get("training") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(data, dict) or not isinstance(training, dict):
        return None
    # the data's identity: a corpus is its content hash; a raw source is its id plus the selection
    corpus = data.get("corpus") if isinstance(data.get("corpus"), dict) else None
    ident = (f"corpus:sha256={corpus.get('content_sha256')}" if corpus else
             f"{data.get('source_id')} start={data.get('start', 0)} conversations={data.get('conversations_used')} "
             f"max_tokens={data.get('max_tokens')}")
    seed = man.get("seed", training.get("seed"))
    # the recipe: every training option but the seed and the run's bookkeeping, so that two seeds of one arm
    # can be checked to share it (a learning rate that differs would make their spread no seed spread)
    recipe = {k: v for k, v in training.items() if k not in _BOOKKEEPING}
    return {"method": man.get("method"), "variant": man.get("variant"), "seed": seed, "data": ident,
            "tokens": data.get("tokens"), "epochs": training.get("epochs"), "max_steps": training.get("max_steps"),
            "recipe": sha256_json({"training": recipe, "max_tokens": data.get("max_tokens")})[:16],
            # the draft vocabulary it was trained over, and drafts over when it keeps the mapping (0: all)
            "draft_vocab": (training.get("task") or {}).get("draft_vocab") if isinstance(training.get("task"), dict)
            else None}


# fused_adamw: how the update ran (the same algorithm either way, and a property of the device), not the recipe
_BOOKKEEPING = ("seed", "save_every", "log_every", "steps", "finished", "resumed_from_step", "train_seconds",
                "fused_adamw")


def _what_to_do(target_name: str) -> str:
    who = f" for {target_name}" if target_name else ""
    return f"use a draft checkpoint trained{who} (or train one with `specbench train --method M ...`)"


def _check_copy(key: str, ckpt: torch.Tensor, ref: torch.Tensor, wfile: Path, tname: str) -> None:
    if tuple(ckpt.shape) != tuple(ref.shape):
        raise CheckpointError(f"{wfile}: {key} has shape {tuple(ckpt.shape)} but {tname}'s is {tuple(ref.shape)}; "
                              f"{_what_to_do(tname)}")
    a = ckpt.detach().to("cpu", torch.float32)
    b = ref.detach().to("cpu", torch.float32)
    rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
    if not rel <= COPY_RTOL:
        raise CheckpointError(f"{wfile}: {key} differs from {tname}'s (relative distance {rel:.3g} > {COPY_RTOL}): "
                              f"the head was trained for another target; {_what_to_do(tname)}")


def load_head(path: str | os.PathLike, target, arch: str | None = None) -> LoadedHead:
    """Load a draft head for `target` (a specbench Target or an HF causal LM), strictly.

    The architecture is config.json's ``specbench_head``; `arch`, when given, must match it. A config.json
    that names none (an official checkpoint) holds an `arch` head, or an ``eagle`` head when `arch` is None.
    Weights are cast to the target's dtype; the head is in eval mode without gradients.
    """
    d = Path(path)
    cfg = read_checkpoint_config(d)
    tname = target_name(target)
    name = str(cfg.get(ARCH_KEY) or arch or "eagle")  # official checkpoints name no architecture
    if arch is not None and name != arch:
        raise CheckpointError(f"draft checkpoint {d} holds a {name} head, not a {arch} head; pass a {arch} checkpoint")
    spec = head_arch(name)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in spec.build(_MetaTarget(target), cfg).trainable_state_dict().items()}
    wfile = weights_file(d)
    sd = read_weights(wfile)
    for key, ref in spec.copies.items():
        if key in sd:
            _check_copy(key, sd.pop(key), ref(target), wfile, tname)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = [f"missing key(s): {', '.join(missing)}"] if missing else []
        parts += [f"unexpected key(s): {', '.join(unexpected)}"] if unexpected else []
        hint = spec.key_hint(cfg, missing + unexpected)
        raise CheckpointError(f"draft checkpoint {wfile} does not match an {name} head{hint}: " + "; ".join(parts)
                              + f"; {_what_to_do(tname)}")
    bad = [k for k, shape in expected.items() if tuple(sd[k].shape) != shape]
    if bad:
        shapes = "; ".join(f"{k}: checkpoint {tuple(sd[k].shape)} vs expected {expected[k]}" for k in bad)
        raise CheckpointError(f"draft checkpoint {wfile} has wrong shapes ({shapes}); its config.json does "
                              f"not describe its weights{spec.key_hint(cfg, bad)}")
    head = spec.build(target, cfg)
    own = head.state_dict()
    head.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in sd.items()}}, strict=True)
    validate = getattr(head, "validate_state", None)  # state a head checks beyond key names and shapes
    if validate is not None:
        try:
            validate()
        except CheckpointError as e:
            raise CheckpointError(f"draft checkpoint {wfile}: {e}") from None
    head.eval()
    head.requires_grad_(False)
    vocab = d / DRAFT_VOCAB_FILE
    return LoadedHead(head, name, d, sha256_file(wfile), vocab if vocab.is_file() else None)


class _MetaTarget:
    """The target's parts as meta tensors: builds a probe head (for its key shapes) without memory."""

    def __init__(self, target):
        self.name = getattr(target, "name", "")
        self.config, embed, lm_head, self._body = target_parts(target)
        w = embed.weight
        self._embed = nn.Embedding(w.shape[0], w.shape[1], device="meta", dtype=w.dtype)
        w = lm_head.weight
        self._lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)

    def get_input_embeddings(self) -> nn.Embedding:
        return self._embed

    def get_output_embeddings(self) -> nn.Linear:
        return self._lm_head

    def get_decoder(self):
        return self._body


def save_head(head: nn.Module, arch: str, path: str | os.PathLike, extra_config: dict | None = None) -> None:
    """Write `config.json` + `model.safetensors` (trainable weights only) atomically into `path`."""
    from safetensors.torch import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    cfg = {**head_arch(arch).config(head), ARCH_KEY: arch, **(extra_config or {})}
    sd = {k: v.detach().to("cpu").contiguous() for k, v in head.trainable_state_dict().items()}
    with atomic_path(d / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    write_text(d / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    stale = d / "pytorch_model.bin"
    if stale.exists():
        stale.unlink()  # model.safetensors is now the one weight file
