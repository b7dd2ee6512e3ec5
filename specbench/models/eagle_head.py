"""The EAGLE draft head (EAGLE-1/EAGLE-2 architecture) and its checkpoint format.

Architecture (as SafeAILab/EAGLE `model/cnets.py`, EAGLE-1/2 versions):

    e_{t+1} = embed_tokens(x_{t+1})                      # the target's embedding, frozen
    h       = fc(cat(e_{t+1}, f_t))                      # Linear(2H -> H), embedding FIRST
    f^_{t+1} = DecoderLayer(h)                           # ONE layer of the target's architecture,
                                                         # its input_layernorm removed (identity)
    logits(x_{t+2}) = lm_head(f^_{t+1})                  # the target's LM head, frozen

`f_t` is the target's last hidden state at position t (the input of its LM head, i.e. after
the final norm), the draft predicts the next one.  The head sits at position t (its rotary
position and KV slot), so `input_ids[t]` is the token *after* the feature's position: EAGLE's
one-position shift.

The frozen embedding and LM head are the target's own modules, referenced, not registered:
`head.parameters()` / `head.state_dict()` hold only the trainable draft weights (fc.*,
layers.0.*), which are exactly the keys of an EAGLE checkpoint, and `head.to(...)` does not
move the target's modules (they live wherever the target is).

Checkpoint format (official EAGLE checkpoints for Vicuna / LLaMA2-Chat / LLaMA3-Instruct):
a directory with `config.json` (a Llama config of the one-layer draft: hidden_size,
vocab_size, intermediate_size, heads, rms_norm_eps, rope_theta, ... plus `bias`, the fc bias
flag, default True) and `pytorch_model.bin` or `model.safetensors` with the keys

    fc.weight, fc.bias (when bias), layers.0.self_attn.{q,k,v,o}_proj.weight,
    layers.0.mlp.{gate,up,down}_proj.weight, layers.0.post_attention_layernorm.weight

(no layers.0.input_layernorm).  Official checkpoints also carry `embed_tokens.weight`, a copy
of the target's embedding saved by EAGLE's trainer: it is accepted, checked against the
target's embedding (shape, and values to a relative tolerance: a head trained for another
target is refused) and then dropped: the target's own embedding is used.  Loading is strict:
any other missing or unexpected key, a shape, hidden-size or vocab mismatch is a
`CheckpointError` naming the key/size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifacts import atomic_path, sha256_file, write_text
from ..errors import SpecbenchError
from .hf_compat import cache_kwargs

__all__ = [
    "CheckpointError",
    "EagleHead",
    "load_eagle_checkpoint",
    "save_eagle_checkpoint",
    "read_checkpoint_config",
    "checkpoint_sha256",
]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
EMBED_KEY = "embed_tokens.weight"
# Relative Frobenius distance allowed between a checkpoint's embed_tokens copy and the
# target's embedding (covers fp16/bf16 storage and GGUF re-quantisation of the same weights).
EMBED_RTOL = 2e-2
# Optional file of an EAGLE checkpoint directory: token ids, most frequent first (written by training;
# ranks the drafters' reduced draft vocabulary).
DRAFT_VOCAB_FILE = "draft_vocab.json"


class CheckpointError(SpecbenchError):
    """A draft checkpoint is missing, malformed, or does not match the target."""


# ------------------------------------------------------------------ target access


def _target_parts(target) -> tuple[Any, nn.Embedding, nn.Linear, Any]:
    """(config, embed_tokens, lm_head, decoder body) of a specbench Target or an HF causal LM."""
    model = getattr(target, "model", None)
    if model is not None and hasattr(target, "body") and hasattr(target, "head"):
        return target.config, model.get_input_embeddings(), target.head, target.body
    if hasattr(target, "get_input_embeddings") and hasattr(target, "get_output_embeddings"):
        body = target.get_decoder() if hasattr(target, "get_decoder") else None
        return target.config, target.get_input_embeddings(), target.get_output_embeddings(), body
    raise TypeError(f"expected a specbench Target or a transformers causal LM, got {type(target).__name__}")


def _layer_classes(config, body):
    """Decoder-layer and rotary-embedding classes of the target's architecture (Llama by default)."""
    layer_cls = rotary_cls = None
    layers = getattr(body, "layers", None)
    if layers is not None and len(layers):
        layer_cls = type(layers[0])
    if getattr(body, "rotary_emb", None) is not None:
        rotary_cls = type(body.rotary_emb)
    if layer_cls is None or rotary_cls is None:
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRotaryEmbedding,
        )

        layer_cls, rotary_cls = layer_cls or LlamaDecoderLayer, rotary_cls or LlamaRotaryEmbedding
    return layer_cls, rotary_cls


