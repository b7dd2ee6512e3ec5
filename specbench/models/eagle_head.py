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

Checkpoint format (official EAGLE checkpoints for Vicuna / LLaMA2-Chat / LLaMA3-Instruct), read and
written by `draft_heads.load_head` / `save_head` as architecture ``eagle``: `config.json` (a Llama
config of the one-layer draft: hidden_size, vocab_size, intermediate_size, heads, rms_norm_eps,
rope_theta, ... plus `bias`, the fc bias flag, default True) and weights with the keys

    fc.weight, fc.bias (when bias), layers.0.self_attn.{q,k,v,o}_proj.weight,
    layers.0.mlp.{gate,up,down}_proj.weight, layers.0.post_attention_layernorm.weight

(no layers.0.input_layernorm).  Official checkpoints also carry `embed_tokens.weight`, a copy of
the target's embedding saved by EAGLE's trainer: checked against the target's and dropped.  A
hidden-size or vocab mismatch with the target is a `CheckpointError` naming both sizes.

A head trained over a reduced draft vocabulary (config.json ``draft_vocab_size`` N > 0, EAGLE-3's key)
carries EAGLE-3's mapping in its weights: ``d2t`` (N,) int64, draft id i being target id ``i + d2t[i]``,
and ``t2d`` (V,) bool, the target ids in the draft vocabulary. `logits` then scores those N rows of the
target's LM head only, in draft-id order (`draft_ids` maps back); training computes its distribution
losses over them (the target's softmax renormalised over the draft vocabulary) and decoding drafts over
them. A missing or inconsistent mapping is a `CheckpointError`, never an identity.
"""

from __future__ import annotations

import torch
from torch import nn

from .draft_heads import CheckpointError, HeadArch, target_name, target_parts
from .fast_runtime import FastLayer, FastLinear, past_length, rope
from .hf_compat import cache_kwargs

__all__ = ["EAGLE_ARCH", "EagleHead", "head_config", "head_from_config", "mapping_hint"]

EMBED_KEY = "embed_tokens.weight"
DRAFT_VOCAB_KEY = "draft_vocab_size"  # config.json (EAGLE-3's name); the mapping is d2t/t2d in the weights
MAPPING_KEYS = ("d2t", "t2d")


# ------------------------------------------------------------------ target access


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
                 *, layer_cls=None, rotary_cls=None, draft_vocab_size: int = 0):
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
        # The head lives with the LM head: on a target spread over devices, that of its last layer.
        ref = lm_head.weight
        factory = {"device": ref.device, "dtype": ref.dtype}
        self.fc = nn.Linear(2 * H, H, bias=self.fc_bias, **factory)
        layer = layer_cls(cfg, layer_idx=0)
        layer.input_layernorm = nn.Identity()  # EAGLE: no input norm on the draft's layer 0
        self.layers = nn.ModuleList([layer.to(**factory)])
        self.rotary_emb = rotary_cls(config=cfg).to(ref.device)
        V = int(lm_head.weight.shape[0])
        self.draft_vocab_size = int(draft_vocab_size)
        if not 0 <= self.draft_vocab_size <= V:
            raise CheckpointError(f"{DRAFT_VOCAB_KEY} {draft_vocab_size} is outside 0..{V} (the target's vocabulary)")
        if self.draft_vocab_size:  # EAGLE-3's mapping, set by `set_draft_vocab` or loaded with the weights
            self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.long, device=ref.device))
            self.register_buffer("t2d", torch.zeros(V, dtype=torch.bool, device=ref.device))
        self._rows: tuple | None = None  # (key, weight, bias) of the LM-head rows `logits` scores

    @classmethod
    def for_target(cls, target, fc_bias: bool = True, config=None, **options):
        """A randomly initialised head for `target` (a specbench Target or an HF causal LM); `options` go to
        the constructor of a subclass."""
        tcfg, embed, lm_head, body = target_parts(target)
        layer_cls, rotary_cls = _layer_classes(tcfg, body)
        return cls(config if config is not None else tcfg, embed, lm_head, fc_bias,
                   layer_cls=layer_cls, rotary_cls=rotary_cls, **options)

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

    # -- the reduced draft vocabulary
    def set_draft_vocab(self, token_ids) -> None:
        """Set the mapping to the draft vocabulary `token_ids` (any order, `draft_vocab_size` distinct ids);
        draft ids follow target-id order, as EAGLE-3's do."""
        given = list(token_ids)
        ids = torch.as_tensor(given, dtype=torch.long).unique()
        N = self.draft_vocab_size
        if not N or ids.numel() != N or len(given) != N:
            raise ValueError(f"the head's draft vocabulary has {N} ids, got {len(given)} ({ids.numel()} distinct)")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"draft vocabulary ids must lie in 0..{self.vocab_size - 1}")
        with torch.no_grad():
            self.d2t.copy_(ids.to(self.d2t.device) - torch.arange(N, device=self.d2t.device))
            self.t2d.zero_()
            self.t2d[ids.to(self.t2d.device)] = True

    @property
    def draft_ids(self) -> torch.Tensor | None:
        """The target id of each draft id (None: the full vocabulary)."""
        if not self.draft_vocab_size:
            return None
        return torch.arange(self.draft_vocab_size, device=self.d2t.device) + self.d2t

    def validate_state(self) -> None:
        """A loaded mapping must be one: N increasing target ids below V, exactly those marked in t2d."""
        ids = self.draft_ids
        if ids is None:
            return
        V = self.vocab_size
        ok = (int(ids[0]) >= 0 and int(ids[-1]) < V and bool((ids[1:] > ids[:-1]).all())
              and int(self.t2d.sum()) == ids.numel() and bool(self.t2d[ids.clamp(0, V - 1)].all()))
        if not ok:
            raise CheckpointError(f"the head's draft-vocabulary mapping (d2t/t2d, {DRAFT_VOCAB_KEY} "
                                  f"{self.draft_vocab_size}) is inconsistent: d2t must give increasing target ids "
                                  "below the vocabulary size, exactly the ones t2d marks")

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
        here = self._lm_head.weight.device  # where the head lives; embedding and features may be elsewhere
        features = features.to(here)
        with torch.no_grad():
            emb = self._embed_tokens(input_ids.to(self._embed_tokens.weight.device)).to(here)
        h = self.fuse(emb.to(features.dtype), features)
        past = int(past_key_values.get_seq_length()) if past_key_values is not None else 0
        mask = self._mask(attention_mask, B, T, past, h.dtype, h.device)
        pos_emb = self.rotary_emb(h, position_ids)
        return self.decode(h, mask, position_ids, pos_emb, past_key_values)

    def fuse(self, emb: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The decoder layer's input from the next token's embedding and the feature: ``fc(cat(e, f))``."""
        return self.fc(torch.cat((emb, features), dim=-1))

    def decode(self, h: torch.Tensor, mask, position_ids, pos_emb, past_key_values) -> torch.Tensor:
        """The draft's decoder layer over `h` (a subclass may change what it outputs)."""
        out = self.layers[0](h, attention_mask=mask, position_ids=position_ids,
                             position_embeddings=pos_emb, **cache_kwargs(self.layers[0], past_key_values))
        return out[0] if isinstance(out, tuple) else out

    @property
    def input_fc(self) -> nn.Linear:
        """The 2H -> H linear over ``cat(e, f)`` (its embedding half is what `embed_init_scale` scales)."""
        return self.fc

    def logits(self, predicted_features: torch.Tensor) -> torch.Tensor:
        """The target's LM head over predicted features, over the draft vocabulary's rows when the head has
        one (in draft-id order); gradients reach the features, never its weights."""
        w, b = self.scored_rows()
        return torch.nn.functional.linear(predicted_features.to(w.dtype), w, b)

    def scored_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the LM-head rows `logits` scores: all of them, or the draft vocabulary's (gathered
        once per mapping: the LM head is frozen)."""
        w = self._lm_head.weight.detach()
        b = self._lm_head.bias.detach() if getattr(self._lm_head, "bias", None) is not None else None
        if not self.draft_vocab_size:
            return w, b
        key = (self.d2t._version, self.d2t.data_ptr(), w.data_ptr(), w.dtype, w.device)
        if self._rows is None or self._rows[0] != key:
            ids = self.draft_ids.to(w.device)
            self._rows = (key, w.index_select(0, ids), None if b is None else b.index_select(0, ids))
        return self._rows[1], self._rows[2]

    def token_features(self, out: torch.Tensor) -> torch.Tensor:
        """EAGLE's output is one predicted feature: it scores the next token ..."""
        return out

    def next_features(self, out: torch.Tensor) -> torch.Tensor:
        """... and is fed to the next draft depth."""
        return out

    def fast(self) -> _FastEagleHead | None:
        """This head's forward on the fast runtime's kernels for decoding (batch 1, no gradients), or None
        where a subclass changes `fuse` or `decode` without saying how they run there (it drafts with
        `forward`). Its weights are copies taken now: a head trained afterwards needs a new one."""
        if type(self).fuse is not EagleHead.fuse or type(self).decode is not EagleHead.decode:
            return None
        return _FastEagleHead(self)

    def fast_fuse(self):
        """`fuse` on the fast kernels: a callable (embeddings (T, H), features (T, H)) -> (T, H)."""
        fc = FastLinear(self.fc.weight, self.fc.bias)
        return lambda emb, feats: fc(torch.cat((emb, feats), dim=-1))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """fc.* and layers.0.* (EAGLE checkpoint key names), and the d2t/t2d mapping of a reduced draft
        vocabulary (not trained: fixed by the data); no embedding, no LM head."""
        return {k: v for k, v in self.state_dict().items()
                if k.startswith(("fc.", "layers.0.")) or k in MAPPING_KEYS}

    def expected_keys(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.trainable_state_dict().items()}


class _FastEagleHead:
    """`EagleHead.forward` for one sequence over `fast_runtime`'s kernels: the same function up to float
    rounding (fc and the layer's projections as `FastLinear`, the layer as `FastLayer`), the head's own mask
    rule, rotary module and embedding. `past_key_values` is required (its first layer is appended to). A
    subclass's head runs here through its `fast_fuse` and a layer `FastLayer` maps as its `decode` does."""

    def __init__(self, head: EagleHead):
        self.head = head
        self.fuse = head.fast_fuse()
        self.layer = FastLayer(head.layers[0], head.config)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, features: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, past_key_values=None) -> torch.Tensor:
        if past_key_values is None:
            raise ValueError("the fast head forward appends to a KV cache: pass past_key_values")
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError("the fast head forward takes one sequence (batch 1)")
        head, ids = self.head, input_ids.reshape(-1)
        T = ids.shape[0]
        feats = features.reshape(T, -1)
        h = self.fuse(head.embed_tokens(ids).to(feats.dtype), feats)
        cache_layer = past_key_values.layers[0]
        past = past_length(cache_layer)
        mask = self.layer.attention_mask(head._mask(attention_mask, 1, T, past, h.dtype, h.device), T, past, h.dtype)
        cos, sin = rope(head.rotary_emb, h, position_ids.reshape(-1))
        return self.layer(h, cos, sin, mask, cache_layer)[None]


