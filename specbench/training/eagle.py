"""EAGLE draft-head training: the loss (a function, so HASS/FSPAD add a term / a forward variant) and
the `train(...)` hook behind ``specbench train --method eagle``.

Loss (SafeAILab/EAGLE eagle/train/main.py; FSPAD/HASS keep it as their base):

    loss = v_w * SmoothL1(f^_{t+1}, f_{t+1})            (mean over hidden dims, masked mean over tokens)
         + p_w * CE(p_target(.|f_{t+1}), p_head(.|f^_{t+1}))   (soft labels, masked mean over tokens)

with v_w = 1.0, p_w = 0.1; the target distribution is ``softmax(lm_head(f_{t+1}))`` under no_grad. Both
terms use the loss mask (assistant-reply tokens). The CE term needs the frozen LM head (vocab x hidden)
twice per token, the dominant cost on CPU: `ce_fraction` < 1 computes it on a random subset of the
masked positions (an unbiased estimate of the same masked mean; recorded in the manifest).
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..artifacts import check_writable, environment, sha256_file, sha256_json, write_json
from ..logs import configure, log_file
from ..models.eagle_head import DRAFT_VOCAB_FILE
from .trainer import TrainConfig, train_loop

log = logging.getLogger(__name__)

__all__ = ["LossConfig", "head_forward", "feature_loss", "distribution_loss", "eagle_loss", "compute_loss",
           "make_loss_fn", "train", "heldout_accuracy", "build_head"]


@dataclass(frozen=True)
class LossConfig:
    v_w: float = 1.0
    p_w: float = 0.1
    ce_fraction: float = 1.0  # fraction of masked positions on which the CE term is computed


# ---------------------------------------------------------------- seams


def head_forward(head, batch: dict) -> torch.Tensor:
    """The EAGLE forward: noisy target features + next tokens -> predicted next features (B, T, H)."""
    return head(batch["input_ids"], batch["features"], batch["position_ids"], attention_mask=batch["attention_mask"])


def feature_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SmoothL1 averaged over hidden dims, masked mean over positions (EAGLE: / (mask.sum() + 1e-5))."""
    per = F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1)
    return (per * mask).sum() / (mask.sum() + 1e-5)


def _select(mask: torch.Tensor, fraction: float, generator: torch.Generator | None) -> torch.Tensor:
    """Flat indices of masked positions, a random `fraction` of them (at least one when any)."""
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    if fraction >= 1.0 or idx.numel() == 0:
        return idx
    k = max(1, int(round(idx.numel() * fraction)))
    perm = torch.randperm(idx.numel(), generator=generator, device="cpu")[:k].to(idx.device)
    return idx[perm]


def distribution_loss(head_logits: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean soft-label cross-entropy  -sum_v p_T(v) log q(v),  top-1 agreement) over rows (N, V)."""
    p_t = torch.softmax(target_logits.float(), -1)
    logq = torch.log_softmax(head_logits.float(), -1)
    ce = -(p_t * logq).sum(-1).mean()
    acc = (head_logits.argmax(-1) == target_logits.argmax(-1)).float().mean()
    return ce, acc


def eagle_loss(head, pred: torch.Tensor, batch: dict, target_head_fn: Callable[[torch.Tensor], torch.Tensor],
               cfg: LossConfig = LossConfig(), generator: torch.Generator | None = None) -> dict:
    """EAGLE's loss of predicted features `pred` for `batch` (see the module docstring)."""
    mask = batch["loss_mask"].float()
    target = batch["target"]
    vloss = feature_loss(pred, target, mask)
    sel = _select(mask, cfg.ce_fraction, generator)
    H = pred.shape[-1]
    if sel.numel():
        with torch.no_grad():
            t_logits = target_head_fn(target.reshape(-1, H)[sel])
        h_logits = head.logits(pred.reshape(-1, H)[sel])
        ploss, acc = distribution_loss(h_logits, t_logits)
    else:
        ploss = pred.sum() * 0.0
        acc = torch.tensor(float("nan"))
    loss = cfg.v_w * vloss + cfg.p_w * ploss
    return {"loss": loss, "vloss": vloss.detach(), "ploss": ploss.detach(), "acc": acc.detach(),
            "n_tokens": mask.sum().detach(), "n_ce": torch.tensor(float(sel.numel()))}


def compute_loss(head, batch: dict, target_head_fn: Callable[[torch.Tensor], torch.Tensor],
                 cfg: LossConfig = LossConfig(), generator: torch.Generator | None = None) -> dict:
    """Forward + loss: the unit a new method replaces (HASS: several forwards + a top-K term)."""
    return eagle_loss(_unwrap(head), head_forward(head, batch), batch, target_head_fn, cfg, generator)


def _unwrap(head):
    return getattr(head, "module", head)