def _head_config(config):
    """A copy of `config` describing the one-layer draft (sdpa attention unless set)."""
    cfg = config.__class__.from_dict(config.to_dict())
    cfg.num_hidden_layers = 1
    impl = getattr(config, "_attn_implementation", None)
    cfg._attn_implementation = impl if impl in ("eager", "sdpa") else "sdpa"
    return cfg


# ------------------------------------------------------------------ the head


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (True = attend) -> additive float mask (0 / dtype min)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class EagleHead(nn.Module):
    """EAGLE draft head: fc(cat(embed(x_{t+1}), f_t)) -> one decoder layer -> predicted f_{t+1}.

    `config` is the draft layer's config (the target's config or a checkpoint's: its
    num_hidden_layers is ignored, one layer is built).  `embed_tokens`/`lm_head` are the
    target's frozen modules (referenced, not saved).  `layer_cls`/`rotary_cls` default to
    Llama's; `EagleHead.for_target` picks the target's own.
    """

    def __init__(self, config, embed_tokens: nn.Embedding, lm_head: nn.Linear, fc_bias: bool = True,
                 *, layer_cls=None, rotary_cls=None):
        super().__init__()
        if layer_cls is None or rotary_cls is None:
            lc, rc = _layer_classes(config, None)
            layer_cls, rotary_cls = layer_cls or lc, rotary_cls or rc
        cfg = _head_config(config)
        self.config = cfg
        self.fc_bias = bool(fc_bias)
        H = cfg.hidden_size
        if embed_tokens.weight.shape[1] != H or lm_head.weight.shape[1] != H:
            raise CheckpointError(
                f"draft hidden_size {H} differs from the target's ({embed_tokens.weight.shape[1]}); "
                "an EAGLE head must have the target's hidden size")
        if embed_tokens.weight.shape[0] != lm_head.weight.shape[0]:
            raise ValueError("embedding and LM head disagree on the vocabulary size")
        # Frozen target modules: plain attributes, so they are neither parameters nor state.
        object.__setattr__(self, "_embed_tokens", embed_tokens)
        object.__setattr__(self, "_lm_head", lm_head)
        ref = embed_tokens.weight
        factory = {"device": ref.device, "dtype": ref.dtype}
        self.fc = nn.Linear(2 * H, H, bias=self.fc_bias, **factory)
        layer = layer_cls(cfg, layer_idx=0)
        layer.input_layernorm = nn.Identity()  # EAGLE: no input norm on the draft's layer 0
        self.layers = nn.ModuleList([layer.to(**factory)])
        self.rotary_emb = rotary_cls(config=cfg).to(ref.device)

    @classmethod
    def for_target(cls, target, fc_bias: bool = True, config=None) -> EagleHead:
        """A randomly initialised head for `target` (a specbench Target or an HF causal LM)."""
        tcfg, embed, lm_head, body = _target_parts(target)
        layer_cls, rotary_cls = _layer_classes(tcfg, body)
        return cls(config if config is not None else tcfg, embed, lm_head, fc_bias,
                   layer_cls=layer_cls, rotary_cls=rotary_cls)

    # -- frozen parts
    @property
    def embed_tokens(self) -> nn.Embedding:
        return self._embed_tokens

    @property
    def lm_head(self) -> nn.Linear:
        return self._lm_head

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self._lm_head.weight.shape[0])

    # -- forward
    def _mask(self, attention_mask, B: int, T: int, past: int, dtype, device) -> torch.Tensor | None:
        """A 4D additive float mask (B|1, 1, T, past+T), or None where plain causal attention is right."""
        if attention_mask is None:
            if T == 1 or (past == 0 and self.config._attn_implementation == "sdpa"):
                return None  # one query sees everything; sdpa is causal by itself without a past
            attention_mask = torch.ones(B, past + T, dtype=torch.bool, device=device)
        if attention_mask.dim() == 4:
            if attention_mask.dtype == torch.bool:
                return _additive(attention_mask.to(device), dtype)
            return attention_mask.to(device=device, dtype=dtype)
        if attention_mask.dim() != 2:
            raise ValueError("attention_mask must be None, 2D (B, [past+]T) padding or 4D (B, 1, T, past+T)")
        pad = attention_mask.to(device=device, dtype=torch.bool)
        if pad.shape[1] == T and past:
            pad = torch.cat([torch.ones(B, past, dtype=torch.bool, device=device), pad], 1)
        if pad.shape[1] != past + T:
            raise ValueError(f"2D attention_mask has {pad.shape[1]} columns, expected {T} or {past + T}")
        q = torch.arange(T, device=device)[:, None] + past
        k = torch.arange(past + T, device=device)[None, :]
        allowed = (k <= q)[None] & pad[:, None, :]
        return _additive(allowed[:, None], dtype)

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, past_key_values=None) -> torch.Tensor:
        """Predicted features (B, T, H).

        input_ids (B, T): token at t+1 for each row t; features (B, T, H): target (or draft)
        feature of position t; position_ids (B, T) or (T,): t.  attention_mask: None (causal,
        new rows after the cached ones), 2D padding mask, or 4D (bool: True = attend, or
        additive float) over (past + T) keys.  past_key_values: a transformers Cache (e.g.
        DynamicCache) or any object with `get_seq_length()` and `update(k, v, layer_idx)`;
        it is appended to.
        """
        if input_ids.dim() == 1:
            input_ids, features = input_ids[None], features[None]
        B, T = input_ids.shape
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(B, T)
        with torch.no_grad():
            emb = self._embed_tokens(input_ids)
        h = self.fc(torch.cat((emb.to(features.dtype), features), dim=-1))
        past = int(past_key_values.get_seq_length()) if past_key_values is not None else 0
        mask = self._mask(attention_mask, B, T, past, h.dtype, h.device)
        pos_emb = self.rotary_emb(h, position_ids)
        out = self.layers[0](h, attention_mask=mask, position_ids=position_ids,
                             position_embeddings=pos_emb, **cache_kwargs(self.layers[0], past_key_values))
        return out[0] if isinstance(out, tuple) else out

    def logits(self, predicted_features: torch.Tensor) -> torch.Tensor:
        """The target's LM head over predicted features; gradients reach the features, never its weights."""
        w = self._lm_head.weight.detach()
        b = self._lm_head.bias.detach() if getattr(self._lm_head, "bias", None) is not None else None
        return torch.nn.functional.linear(predicted_features.to(w.dtype), w, b)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """fc.* and layers.0.* (EAGLE checkpoint key names); no embedding, no LM head."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("fc.", "layers.0."))}

    def expected_keys(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.trainable_state_dict().items()}


# ------------------------------------------------------------------ checkpoints


def _weights_file(d: Path) -> Path:
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            return d / name
    raise CheckpointError(f"no draft weights in {d}: expected one of {', '.join(WEIGHT_FILES)} "
                          "(EAGLE format); train one with `specbench train --method eagle ...`")


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


def _read_weights(f: Path) -> dict[str, torch.Tensor]:
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


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of the checkpoint's weight file (what results files record as the draft hash)."""
    return sha256_file(_weights_file(Path(path)))