# ------------------------------------------------------------------ the architecture record


def head_from_config(target, cfg_dict: dict | None, cls: type[EagleHead] = EagleHead, own_keys: tuple[str, ...] = (),
                     **options) -> EagleHead:
    """A random head of class `cls` (EagleHead or a subclass) for `target`, shaped by an EAGLE-style config.json
    dict (None: the target's own config); `own_keys` are the subclass's config keys (not Llama config fields),
    `options` its constructor options."""
    if cfg_dict is None:
        return cls.for_target(target, **options)
    tcfg, embed, lm_head, body = target_parts(target)
    tname = target_name(target)
    t_sizes = {"hidden_size": int(embed.weight.shape[1]), "vocab_size": int(lm_head.weight.shape[0])}
    for key, size in t_sizes.items():
        if key not in cfg_dict:
            raise CheckpointError(f"the draft config has no {key}")
        if int(cfg_dict[key]) != size:
            raise CheckpointError(f"draft checkpoint has {key} {cfg_dict[key]} but {tname} has {size}; use a draft "
                                  f"checkpoint trained for {tname} (or train one with `specbench train ...`)")
    clean = {k: v for k, v in cfg_dict.items()
             if k not in ("bias", "architectures", "auto_map", "specbench_head", DRAFT_VOCAB_KEY, *own_keys)}
    try:
        cfg = tcfg.__class__(**clean)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot build the draft layer from its config.json: "
                              f"{type(e).__name__}: {e}") from e
    try:
        n_draft = int(cfg_dict.get(DRAFT_VOCAB_KEY) or 0)
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json's {DRAFT_VOCAB_KEY} {cfg_dict[DRAFT_VOCAB_KEY]!r} is not an "
                              "integer") from None
    return cls.for_target(target, fc_bias=bool(cfg_dict.get("bias", True)), config=cfg, draft_vocab_size=n_draft,
                          **options)