def make_loss_fn(target_head_fn, cfg: LossConfig, seed: int = 0) -> Callable[[torch.nn.Module, dict], dict]:
    gen = torch.Generator().manual_seed(seed + 2)

    def fn(head, batch):
        return compute_loss(head, batch, target_head_fn, cfg, gen)

    fn.generator = gen  # exposed so a trainer may checkpoint it
    return fn


def frozen_lm_head_fn(lm_head: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    w = lm_head.weight.detach()
    b = lm_head.bias.detach() if getattr(lm_head, "bias", None) is not None else None

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(w.dtype), w, b)

    return fn


# ---------------------------------------------------------------- orchestration


def build_head(model, seed: int = 0, fc_bias: bool = True, embed_init_scale: float = 1.0):
    """A fresh EAGLE head for HF causal LM `model` (random init from `seed`, float32, trainable).

    `embed_init_scale` multiplies the initial weights of fc's embedding half (fc input = cat(e, f)). The
    target's features (post-norm hidden states) are often an order of magnitude larger than its token
    embeddings (SmolLM2-135M: std 1.9 vs 0.136), so with the default init the token signal is drowned
    at the start and a short run barely learns to use it; scaling by std(f)/std(e) balances the two
    inputs from step 0. An initialisation only: the architecture and checkpoint format are unchanged.
    """
    from ..models.eagle_head import EagleHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = EagleHead.for_target(model, fc_bias=fc_bias)
    head.float()
    if embed_init_scale != 1.0:
        with torch.no_grad():
            head.fc.weight[:, :head.hidden_size].mul_(embed_init_scale)
    head.requires_grad_(True)
    return head


@torch.no_grad()
def heldout_accuracy(head, model, tokenizer, conversations, max_tokens: int = 512) -> dict:
    """Top-1 agreement of the head's next-token prediction with the target's argmax, teacher-forced with
    the target's true features (EAGLE's training-time accuracy, i.e. draft depth 1), on assistant tokens."""
    from .features import target_hidden_states
    from .sharegpt import format_conversation

    head.eval()
    hit = n = 0
    for _, conv in conversations:
        f = format_conversation(tokenizer, conv, max_tokens)
        if sum(f.loss_mask[1:]) == 0:
            continue
        ids = torch.tensor([f.input_ids])
        h = target_hidden_states(model, ids).float()
        T = ids.shape[1] - 1
        pred = head(ids[:, 1:], h[:, :T], torch.arange(T)[None])
        m = torch.tensor(f.loss_mask[1:], dtype=torch.bool)
        hl = head.logits(pred[0][m])
        tl = head.logits(h[0, 1:][m])
        hit += int((hl.argmax(-1) == tl.argmax(-1)).sum())
        n += int(m.sum())
    return {"top1": hit / max(n, 1), "tokens": n, "conversations": len(conversations)}


def write_draft_vocab(out: Path, cache, vocab_size: int) -> dict:
    """Write `out/draft_vocab.json`: the ids of the training data's assistant tokens, most frequent first.

    The drafters' optional reduced draft vocabulary (`--param draft_vocab=N`) takes its first N ids (as
    EAGLE-3 builds its draft vocabulary from training-data frequencies).  Ties rank by id; ids never seen
    are left out (the drafter appends them in id order).  Returns the manifest's "draft_vocab" entry.
    """
    import numpy as np

    counts = np.zeros(vocab_size, dtype=np.int64)
    cols = cache.dataset.select_columns(["input_ids", "loss_mask"]).with_format("numpy")
    for row in cols:
        ids = np.asarray(row["input_ids"], dtype=np.int64)
        counts += np.bincount(ids[np.asarray(row["loss_mask"]) > 0], minlength=vocab_size)
    seen = np.flatnonzero(counts)
    ranked = seen[np.lexsort((seen, -counts[seen]))].tolist()
    write_json(Path(out) / DRAFT_VOCAB_FILE, ranked, indent=None)
    total = int(counts.sum())
    top = np.sort(counts)[::-1]
    info = {"file": DRAFT_VOCAB_FILE, "what": "token ids of the training data's assistant (loss) tokens, most "
            "frequent first", "feature_cache": cache.meta.get("key"), "tokens_counted": total,
            "distinct_ids": len(ranked),
            "coverage": {str(n): round(float(top[:n].sum()) / max(total, 1), 4) for n in (2048, 4096, 8192, 16384)}}
    return info