def _what_to_do(target_name: str) -> str:
    who = f" for {target_name}" if target_name else ""
    return f"use a draft checkpoint trained{who} (or train one with `specbench train --method eagle ...`)"


def load_eagle_checkpoint(path: str | os.PathLike, target) -> EagleHead:
    """Load an EAGLE-format draft head for `target` (a specbench Target or an HF causal LM), strictly."""
    d = Path(path)
    cfg_dict = read_checkpoint_config(d)
    tcfg, embed, lm_head, body = _target_parts(target)
    tname = getattr(target, "name", "") or getattr(tcfg, "_name_or_path", "") or "the target"
    t_hidden, t_vocab = int(embed.weight.shape[1]), int(lm_head.weight.shape[0])
    for key in ("hidden_size", "vocab_size"):
        if key not in cfg_dict:
            raise CheckpointError(f"{d / 'config.json'} has no {key}; an EAGLE draft config needs it")
    if int(cfg_dict["hidden_size"]) != t_hidden:
        raise CheckpointError(f"draft checkpoint {d} has hidden_size {cfg_dict['hidden_size']} but {tname} has "
                              f"{t_hidden}; {_what_to_do(tname)}")
    if int(cfg_dict["vocab_size"]) != t_vocab:
        raise CheckpointError(f"draft checkpoint {d} has vocab_size {cfg_dict['vocab_size']} but {tname} has "
                              f"{t_vocab}; {_what_to_do(tname)}")
    fc_bias = bool(cfg_dict.get("bias", True))
    clean = {k: v for k, v in cfg_dict.items() if k not in ("bias", "architectures", "auto_map")}
    try:
        cfg = tcfg.__class__(**clean)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot build the draft layer from {d / 'config.json'}: {type(e).__name__}: {e}") from e
    layer_cls, rotary_cls = _layer_classes(tcfg, body)
    with torch.device("meta"):
        probe = EagleHead(cfg, _meta_like(embed), _meta_like(lm_head), fc_bias,
                          layer_cls=layer_cls, rotary_cls=rotary_cls)
    expected = probe.expected_keys()
    del probe

    wfile = _weights_file(d)
    sd = _read_weights(wfile)
    if EMBED_KEY in sd:
        _check_embedding(sd.pop(EMBED_KEY), embed.weight, wfile, tname)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s): {', '.join(unexpected)}")
        hint = ""
        if any(k == "fc.bias" for k in missing + unexpected):
            hint = f" (config.json says bias={fc_bias}; the fc.bias key must agree)"
        raise CheckpointError(f"draft checkpoint {wfile} does not match an EAGLE head{hint}: " + "; ".join(parts)
                              + f"; {_what_to_do(tname)}")
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs expected {shape}" for k, shape in expected.items()
           if tuple(sd[k].shape) != shape]
    if bad:
        raise CheckpointError(f"draft checkpoint {wfile} has wrong shapes ({'; '.join(bad)}); "
                              f"its config.json does not describe its weights")

    head = EagleHead(cfg, embed, lm_head, fc_bias, layer_cls=layer_cls, rotary_cls=rotary_cls)
    dtype = embed.weight.dtype
    head.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    head.eval()
    head.requires_grad_(False)
    head.source = str(d)
    return head


