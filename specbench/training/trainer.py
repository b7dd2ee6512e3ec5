"""A small draft-head trainer on `accelerate`: batches from a feature cache, a training task, resumable.

The loop knows no method: it draws batches in a seeded order, has the task (`tasks.Task`) collate,
augment and score them (``task.loss(head, batch) -> dict``: its ``"loss"`` is back-propagated and every
other scalar is logged under its own name), clips gradients by value, steps AdamW and a warm-up +
linear-decay schedule over the task's trainable parameters.

One CPU here; on GPUs ``accelerate launch -m specbench ...`` runs the same code data-parallel: the
epoch's batch order is a pure function of (seed, epoch) and process k takes batches k, k+P, ...; the
model/optimizer/scheduler go through ``accelerator.prepare`` (DDP gradient averaging).

Resumability: every `save_every` optimizer steps (and at the end of each epoch) the full trainer state
(trainable head weights, optimizer, scheduler, step, epoch, RNG states of python/numpy/torch, of the
augmentation generator and of the task's own generator) is written atomically to ``work_dir/state.pt``.
A new run with the same work_dir loads it and continues from that step with identical state; the data
order of an epoch is a pure function of (seed, epoch), so the skipped batches are exactly the ones
already trained on. The loss log (``work_dir/loss_log.jsonl``, one JSON line per logged step) is
truncated back to the saved step on resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..artifacts import atomic_path
from .tasks import Task

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "batch_order", "train_loop"]


@dataclass
class TrainConfig:
    epochs: int = 3
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip_value: float = 0.5  # EAGLE: torch.nn.utils.clip_grad_value_(..., 0.5)
    warmup_steps: int | None = None  # None: 5% of the total steps
    batch_size: int = 4  # sequences per optimizer step (per process)
    seed: int = 0
    save_every: int = 50  # optimizer steps between trainer-state checkpoints
    log_every: int = 1
    max_steps: int | None = None  # stop early (for tests / interruption simulations)
    # AdamW's update as one fused kernel per parameter: the same algorithm (equal up to float rounding) at a third
    # of the per-op loop's cost on CPU, where the loop is torch's default (a 3-layer drafter's 10.6M parameters at
    # 2 threads: 24 ms -> 8 ms, a small part of a step; suites/draft_lm_train_cost.py); used where torch has the
    # kernel (CPU, CUDA). Not part of a checkpoint's recipe (draft_heads._BOOKKEEPING).
    fused_adamw: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class TrainResult:
    step: int
    epochs_done: int
    seconds: float
    epoch_losses: list[dict] = field(default_factory=list)  # per epoch: first/last/mean of the logged losses
    resumed_from: int = 0
    finished: bool = False
    fused_adamw: bool = False  # whether the update ran fused (asked for, and the parameters' device has the kernel)


# ---------------------------------------------------------------- data


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of dataset indices for `epoch`: a seeded shuffle, then sequences of similar length grouped
    (sort within windows of 16 batches) to limit padding, then the batches shuffled. Pure in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    idx = rng.permutation(len(lengths)).tolist()
    win = batch_size * 16
    out: list[list[int]] = []
    for w in range(0, len(idx), win):
        chunk = sorted(idx[w:w + win], key=lambda i: lengths[i])
        out += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = rng.permutation(len(out)).tolist()
    return [out[p] for p in perm]


class _Batches(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole batches (so accelerate shards batches across processes)."""

    def __init__(self, data, order: list[list[int]], collate):
        self.data, self.order, self.collate = data, order, collate

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return self.collate([self.data[j] for j in self.order[i]])


# ---------------------------------------------------------------- state