def train(target_spec: str, out: Path, *, data: str = "sharegpt", max_conversations: int = 1000,
          max_tokens: int = 512, epochs: int = 3, lr: float = 5e-4, batch_size: int = 4, seed: int = 0,
          self_distill: bool = False, distill_kwargs: dict | None = None, resume: bool = True,
          feature_cache: Path | None = None, work_dir: Path | None = None, ce_fraction: float = 1.0,
          v_w: float = 1.0, p_w: float = 0.1, noise: str = "uniform", noise_std: float = 0.2,
          warmup_steps: int | None = None, save_every: int = 50, grad_clip_value: float = 0.5,
          heldout: int = 50, device: str = "auto", dtype: str = "float32", progress: bool = True,
          max_steps: int | None = None, command: str | None = None,
          init_from: Path | None = None, embed_init_scale: float | str | None = "auto") -> Path:
    """Train an EAGLE head for `target_spec` and write it to `out` (EAGLE format + MANIFEST.json).

    Steps: load the target (specbench.models.load_model: embedded name, local dir or HF cache); read and
    format the data; extract/reuse the feature cache; train on accelerate (resumable from `work_dir`,
    default ``cache_dir()/train/<hash>``); export config.json + model.safetensors (float32); measure the
    held-out top-1 agreement on `heldout` ShareGPT conversations never trained on; write MANIFEST.json.
    `init_from`: an EAGLE checkpoint whose weights initialise the head (a second training phase, as HASS's
    phase 2 starts from phase 1); its MANIFEST.json (if any) is embedded in the new manifest.
    Returns `out`.
    """
    from accelerate import Accelerator

    from ..models.eagle_head import save_eagle_checkpoint
    from ..models.loading import load_model
    from ..models.registry import cache_dir
    from .features import heldout_conversations, load_feature_cache, prepare_features

    t_start = time.time()
    out = Path(out)
    acc = Accelerator()
    loaded = load_model(target_spec, dtype=dtype, device=str(acc.device) if device == "auto" else device)
    model = loaded.model
    model.eval()
    model.requires_grad_(False)
    log.info(f"target {loaded.name} ({loaded.source}, weights sha256 {loaded.weights_sha256[:16]}...)")

    with acc.main_process_first():  # the main process extracts the features; the others then find its cache
        fdir, data_info = prepare_features(loaded, data=data, max_conversations=max_conversations,
                                           max_tokens=max_tokens, self_distill=self_distill,
                                           distill_kwargs=distill_kwargs, feature_cache=feature_cache,
                                           progress=progress and acc.is_main_process)
    cache = load_feature_cache(fdir)
    log.info(f"feature cache {fdir}: {len(cache)} sequences, {sum(cache.lengths)} tokens")

    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, noise=noise, noise_std=noise_std,
                      warmup_steps=warmup_steps, save_every=save_every, grad_clip_value=grad_clip_value,
                      max_steps=max_steps)
    lcfg = LossConfig(v_w=v_w, p_w=p_w, ce_fraction=ce_fraction)
    fp = {"target_sha256": loaded.weights_sha256, "cache_key": data_info["cache_key"], "loss": vars(lcfg),
          "embed_init_scale": embed_init_scale}
    init_info = None
    if init_from is not None:
        init_from = Path(init_from)
        init_info = {"path": str(init_from), "weights_sha256": sha256_file(init_from / "model.safetensors")}
        if (init_from / "MANIFEST.json").is_file():
            init_info["manifest"] = json.loads((init_from / "MANIFEST.json").read_text())
        fp["init_from_sha256"] = init_info["weights_sha256"]
    if work_dir is None:
        wkey = sha256_json({"out": str(out.resolve()), **fp, "train": cfg.to_dict() | {"max_steps": None}})[:16]
        work_dir = cache_dir() / "train" / f"eagle-{wkey}"
    log.info(f"trainer state and loss log in {work_dir}")

    embed_scale = 1.0
    if embed_init_scale == "auto":
        sample = torch.cat([cache[i]["hidden"] for i in range(min(8, len(cache)))])
        embed_scale = round(float(sample.std() / model.get_input_embeddings().weight.float().std()), 3)
    elif embed_init_scale is not None:
        embed_scale = float(embed_init_scale)
    log.info(f"fc embedding-half init scale {embed_scale}")
    head = build_head(model, seed=seed, embed_init_scale=embed_scale)
    if init_from is not None:
        from ..models.eagle_head import load_eagle_checkpoint

        src = load_eagle_checkpoint(init_from, model)  # strict: keys, shapes, hidden and vocab sizes
        head.load_state_dict({k: v.float() for k, v in src.trainable_state_dict().items()}, strict=True)
        head.requires_grad_(True)
        log.info(f"initialised the head from {init_from} (sha256 {init_info['weights_sha256'][:16]}...)")
    loss_fn = make_loss_fn(frozen_lm_head_fn(model.get_output_embeddings()), lcfg, seed)
    res = train_loop(head, cache, loss_fn, cfg, Path(work_dir), resume=resume, progress=progress, accelerator=acc,
                     config_fingerprint=fp)
    log.info(f"training stopped at step {res.step} (finished={res.finished}) after {res.seconds:.0f} s")
    if not acc.is_main_process:
        return out
    head = acc.unwrap_model(head) if hasattr(acc, "unwrap_model") else head
    head = getattr(head, "module", head)

    out.mkdir(parents=True, exist_ok=True)
    save_eagle_checkpoint(head, out)
    wsha = sha256_file(out / "model.safetensors")
    dv = write_draft_vocab(out, cache, head.vocab_size)

    ho = heldout_conversations(data, heldout) if heldout else []
    hacc = heldout_accuracy(head, model, loaded.tokenizer, ho, max_tokens) if ho else None
    if hacc:
        log.info(f"held-out top-1 agreement with the target: {hacc['top1']:.4f} on {hacc['tokens']} tokens "
                 f"of {hacc['conversations']} conversations")
    import shutil

    shutil.copyfile(Path(work_dir) / "loss_log.jsonl", out / "loss_log.jsonl")
    import accelerate

    n_params = sum(v.numel() for v in head.trainable_state_dict().values())
    manifest = {
        "method": "eagle",
        "format": "EAGLE checkpoint (config.json + model.safetensors; keys fc.*, layers.0.*; no embedding)",
        "weights_file": "model.safetensors", "weights_sha256": wsha, "weights_dtype": "float32",
        "trainable_parameters": n_params,
        "target": {"name": loaded.name, "source": loaded.source, "weights_sha256": loaded.weights_sha256},
        "data": data_info,
        "training": {**cfg.to_dict(), "loss": {**vars(lcfg), "feature": "SmoothL1 mean over hidden, masked mean",
                                               "distribution": "soft-label CE vs softmax(lm_head(target feature))"},
                     "optimizer": "AdamW", "schedule": "linear warm-up then linear decay to 0",
                     "fc_embedding_half_init_scale": embed_scale,
                     "steps": res.step, "finished": res.finished, "resumed_from_step": res.resumed_from,
                     "train_seconds": round(res.seconds, 1)},
        "losses_per_epoch": res.epoch_losses,
        "heldout": {**(hacc or {}), "what": "top-1 agreement of lm_head(head(f_t, x_{t+1})) with the target's argmax "
                    "at t+1, teacher-forced on the target's features, assistant tokens only, the last "
                    f"{heldout} usable conversations of the source (never trained on)"},
        "seed": seed,
        "init_from": init_info,
        "draft_vocab": dv,
        "wall_seconds_this_invocation": round(time.time() - t_start, 1),
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "environment": {**environment(acc.device), "accelerate": accelerate.__version__, "device": str(acc.device),
                        "num_processes": acc.num_processes},
    }
    write_json(out / "MANIFEST.json", manifest, indent=2)
    log.info(f"wrote {out} (model.safetensors sha256 {wsha[:16]}...; {DRAFT_VOCAB_FILE}: {dv['distinct_ids']} ids)")
    return out


