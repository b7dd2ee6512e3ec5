"""The `fast` decoder runtime: the target's forward without transformers' per-call machinery.

A target forward here is a handful of tokens (one for vanilla, a chain or tree of 2-60 for a method)
after a long KV-cached context, so on a CPU it is bound by streaming the weights and by per-op overhead,
not by arithmetic. transformers' decoder spends most of a one-token forward outside the matrix products
(mask and cache bookkeeping, many small ops per layer) and calls `F.linear` for every row count, whose
BLAS path is slow for 2-16 rows. This runtime computes the same function with fewer, better-chosen calls:

* q/k/v and gate/up are each ONE matrix product over concatenated weights;
* each row count has its kernel: oneDNN's prepacked linear (`torch.ops.mkldnn._linear_pointwise`),
  ``x @ Wt`` on a transposed copy (a GEMV over contiguous rows of Wt, fastest for one row on the Intel
  VMs), ``(W @ x.T).T`` or `F.linear`, possibly over a few appended zero rows (oneDNN runs some counts
  slower than the next larger one). Which wins differs between CPUs, so `kernel_plan` times the candidates
  once per process unless ``SPECBENCH_FAST_KERNELS`` says, and the results file records the plan;
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

__all__ = ["FastDecoder", "FastLayer", "FastLinear", "fast_supported", "kernel_plan", "parse_plan", "past_length",
           "plan_text", "rope"]

KERNELS_ENV = "SPECBENCH_FAST_KERNELS"
PLAN_ROWS = 16  # row counts the plan covers; more rows always run the prepacked kernel at their own count
KERNELS = ("gemv", "wx", "linear", "packed")
_plan: dict[int, tuple[str, int]] | None = None  # this process's plan, made once


def kernel_plan() -> dict[int, tuple[str, int]]:
    """This process's kernel per row count: ``{n: (kernel, m)}`` for n = 1..PLAN_ROWS, m >= n the row count
    the product runs at (m > n: zero rows appended, the first n rows of the result kept).

    Kernels: ``gemv`` (``x @ Wt`` on a transposed copy), ``wx`` (``(W @ x.T).T``), ``linear`` (`F.linear`),
    ``packed`` (oneDNN's prepacked linear). Which is fastest for a few rows differs between CPUs by 30-40%
    (`suites/fast_kernels.py`; on one AVX512 VM two rows took 1.6x what four did through oneDNN), so
    ``SPECBENCH_FAST_KERNELS`` decides: ``auto`` (the default) times the candidates (`_calibrate`);
    ``fixed`` is the rule before calibration (gemv for one row, packed for more); ``packed`` is the prepacked
    kernel at every count; or a plan as `plan_text` writes it (``1:gemv,2:wx,12:packed@16``; counts not
    named run packed at their own count), to repeat a recorded run's kernels.
    """
    global _plan
    if _plan is None:
        want = os.environ.get(KERNELS_ENV, "auto").strip().lower()
        mkldnn = torch.backends.mkldnn.is_available()
        if want == "auto":
            _plan = _calibrate() if mkldnn else {n: ("gemv", n) for n in range(1, PLAN_ROWS + 1)}
        elif want == "fixed":
            _plan = {n: ("gemv" if n == 1 else "packed", n) for n in range(1, PLAN_ROWS + 1)}
        elif want == "packed":
            _plan = {n: ("packed", n) for n in range(1, PLAN_ROWS + 1)}
        else:
            _plan = parse_plan(want)
        if not mkldnn and any(k == "packed" for k, _ in _plan.values()):
            raise UsageError(f"{KERNELS_ENV}={want!r} uses the packed kernel, which needs oneDNN "
                             "(torch.backends.mkldnn); this torch lacks it")
    return _plan


def parse_plan(text: str) -> dict[int, tuple[str, int]]:
    """A plan from `plan_text`'s form; UsageError (saying the form) on anything else."""
    plan = {n: ("packed", n) for n in range(1, PLAN_ROWS + 1)}
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            n_text, spec = item.split(":")
            kernel, _, m_text = spec.partition("@")
            n, m = int(n_text), int(m_text or n_text)
        except ValueError:
            n, m, kernel = 0, 0, ""
        if kernel not in KERNELS or not 1 <= n <= PLAN_ROWS or m < n:
            raise UsageError(f"{KERNELS_ENV}={text!r}: expected auto, fixed, packed or a plan such as "
                             f"'1:gemv,2:wx,12:packed@16' (rows 1-{PLAN_ROWS}: kernel[@rows run, >= rows]; "
                             f"kernels {', '.join(KERNELS)})")
        plan[n] = (kernel, m)
    return plan


def plan_text(plan: dict[int, tuple[str, int]]) -> str:
    """The plan in the form `SPECBENCH_FAST_KERNELS` takes (recorded in results files)."""
    return ",".join(f"{n}:{k}" + (f"@{m}" if m != n else "") for n, (k, m) in sorted(plan.items()))


def _calibrate(reps: int = 5, margin: float = 0.9) -> dict[int, tuple[str, int]]:
    """Time every candidate over 8 layers' worth of SmolLM2-shaped float32 weights (~130 MB, more than a CPU
    cache, visited in order as a forward visits its layers), interleaved, median of `reps`: the prepacked
    kernel at every count 1..PLAN_ROWS and, for 1-4 rows, gemv, wx and linear. Row count n keeps its default
    (gemv for one row, packed for more) unless another candidate (another kernel, or packed at more rows) is
    at least 10% faster, so a close call does not flip between runs of one machine; among those within 5% of
    the fastest it takes the first by preference (no padding, then the fewest zero rows). ~2 s, once."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1728, 576), (576, 576), (3072, 576), (576, 1536)] * 8
    ws = [torch.randn(o, i, generator=g) for o, i in shapes]
    wts = [w.t().contiguous() for w in ws]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in ws]
    fns = {
        "gemv": lambda x, j: x @ wts[j],
        "wx": lambda x, j: (ws[j] @ x.T).T.contiguous(),
        "linear": lambda x, j: F.linear(x, ws[j]),
        "packed": lambda x, j: torch.ops.mkldnn._linear_pointwise(x, packed[j], None, "none", [], ""),
    }
    cands = [("packed", m) for m in range(1, PLAN_ROWS + 1)] + [
        (k, n) for n in range(1, 5) for k in ("gemv", "wx", "linear")]
    xs = {(m, i): torch.randn(m, i, generator=g) for m in range(1, PLAN_ROWS + 1) for i in {i for _, i in shapes}}
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cands}
    with torch.inference_mode():
        for _ in range(reps + 1):  # the first pass warms up
            for kernel, m in cands:
                f = fns[kernel]
                t0 = time.perf_counter()
                for j, (_, i) in enumerate(shapes):
                    f(xs[m, i], j)
                times[kernel, m].append(time.perf_counter() - t0)
    med = {c: statistics.median(v[1:]) for c, v in times.items()}
    plan = {}
    for n in range(1, PLAN_ROWS + 1):
        default = ("gemv" if n == 1 else "packed", n)
        # candidates in order of preference: no padding first, then the fewest zero rows
        ok = sorted((c for c in cands if c[1] == n or (c[0] == "packed" and c[1] > n)), key=lambda c: c[1])
        best = min(med[c] for c in ok)
        if best >= margin * med[default]:
            plan[n] = default
        else:  # near-ties between the faster ones go by preference, not by the noise of one timing
            plan[n] = next(c for c in ok if med[c] <= best * 1.05)
    return plan


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
    """y = x W^T + b for a (out, in) weight, with the kernel `kernel_plan` gives the row count of x. Only the
    weight layouts the plan uses are kept (the prepacked one always: row counts past the plan use it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        w = weight.detach().contiguous()
        self.out_features = w.shape[0]
        self.bias = None if bias is None else bias.detach().contiguous()
        onednn = w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
        self.plan = kernel_plan() if onednn else {}  # no oneDNN path (or not float32): F.linear at every count
        used = {k for k, _ in self.plan.values()}
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 8) if onednn else None
        self.wt = w.t().contiguous() if "gemv" in used else None  # (in, out): a GEMV over Wt's contiguous rows
        self.w = w if used & {"wx", "linear"} or not onednn else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        kernel, m = self.plan.get(n, ("packed" if self.packed is not None else "linear", n))
        xin = x if m == n else torch.cat([x, x.new_zeros(m - n, x.shape[1])])
        if kernel == "packed":
            y = torch.ops.mkldnn._linear_pointwise(xin, self.packed, self.bias, "none", [], "")
            return y if m == n else y[:n]
        if kernel == "gemv":
            y = xin @ self.wt
        elif kernel == "wx":  # contiguous: a column-major output would carry into the next products' layouts
            y = (self.w @ xin.T).T.contiguous()
        else:
            y = F.linear(xin, self.w)
        y = y if m == n else y[:n]
        return y if self.bias is None else y + self.bias


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