def _meta_like(mod: nn.Module) -> nn.Module:
    w = mod.weight
    if isinstance(mod, nn.Embedding):
        return nn.Embedding(w.shape[0], w.shape[1], device="meta", dtype=w.dtype)
    return nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)


def _check_embedding(ckpt: torch.Tensor, ref: torch.Tensor, wfile: Path, tname: str) -> None:
    if tuple(ckpt.shape) != tuple(ref.shape):
        raise CheckpointError(f"{wfile}: {EMBED_KEY} has shape {tuple(ckpt.shape)} but {tname}'s embedding is "
                              f"{tuple(ref.shape)}; {_what_to_do(tname)}")
    a = ckpt.detach().to("cpu", torch.float32)
    b = ref.detach().to("cpu", torch.float32)
    rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
    if not rel <= EMBED_RTOL:
        raise CheckpointError(f"{wfile}: {EMBED_KEY} differs from {tname}'s embedding (relative distance "
                              f"{rel:.3g} > {EMBED_RTOL}): the head was trained for another target; "
                              f"{_what_to_do(tname)}")


def save_eagle_checkpoint(head: EagleHead, path: str | os.PathLike, extra_config: dict | None = None) -> None:
    """Write `config.json` + `model.safetensors` (EAGLE format, no embedding) atomically into `path`."""
    from safetensors.torch import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    cfg = head.config.to_dict()
    for k in ("_attn_implementation", "_attn_implementation_autoset", "_name_or_path", "dtype", "torch_dtype",
              "id2label", "label2id", "quantization_config"):
        cfg.pop(k, None)
    cfg["num_hidden_layers"] = 1
    cfg["architectures"] = [(cfg.get("architectures") or [None])[0] or _arch_name(head)]
    cfg["bias"] = head.fc_bias
    rope = cfg.get("rope_parameters") or {}
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]  # the key EAGLE's EConfig (transformers 4.x) reads
    cfg["torch_dtype"] = str(next(head.parameters()).dtype).removeprefix("torch.")
    if extra_config:
        cfg.update(extra_config)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in head.trainable_state_dict().items()}
    cfg_text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    with atomic_path(d / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    write_text(d / "config.json", cfg_text)
    stale = d / "pytorch_model.bin"
    if stale.exists():
        stale.unlink()  # model.safetensors is now the one weight file


def _arch_name(head: EagleHead) -> str:
    mt = getattr(head.config, "model_type", "llama") or "llama"
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        mt, "LlamaForCausalLM")
