"""The target model at decode time: KV-cached prefill, one forward over a token tree, commit.

Works with any transformers causal LM whose decoder accepts a 4D additive attention mask
with explicit position ids on top of a DynamicCache (Llama, Mistral, Qwen2 families).
The decoder and the LM head are called separately so last-layer hidden states (the input
of the LM head, which EAGLE-style drafters read) come for free, and the LM head only runs
on the rows whose logits are needed.

Every cache layer is a BufferLayer holding the full history, so commit keeps the accepted
path the same way in every layer.  A model whose attention layers all use a sliding window
(Mistral's `sliding_window`, Qwen2 with `use_sliding_window`) gets the window from our own
4D mask on every forward; a model mixing sliding and full-attention layers is refused
(one mask is passed to all layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..decoding.tree import Proposal, Tree
from ..errors import ContextLengthError
from .hf_compat import cache_kwargs
from .registry import ModelError


class BufferLayer(DynamicLayer):
    """A KV layer over a preallocated buffer: appends write in place instead of concatenating.

    `keys`/`values` stay views of the filled part, so transformers code that reads them
    keeps working; `keep` implements the commit of an accepted tree path in place.  The layer
    keeps its own state rather than DynamicLayer's: the base's lazy initialisation and flags
    differ across the supported transformers versions.
    """

    def __init__(self) -> None:
        super().__init__()
        self.size = 0
        self._kbuf = self._vbuf = None
        self.is_initialized = False

    def lazy_initialization(self, key_states, value_states=None) -> None:  # 4.56 passes the keys only
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states.new_empty((*key_states.shape[:-2], 0, key_states.shape[-1]))
        self.keys = self.values = empty
        self.size = 0
        self._kbuf = self._vbuf = None
        self.is_initialized = True

    def _reserve(self, size: int, like: torch.Tensor) -> None:
        if self._kbuf is not None and self._kbuf.shape[-2] >= size:
            return
        capacity = max(256, 2 * size)
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        kbuf, vbuf = like.new_empty(shape), like.new_empty(shape)
        if self.size:
            kbuf[..., : self.size, :] = self._kbuf[..., : self.size, :]
            vbuf[..., : self.size, :] = self._vbuf[..., : self.size, :]
        self._kbuf, self._vbuf = kbuf, vbuf

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.size + key_states.shape[-2]
        self._reserve(end, key_states)
        self._kbuf[..., self.size:end, :] = key_states
        self._vbuf[..., self.size:end, :] = value_states
        self._set_size(end)
        return self.keys, self.values

    def _set_size(self, size: int) -> None:
        self.size = size
        self.keys = self._kbuf[..., :size, :]
        self.values = self._vbuf[..., :size, :]

    def get_seq_length(self) -> int:
        return self.size

    def truncate(self, size: int) -> None:
        """Drop everything after the first `size` positions (no copy)."""
        if size < self.size:
            self._set_size(size)

    def reset(self) -> None:
        self.truncate(0)

    def keep(self, start: int, index: torch.Tensor | None, count: int) -> None:
        """Keep positions start + index (or the next `count` when index is None) after `start`."""
        if index is not None:
            index = index.to(self._kbuf.device)  # a layer of a model spread over devices keeps its own
            self._kbuf[..., start:start + count, :] = self._kbuf.index_select(-2, index + start)
            self._vbuf[..., start:start + count, :] = self._vbuf.index_select(-2, index + start)
        self._set_size(start + count)


def buffer_cache(config=None) -> DynamicCache:
    """A DynamicCache whose every layer is a BufferLayer (full history, also for sliding-window models).

    transformers' own sliding-window layers keep only the last window - 1 rows and never roll back
    their length, so a rejected draft could not be undone; the window is applied by Target's mask
    instead.  Without a config it holds one BufferLayer (a single-layer model such as a draft head).
    """
    if config is None:
        cache = DynamicCache()
        cache.layers = [BufferLayer()]
        return cache
    cache = DynamicCache(config=config)  # for the layer count transformers derives from the config
    cache.layers = [BufferLayer() for _ in cache.layers]
    return cache


def attention_window(config) -> int | None:
    """W when every attention layer of `config` uses a sliding window of W, None when all use full attention.

    Raises ModelError for anything else (some layers sliding and some full, or other layer kinds): the
    decoder gets one 4D mask for all its layers, which cannot express both patterns.
    """
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2: the window is off unless enabled
        window = None
    kinds = getattr(config, "layer_types", None)  # Qwen2 (4.56 and 5.x) always derives it; Mistral has none
    if kinds is None:
        kinds = ["sliding_attention" if window is not None else "full_attention"] * config.num_hidden_layers
    kinds = set(kinds)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"} and window is not None:
        return int(window)
    raise ModelError(
        f"unsupported attention layout ({getattr(config, 'model_type', 'model')}: layer_types "
        f"{sorted(kinds)}, sliding_window {window}): speculative decoding here needs the same attention on every "
        "layer, full or one sliding window; use a model whose layers all use full attention or all the same window")


@dataclass
class StepOutput:
    logits: torch.Tensor  # (n, V) one row per tree node (prefill: last position only)
    hidden: torch.Tensor  # (n, H) last-layer hidden states of the same rows (prefill: all positions)
    extra_logits: torch.Tensor | None = None  # (m, V) rows of the proposal's extra tokens
    extra_hidden: torch.Tensor | None = None


RUNTIMES = ("hf", "fast")
AUTO_FAST_MAX_BYTES = 4 << 30  # auto picks fast only below this: its transposed and packed copies triple memory


class Target:
    """`runtime`: ``hf`` (transformers' decoder forward, the reference), ``fast``
    (`specbench.models.fast_runtime`, refused with the reason where unsupported) or ``auto`` (fast where
    supported and the weights are under AUTO_FAST_MAX_BYTES, else hf); the one chosen is `runtime_name`,
    which results files record. The fast runtime keeps its own (transposed, packed) copies of the weights,
    taken here: a model changed afterwards needs a new Target."""

    def __init__(self, model, tokenizer=None, *, name: str = "", weights_sha256: str = "", runtime: str = "hf"):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.weights_sha256 = weights_sha256
        self.body = model.get_decoder()
        self.head = model.get_output_embeddings()
        # Inputs go where the embedding is (a model spread over devices by accelerate moves them on from there).
        p = model.get_input_embeddings().weight
        self.device, self.dtype = p.device, p.dtype
        if self.device.type == "meta":
            raise ModelError("the target's embedding is offloaded (meta device); keep the embedding and the LM head "
                             "on a real device in the device map")
        self.config = model.config
        self.max_length = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        # None for full attention (the model builds its causal mask for prefill and chains, as transformers
        # does); else every forward passes our own mask, which is then the only place the window is applied.
        self.window = attention_window(model.config)
        self.vocab_size = int(self.head.weight.shape[0])
        self.cache: DynamicCache | None = None
        self.length = 0  # tokens committed to the KV cache
        self.runtime_name = _choose_runtime(runtime, model, self.window)
        self._fast = None
        if self.runtime_name == "fast":
            from .fast_runtime import FastDecoder

            self._fast = FastDecoder(model)

    @classmethod
    def from_loaded(cls, loaded, runtime: str = "hf") -> Target:
        return cls(loaded.model, loaded.tokenizer, name=loaded.name, weights_sha256=loaded.weights_sha256,
                   runtime=runtime)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 LM-head logits of last hidden states `hidden` (n, H)."""
        return (self._fast.logits(hidden) if self._fast is not None else self.head(hidden)).float()

    @property
    def eos_token_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None) or self.config.eos_token_id
        ids = eos if isinstance(eos, (list, tuple)) else [eos]
        return {int(i) for i in ids if i is not None}

    def check_fits(self, n_prompt: int, n_new: int) -> None:
        if n_prompt + n_new > self.max_length:
            raise ContextLengthError(
                f"prompt of {n_prompt} tokens + {n_new} new tokens exceeds the context of {self.name or 'the model'} "
                f"({self.max_length} tokens); use a shorter prompt or a smaller --max-new-tokens")

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self._fast is not None:
            return self._fast.forward(ids, positions, mask, self.cache)
        out = self.body(input_ids=ids[None], position_ids=positions[None], attention_mask=mask,
                        **cache_kwargs(self.body, self.cache))
        return out.last_hidden_state[0]

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> StepOutput:
        """Start a new sequence: cache `ids` (may be empty)."""
        self.cache = buffer_cache(self.config)
        self.length = 0
        return self.extend(ids)

    @torch.inference_mode()
    def extend(self, ids: list[int], logits: bool = True) -> StepOutput:
        """Append `ids` to the cached sequence (one causal forward, committed at once): the logits of the last
        of them (none with `logits` False: a caller with its own LM head rows), the hidden states of all. A
        draft model's runtime drafts with it."""
        if self.cache is None:
            self.cache = buffer_cache(self.config)
        if not ids:
            empty = torch.empty(0, self.config.hidden_size, device=self.device, dtype=self.dtype)
            return StepOutput(torch.empty(0, self.vocab_size, device=self.device), empty)
        n = len(ids)
        positions = torch.arange(self.length, self.length + n)
        # Causal attention after a full cache is what the model builds itself; a window is ours alone.
        mask = None if self.window is None else self._mask(torch.ones(n, n, dtype=torch.bool).tril(), positions)
        hidden = self._run(torch.tensor(ids, device=self.device), positions.to(self.device), mask)
        self.length += n
        last = self.logits(hidden[-1:]) if logits else hidden.new_empty(0, self.vocab_size, dtype=torch.float32)
        return StepOutput(last, hidden)

    def truncate(self, length: int) -> None:
        """Roll the cached sequence back to its first `length` tokens (a draft model's rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cached sequence of {self.length} tokens to {length}")
        for layer in self.cache.layers if self.cache is not None else ():
            layer.truncate(length)
        self.length = length

    def _tree_mask(self, tree: Tree, prop: Proposal) -> torch.Tensor:
        n, m = len(tree), len(prop.extra_tokens)
        local = torch.zeros(n + m, n + m, dtype=torch.bool)
        local[:n, :n] = tree.ancestor_mask()
        if m:
            local[n:] = prop.extra_mask.to(torch.bool).cpu()
        return self._mask(local, self.length + torch.tensor(tree.depth + list(prop.extra_positions)))

    def _mask(self, local: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Additive (1, 1, q, length + q) mask for q new tokens at absolute `positions` (cpu): every committed
        row is visible, `local` (q, q bool) says which new rows are; with a window W a key at position k is
        also hidden from a query at position q unless q - k < W.  That is transformers' own rule,
        masking_utils.sliding_window_overlay (`kv_idx > q_idx - sliding_window`, the same in 4.56), with
        the positions the rows would have in a sequential decode of their path.  The decoder uses a 4D mask
        as given: masking_utils._preprocess_mask_arguments returns it unchanged ("If the mask is already 4D,
        simply return as-is", also in 4.56) for create_causal_mask and create_sliding_window_causal_mask
        alike, and the sdpa and eager attentions add no window of their own."""
        allowed = torch.ones(len(positions), self.length + len(positions), dtype=torch.bool)
        allowed[:, self.length:] = local
        if self.window is not None:
            keys = torch.cat([torch.arange(self.length), positions])
            allowed &= positions[:, None] - keys[None, :] < self.window
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask.to(self.device)[None, None]

    @torch.inference_mode()
    def forward_tree(self, tree: Tree) -> StepOutput:
        """ONE forward over the tree (and any extra tokens); their KV stays until `commit`."""
        prop = tree.proposal
        n, m = len(tree), len(prop.extra_tokens)
        ids = torch.tensor(tree.tokens + list(prop.extra_tokens), device=self.device)
        offsets = torch.tensor(tree.depth + list(prop.extra_positions), device=self.device)
        # Causal attention is exactly the tree mask for a chain: let the model build it.  Not with a window:
        # then the window is ours alone, never transformers' sliding mask sized against our BufferLayers.
        mask = None if tree.is_chain and not m and self.window is None else self._tree_mask(tree, prop)
        hidden = self._run(ids, self.length + offsets, mask)
        logits = self.logits(hidden)
        if m:
            return StepOutput(logits[:n], hidden[:n], logits[n:], hidden[n:])
        return StepOutput(logits, hidden)

    @torch.inference_mode()
    def commit(self, nodes: list[int]) -> None:
        """Keep the KV entries of `nodes` (indices into the last forward_tree, root first)."""
        contiguous = nodes == list(range(len(nodes)))
        idx = None if contiguous else torch.tensor(nodes, device=self.device)
        for layer in self.cache.layers:
            layer.keep(self.length, idx, len(nodes))
        self.length += len(nodes)


def _choose_runtime(runtime: str, model, window: int | None) -> str:
    if runtime not in (*RUNTIMES, "auto"):
        raise ModelError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)} or auto")
    if runtime == "hf":
        return "hf"
    from .fast_runtime import fast_supported

    why = fast_supported(model, window)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > AUTO_FAST_MAX_BYTES
    if why is None and not (runtime == "auto" and big):  # fast keeps ~2 more copies of the weights
        return "fast"
    if runtime == "fast":
        raise ModelError(f"the fast runtime does not support this model ({why}); use --runtime hf")
    return "hf"
