"""The target model at decode time: KV-cached prefill, one forward over a token tree, commit.

Works with any transformers causal LM whose decoder accepts a 4D additive attention mask
with explicit position ids on top of a DynamicCache (Llama, Mistral, Qwen2 families).
The decoder and the LM head are called separately so last-layer hidden states (the input
of the LM head, which EAGLE-style drafters read) come for free, and the LM head only runs
on the rows whose logits are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..decoding.tree import Proposal, Tree
from ..errors import ContextLengthError
from .hf_compat import cache_kwargs


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
            self._kbuf[..., start:start + count, :] = self._kbuf.index_select(-2, index + start)
            self._vbuf[..., start:start + count, :] = self._vbuf.index_select(-2, index + start)
        self._set_size(start + count)


def buffer_cache(config=None) -> DynamicCache:
    """A DynamicCache whose plain full-attention layers are BufferLayers (others, e.g. sliding windows, as built).

    Without a config it holds one BufferLayer (a single-layer model such as a draft head).
    """
    if config is None:
        cache = DynamicCache()
        cache.layers = [BufferLayer()]
        return cache
    cache = DynamicCache(config=config)
    cache.layers = [BufferLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@dataclass
class StepOutput:
    logits: torch.Tensor  # (n, V) one row per tree node (prefill: last position only)
    hidden: torch.Tensor  # (n, H) last-layer hidden states of the same rows (prefill: all positions)
    extra_logits: torch.Tensor | None = None  # (m, V) rows of the proposal's extra tokens
    extra_hidden: torch.Tensor | None = None


class Target:
    def __init__(self, model, tokenizer=None, *, name: str = "", weights_sha256: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.weights_sha256 = weights_sha256
        self.body = model.get_decoder()
        self.head = model.get_output_embeddings()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.config = model.config
        self.max_length = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.vocab_size = int(self.head.weight.shape[0])
        self.cache: DynamicCache | None = None
        self.length = 0  # tokens committed to the KV cache

    @classmethod
    def from_loaded(cls, loaded) -> Target:
        return cls(loaded.model, loaded.tokenizer, name=loaded.name, weights_sha256=loaded.weights_sha256)

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
        out = self.body(input_ids=ids[None], position_ids=positions[None], attention_mask=mask,
                        **cache_kwargs(self.body, self.cache))
        return out.last_hidden_state[0]

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> StepOutput:
        """Start a new sequence: cache `ids` (may be empty)."""
        self.cache = buffer_cache(self.config)
        self.length = 0
        if not ids:
            empty = torch.empty(0, self.config.hidden_size, device=self.device, dtype=self.dtype)
            return StepOutput(torch.empty(0, self.vocab_size, device=self.device), empty)
        t = torch.tensor(ids, device=self.device)
        hidden = self._run(t, torch.arange(len(ids), device=self.device), None)
        self.length = len(ids)
        return StepOutput(self.head(hidden[-1:]).float(), hidden)

    def _tree_mask(self, tree: Tree, prop: Proposal) -> torch.Tensor:
        n, m = len(tree), len(prop.extra_tokens)
        local = torch.zeros(n + m, n + m, dtype=torch.bool)
        local[:n, :n] = tree.ancestor_mask()
        if m:
            local[n:] = prop.extra_mask.to(torch.bool).cpu()
        mask = torch.zeros(n + m, self.length + n + m, dtype=self.dtype)
        mask[:, self.length:] = torch.where(local, 0.0, torch.finfo(self.dtype).min)
        return mask.to(self.device)[None, None]

    @torch.inference_mode()
    def forward_tree(self, tree: Tree) -> StepOutput:
        """ONE forward over the tree (and any extra tokens); their KV stays until `commit`."""
        prop = tree.proposal
        n, m = len(tree), len(prop.extra_tokens)
        ids = torch.tensor(tree.tokens + list(prop.extra_tokens), device=self.device)
        offsets = torch.tensor(tree.depth + list(prop.extra_positions), device=self.device)
        # Causal attention is exactly the tree mask for a chain: let the model build it.
        mask = None if tree.is_chain and not m else self._tree_mask(tree, prop)
        hidden = self._run(ids, self.length + offsets, mask)
        logits = self.head(hidden).float()
        if m:
            return StepOutput(logits[:n], hidden[:n], logits[n:], hidden[n:])
        return StepOutput(logits, hidden)

    @torch.inference_mode()
    def commit(self, nodes: list[int]) -> None:
        """Keep the KV entries of `nodes` (indices into the last forward_tree, root first)."""
        contiguous = nodes == list(range(len(nodes)))
        idx = None if contiguous else torch.tensor(nodes, device=self.device)
        for layer in self.cache.layers:
            if isinstance(layer, BufferLayer):
                layer.keep(self.length, idx, len(nodes))
            else:  # e.g. sliding-window layers: rebuild by selection
                local = torch.tensor(nodes, device=self.device)
                sel = torch.cat([torch.arange(self.length, device=self.device), self.length + local])
                layer.keys, layer.values = layer.keys.index_select(2, sel), layer.values.index_select(2, sel)
        self.length += len(nodes)
