"""The `fast` decoder runtime: the target's forward without transformers' per-call machinery.

A target forward here is a handful of tokens (one for vanilla, a chain or tree of 2-60 for a method)
after a long KV-cached context, so on a CPU it is bound by streaming the weights and by per-op overhead,
not by arithmetic. transformers' decoder spends most of a one-token forward outside the matrix products
(mask and cache bookkeeping, many small ops per layer) and calls `F.linear` for every row count, whose
BLAS path is slow for 2-16 rows. This runtime computes the same function with fewer, better-chosen calls:

* q/k/v and gate/up are each ONE matrix product over concatenated weights;
* several rows use oneDNN's prepacked linear (`torch.ops.mkldnn._linear_pointwise`); one row either
  ``x @ Wt`` on a kept transposed copy (a GEMV over contiguous rows of Wt, the faster on the Intel VMs,
  `suites/linear_kernels.py`) or the same prepacked linear (faster on an AMD EPYC VM): `one_row_kernel`
  picks one per process, by a short timing of both over model-sized weights unless
  ``SPECBENCH_FAST_ONE_ROW=gemv|packed`` says, and the results file records it;
* RMSNorm is `F.rms_norm`, rotary is applied to q and k heads together, attention is
  `F.scaled_dot_product_attention` over the KV buffer with the caller's additive mask (grouped-query
  attention as plain attention over stacked query rows: the keys are read once, never repeated).

The rotary table comes from the model's own rotary module and the KV cache is the same `BufferLayer`
cache the hf runtime uses, so commit/truncate and the mask are shared and exact. Results differ from
transformers' only by float rounding (other summation orders); `Target` treats any resulting greedy
divergence as it treats one between devices (`specbench.decoding.numerics`).

Supported: Llama-family decoders (Llama, Mistral without a sliding window, Qwen2; SiLU-gated MLP,
RMSNorm, optional q/k/v/o biases) on CPU. `fast_supported` says why another model is not.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from ..errors import UsageError

__all__ = ["FastDecoder", "FastLayer", "FastLinear", "fast_supported", "one_row_kernel", "past_length", "rope"]

ONE_ROW_ENV = "SPECBENCH_FAST_ONE_ROW"
_one_row: str | None = None  # this process's choice, made once


def one_row_kernel() -> str:
    """The kernel of one-row products in this process: ``gemv`` or ``packed``.

    ``SPECBENCH_FAST_ONE_ROW`` (gemv, packed, auto) decides; auto (the default) times both, interleaved,
    over 8 layers' worth of SmolLM2-shaped float32 weights (~130 MB, more than a CPU cache, visited in order
    as a forward visits its layers), and takes ``packed`` only when it is at least 10% faster, so a close
    call keeps the GEMV and the choice does not flip between runs of one machine.
    """
    global _one_row
    if _one_row is None:
        want = os.environ.get(ONE_ROW_ENV, "auto").strip().lower()
        if want not in ("auto", "gemv", "packed"):
            raise UsageError(f"{ONE_ROW_ENV}={want!r}: expected gemv, packed or auto")
        if want == "packed" and not torch.backends.mkldnn.is_available():
            raise UsageError(f"{ONE_ROW_ENV}=packed needs oneDNN (torch.backends.mkldnn), which this torch lacks")
        _one_row = want if want != "auto" else _calibrate()
    return _one_row


def _calibrate() -> str:
    if not torch.backends.mkldnn.is_available():
        return "gemv"
    g = torch.Generator().manual_seed(0)
    shapes = [(1728, 576), (576, 576), (3072, 576), (576, 1536)] * 8
    ws = [torch.randn(o, i, generator=g) for o, i in shapes]
    wts = [w.t().contiguous() for w in ws]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in ws]
    xs = {i: torch.randn(1, i, generator=g) for i in {i for _, i in shapes}}
    times: dict[str, list[float]] = {"gemv": [], "packed": []}
    with torch.inference_mode():
        for _ in range(5):
            t0 = time.perf_counter()
            for (_, i), wt in zip(shapes, wts):
                xs[i] @ wt
            times["gemv"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for (_, i), p in zip(shapes, packed):
                torch.ops.mkldnn._linear_pointwise(xs[i], p, None, "none", [], "")
            times["packed"].append(time.perf_counter() - t0)
    return "packed" if statistics.median(times["packed"]) < 0.9 * statistics.median(times["gemv"]) else "gemv"

_FAMILIES = ("llama", "mistral", "qwen2")


def fast_supported(model, window: int | None) -> str | None:
    """None if `model` (an HF causal LM) runs on the fast runtime; else why not."""
    cfg = model.config
    p = next(model.parameters())
    if getattr(model, "hf_device_map", None):
        return "a model spread over devices (device_map)"
    if p.device.type != "cpu":
        return f"the fast runtime is for CPU; the model is on {p.device.type}"
    if getattr(cfg, "model_type", None) not in _FAMILIES:
        return f"model type {getattr(cfg, 'model_type', '?')} (the fast runtime covers {', '.join(_FAMILIES)})"
    if window is not None:
        return "a sliding attention window"
    if getattr(cfg, "hidden_act", "silu") != "silu" or int(getattr(cfg, "pretraining_tp", 1) or 1) != 1:
        return "an MLP other than SiLU-gated, or pretraining_tp > 1"
    layer = model.get_decoder().layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) or not all(
            hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) or hasattr(attn, "q_norm"):
        return "a decoder layer that is not Llama's (q/k/v/o projections, gate/up/down MLP, no q/k norm)"
    return None


class FastLinear:
    """y = x W^T + b for a (out, in) weight, with the kernel chosen by the row count of x (see module doc)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        w = weight.detach().contiguous()
        self.out_features = w.shape[0]
        self.wt = w.t().contiguous()  # (in, out): one row is a GEMV over Wt's contiguous rows
        self.bias = None if bias is None else bias.detach().contiguous()
        self.packed = None
        if w.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)  # blocked layout for 2+ rows
        self.gemv_one_row = self.packed is None or one_row_kernel() == "gemv"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (x.shape[0] == 1 and self.gemv_one_row) or self.packed is None:
            y = x @ self.wt
            return y if self.bias is None else y + self.bias
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _cat_bias(*mods) -> torch.Tensor | None:
    biases = [m.bias for m in mods]
    if all(b is None for b in biases):
        return None
    return torch.cat([b.detach() if b is not None else m.weight.new_zeros(m.weight.shape[0])
                      for b, m in zip(biases, mods)])