def _rng_state(noise_gen: torch.Generator, loss_gen: torch.Generator | None = None) -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
          "noise": noise_gen.get_state()}
    if loss_gen is not None:
        st["loss"] = loss_gen.get_state()
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict, noise_gen: torch.Generator, loss_gen: torch.Generator | None = None) -> None:
    if loss_gen is not None:
        loss_gen.set_state(st["loss"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    noise_gen.set_state(st["noise"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_trainable(head: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load a trainable state dict strictly: exactly the head's trainable keys, same shapes."""
    own = head.trainable_state_dict() if hasattr(head, "trainable_state_dict") else head.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"trainer state does not match the head: missing {missing}, unexpected {unexpected}")
    for k, v in own.items():
        if tuple(v.shape) != tuple(sd[k].shape):
            raise RuntimeError(f"trainer state: {k} has shape {tuple(sd[k].shape)}, head has {tuple(v.shape)}")
    head.load_state_dict({**head.state_dict(), **{k: v.to(own[k].dtype) for k, v in sd.items()}}, strict=True)


# ---------------------------------------------------------------- loop


def train_loop(head: torch.nn.Module, data, task: Task, cfg: TrainConfig, work_dir: Path, *, resume: bool = True,
               progress: bool = True, accelerator=None, config_fingerprint: dict | None = None) -> TrainResult:
    """Train `task.trainable(head)` on `data` (len(), [i], .lengths) with `task`'s batches and loss.

    Batches are ``task.collate``d, moved to the accelerator's device and ``task.augment``ed with the loop's
    seeded augmentation generator. Returns a TrainResult; the trained weights are in `head`.
    `config_fingerprint` (with the task's options) is stored in the state and must match on resume.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    acc = accelerator or Accelerator()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / "state.pt"
    log_path = work_dir / "loss_log.jsonl"
    fingerprint = {"train": cfg.to_dict() | {"max_steps": None, "save_every": None, "log_every": None},
                   "task": {"name": task.name, "options": dataclasses.asdict(task.opts)}, **(config_fingerprint or {})}

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
    loss_gen = task.generator  # e.g. the CE position sampler: checkpointed too

    lengths = list(data.lengths)
    steps_per_epoch_total = math.ceil(len(lengths) / cfg.batch_size)
    steps_per_epoch = math.ceil(steps_per_epoch_total / acc.num_processes)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, int(0.05 * total_steps))

    params = task.trainable(head)
    fused = cfg.fused_adamw and all(p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                            fused=fused or None)
    sched = get_scheduler("linear", opt, num_warmup_steps=warmup, num_training_steps=total_steps)

    step = 0
    resumed_from = 0
    history: list[dict] = []
    if resume and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        if st.get("fingerprint") != fingerprint:
            raise RuntimeError(f"{state_path} was written by a run with different settings; use another work dir "
                               "or resume=False")
        load_trainable(head, st["head"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step = int(st["step"])
        history = st.get("history", [])
        _set_rng_state(st["rng"], noise_gen, loss_gen)
        resumed_from = step
        log.info(f"train: resumed from {state_path} at step {step}/{total_steps}")
    elif state_path.is_file():
        state_path.unlink()
    if acc.is_main_process:  # keep the log consistent with the state
        lines = []
        if log_path.is_file() and step > 0:
            lines = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        log_path.write_text("".join(ln + "\n" for ln in lines))

    head, opt, sched = acc.prepare(head, opt, sched)
    raw_head = acc.unwrap_model(head)

    def save(epoch_done: int) -> None:
        acc.wait_for_everyone()
        if acc.is_main_process:
            with atomic_path(state_path) as tmp:
                torch.save({"head": {k: v.detach().cpu() for k, v in raw_head.trainable_state_dict().items()},
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                            "epoch_done": epoch_done, "rng": _rng_state(noise_gen, loss_gen), "history": history,
                            "fingerprint": fingerprint, "total_steps": total_steps}, tmp)

    t0 = time.time()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step",
               disable=not (progress and acc.is_main_process), mininterval=5)
    head.train()
    stopped = False
    logf = open(log_path, "a") if acc.is_main_process else None
    try:
        for epoch in range(step // steps_per_epoch, cfg.epochs):
            order = batch_order(lengths, cfg.batch_size, cfg.seed, epoch)
            # this process's share: batches rank, rank + P, ... (padded by wrapping so all ranks step together)
            P = acc.num_processes
            order = order + order[:(-len(order)) % P]
            mine = order[acc.process_index::P]
            skip = step - epoch * steps_per_epoch  # batches of this epoch already trained on (resume)
            dl = torch.utils.data.DataLoader(_Batches(data, mine[skip:], task.collate), batch_size=None,
                                             shuffle=False)
            for batch in dl:
                batch = task.augment({k: v.to(acc.device) for k, v in batch.items()}, noise_gen)
                out = task.loss(head, batch)
                acc.backward(out["loss"])
                if cfg.grad_clip_value:
                    acc.clip_grad_value_(params, cfg.grad_clip_value)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                rec = {"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0],
                       **{k: round(float(v.detach() if torch.is_tensor(v) else v), 6) for k, v in out.items()
                          if torch.is_tensor(v) and v.numel() == 1 or isinstance(v, (int, float))},
                       "t": round(time.time() - t0, 2)}
                history.append(rec)
                if logf is not None and step % cfg.log_every == 0:
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec.get('acc', float('nan')):.3f}")
                if step % max(1, cfg.log_every * 20) == 0:
                    log.info(f"train: step {step}/{total_steps} epoch {epoch} " +
                             " ".join(f"{k}={rec[k]:.4g}" for k in _scalars(rec)))
                if step % cfg.save_every == 0:
                    save(epoch)
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    stopped = True
                    break
            if stopped:
                break
            save(epoch + 1)
            log.info(f"train: epoch {epoch} done at step {step} ({time.time() - t0:.0f} s)")
    finally:
        if logf is not None:
            logf.close()
        bar.close()
    if stopped:
        save(step // steps_per_epoch)
    head.eval()
    return TrainResult(step=step, epochs_done=step // steps_per_epoch, seconds=time.time() - t0,
                       epoch_losses=summarize_epochs(history), resumed_from=resumed_from,
                       finished=step >= total_steps, fused_adamw=fused)


_BOOKKEEPING = ("step", "epoch", "lr", "t")


def _scalars(rec: dict) -> list[str]:
    """The task's logged scalars of a loss-log record, in the order the task returned them."""
    return [k for k in rec if k not in _BOOKKEEPING]


def summarize_epochs(history: list[dict]) -> list[dict]:
    out: dict[int, list[dict]] = {}
    for r in history:
        out.setdefault(int(r["epoch"]), []).append(r)
    res = []
    for ep, rows in sorted(out.items()):
        d = {"epoch": ep, "steps": len(rows)}
        for k in dict.fromkeys(k for r in rows for k in _scalars(r)):
            vals = [r[k] for r in rows if k in r]
            if vals:
                tail = vals[-max(1, len(vals) // 10):]
                d[k] = {"first": vals[0], "last": vals[-1], "mean": round(float(np.mean(vals)), 6),
                        "mean_last_10pct": round(float(np.mean(tail)), 6)}
        res.append(d)
    return res