def _auto_or_float(value: str) -> str | float:
    import argparse

    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'auto' or a number, not {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m specbench.training.eagle ...``: the same as ``specbench train --method eagle``."""
    import argparse

    from accelerate import PartialState

    p = argparse.ArgumentParser(prog="specbench train --method eagle", description=train.__doc__.splitlines()[0])
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", default="sharegpt")
    p.add_argument("--max-conversations", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ce-fraction", type=float, default=1.0)
    p.add_argument("--self-distill", action="store_true")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--feature-cache", type=Path)
    p.add_argument("--work-dir", type=Path)
    p.add_argument("--heldout", type=int, default=50)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log", type=Path, help="also append the log to this file")
    p.add_argument("--embed-init-scale", default="auto", type=_auto_or_float,
                   help="scale of fc's embedding-half init: 'auto' = std(features)/std(embedding), or a number")
    p.add_argument("--init-from", type=Path, help="EAGLE checkpoint to start from (a second training phase)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.log:  # checked before hours of feature extraction, not when the first line is logged
        check_writable(a.log, "--log")
    if a.threads:
        torch.set_num_threads(a.threads)
    cmd = ("specbench train --method eagle "
           + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])))
    # Long jobs: timestamped lines, one copy of them (the main process's; the others only warn), and --log.
    configure(timestamps=True, level=logging.INFO if PartialState().is_main_process else logging.WARNING)
    with log_file(a.log):
        train(a.target, a.out, data=a.data, max_conversations=a.max_conversations, max_tokens=a.max_tokens,
              epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed, ce_fraction=a.ce_fraction,
              self_distill=a.self_distill, resume=not a.no_resume, feature_cache=a.feature_cache, work_dir=a.work_dir,
              heldout=a.heldout, save_every=a.save_every, progress=not a.no_progress, command=cmd,
              init_from=a.init_from,
              embed_init_scale=a.embed_init_scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