class FastLayer:
    """One Llama-family decoder layer of an HF model on the fast kernels; `__call__` maps (q, H) hidden states
    to (q, H), appending its keys and values to a cache layer. An `nn.Identity` input norm (an EAGLE-style
    draft layer's) is skipped. A down_proj with k*H outputs (FSPAD's Partial Alignment Distillation, k = 2)
    adds the residual k times side by side, so the layer maps to (q, k*H)."""

    def __init__(self, layer, config):
        a, m = layer.self_attn, layer.mlp
        self.qkv = FastLinear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
                              _cat_bias(a.q_proj, a.k_proj, a.v_proj))
        self.o = FastLinear(a.o_proj.weight, a.o_proj.bias)
        self.gate_up = FastLinear(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(),
                                  _cat_bias(m.gate_proj, m.up_proj))
        self.down = FastLinear(m.down_proj.weight, m.down_proj.bias)
        norm = getattr(layer.input_layernorm, "weight", None)
        self.ln_in = None if norm is None else norm.detach()
        self.ln_post = layer.post_attention_layernorm.weight.detach()
        self.intermediate = m.gate_proj.weight.shape[0]
        self.residual_copies = m.down_proj.weight.shape[0] // int(config.hidden_size)
        self.eps = float(config.rms_norm_eps)
        self.hidden = int(config.hidden_size)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.scale = float(a.scaling)

    def norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden,), w, self.eps)

    def attention_mask(self, mask: torch.Tensor | None, q: int, past: int, dtype) -> torch.Tensor | None:
        """The additive mask this layer's attention takes, from the caller's ((1, 1, q, past + q) additive;
        None: causal among the q new rows, everything cached visible); computed once per forward."""
        if mask is None and q > 1:
            allowed = torch.ones(q, past + q, dtype=torch.bool).tril(past)
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]
        group = self.n_heads // self.n_kv
        if mask is not None and group > 1:  # the query rows of a kv group are stacked: the mask once per head
            mask = mask.expand(1, group, q, mask.shape[-1]).reshape(1, 1, group * q, mask.shape[-1])
        return mask

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                 cache_layer) -> torch.Tensor:
        """x (q, H); cos/sin (q, 1, d) from the model's rotary module; `mask` from `attention_mask`."""
        q = x.shape[0]
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        half, group = d // 2, nh // nkv
        qkv = self.qkv(x if self.ln_in is None else self.norm(x, self.ln_in))
        qk = qkv[:, :(nh + nkv) * d].view(q, nh + nkv, d)
        rot = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
        qk = qk * cos + rot * sin
        # Grouped-query attention as plain attention: the `group` query heads sharing a kv head (heads
        # j*group .. (j+1)*group-1, as transformers' repeat_kv pairs them) become group*q query rows of
        # that kv head, so the keys are read once and never repeated.
        qh = qk[:, :nh].transpose(0, 1).reshape(1, nkv, group * q, d)
        kh = qk[:, nh:].transpose(0, 1)[None]  # (1, nkv, q, d)
        vh = qkv[:, (nh + nkv) * d:].view(q, nkv, d).transpose(0, 1)[None]
        keys, values = cache_layer.update(kh, vh)
        att = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask, scale=self.scale)
        x = x + self.o(att.view(nh, q, d).transpose(0, 1).reshape(q, nh * d))
        gu = self.gate_up(self.norm(x, self.ln_post))
        residual = x if self.residual_copies == 1 else x.repeat(1, self.residual_copies)
        return residual + self.down(F.silu(gu[:, :self.intermediate]) * gu[:, self.intermediate:])