def _build(target, cfg_dict: dict | None) -> EagleHead:
    return head_from_config(target, cfg_dict)


def head_config(head: EagleHead) -> dict:
    """config.json of an EAGLE checkpoint (what EAGLE's EConfig reads, plus `bias`)."""
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
    if head.draft_vocab_size:
        cfg[DRAFT_VOCAB_KEY] = head.draft_vocab_size
    return cfg


def mapping_hint(cfg: dict, keys: list[str]) -> str:
    """Why d2t/t2d keys are missing or unexpected, from config.json's draft_vocab_size."""
    if not set(keys) & set(MAPPING_KEYS):
        return ""
    n = cfg.get(DRAFT_VOCAB_KEY)
    return (f" (config.json says {DRAFT_VOCAB_KEY}={n}: the d2t/t2d mapping of its draft vocabulary must be in the "
            "weights)" if n else f" (config.json names no {DRAFT_VOCAB_KEY}, so the head has the full vocabulary and "
            "no d2t/t2d mapping)")


def _arch_name(head: EagleHead) -> str:
    mt = getattr(head.config, "model_type", "llama") or "llama"
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        mt, "LlamaForCausalLM")


EAGLE_ARCH = HeadArch(
    "eagle", _build, head_config,
    copies={EMBED_KEY: lambda target: target_parts(target)[1].weight},
    key_hint=lambda cfg, keys: mapping_hint(cfg, keys) + (
        f" (config.json says bias={bool(cfg.get('bias', True))}; the fc.bias key must agree)" if "fc.bias" in keys
        else ""),
    description="EAGLE-1/2 head: fc(cat(embed, feature)) -> one decoder layer of the target's architecture",
)