def rope(rotary, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (q, 1, d) over heads for rows `x` (q, H) at `positions` (q,), from the model's own rotary
    module (any rope type)."""
    cos, sin = rotary(x[None], positions[None])
    return cos[0, :, None, :], sin[0, :, None, :]


def past_length(cache_layer) -> int:
    return cache_layer.get_seq_length() if cache_layer.is_initialized else 0


class FastDecoder:
    """The decoder of HF causal LM `model` as the fast runtime: `forward` has the hf decoder's contract (the
    last hidden states, final norm applied) for `Target`, `logits` the LM head's. The weights are copies
    (transposed and packed); the HF model is left as it is."""

    def __init__(self, model):
        cfg = model.config
        body = model.get_decoder()
        self.embed = body.embed_tokens
        self.rotary = body.rotary_emb
        self.layers = [FastLayer(layer, cfg) for layer in body.layers]
        self.norm = body.norm.weight.detach()
        head = model.get_output_embeddings()
        self.lm_head = FastLinear(head.weight, getattr(head, "bias", None))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over last hidden states (n, H), with the row-count kernel choice of the projections."""
        return self.lm_head(hidden)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
        """(q, H) last hidden states of `ids` (q,) at `positions` (q,), attending to `cache` (appended to) and,
        among themselves, by `mask` ((1, 1, q, past + q) additive; None: causal)."""
        x = self.embed(ids)
        cos, sin = rope(self.rotary, x, positions)
        first = self.layers[0]
        mask = first.attention_mask(mask, ids.shape[0], past_length(cache.layers[0]), x.dtype)
        for lay, cache_layer in zip(self.layers, cache.layers):
            x = lay(x, cos, sin, mask, cache_layer)
        return first.norm(x, self.norm)
