"""The one training pipeline behind ``specbench train --method M``, for every task:

    load the target -> read and format the data -> extract or reuse the feature cache -> the task's head
    -> the resumable train loop -> the task's export -> its held-out check -> MANIFEST.json

`main(task_cls, argv)` is the command line: the options every task shares, then one option per field of
the task's `Options` (so loss weights and the like are options, with their defaults in ``--help``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..artifacts import check_writable, environment, sha256_file, sha256_json, write_json
from ..logs import configure, log_file
from ..models.draft_heads import DRAFT_VOCAB_FILE, CheckpointError, checkpoint_sha256, state_mismatch
from .tasks import Task, add_options, options_from_args
from .trainer import TrainConfig, train_loop

log = logging.getLogger(__name__)

__all__ = ["main", "train", "write_draft_vocab"]


def write_draft_vocab(out: Path, cache, vocab_size: int) -> dict:
    """Write `out/draft_vocab.json`: the ids of the training data's assistant tokens, most frequent first.

    The drafters' optional reduced draft vocabulary (`--param draft_vocab=N`) takes its first N ids (as
    EAGLE-3 builds its draft vocabulary from training-data frequencies).  Ties rank by id; ids never seen
    are left out (the drafter appends them in id order).  Returns the manifest's "draft_vocab" entry.
    """
    import numpy as np

    from .features import assistant_token_ranking

    ranked, counts = assistant_token_ranking(cache, vocab_size)
    write_json(Path(out) / DRAFT_VOCAB_FILE, ranked, indent=None)
    total = int(counts.sum())
    top = np.sort(counts)[::-1]
    return {"file": DRAFT_VOCAB_FILE, "what": "token ids of the training data's assistant (loss) tokens, most "
            "frequent first", "feature_cache": cache.meta.get("key"), "tokens_counted": total,
            "distinct_ids": len(ranked),
            "coverage": {str(n): round(float(top[:n].sum()) / max(total, 1), 4) for n in (2048, 4096, 8192, 16384)}}


def init_state(head, given: dict, wanted: dict, source) -> None:
    """Load the exported state `given` (from checkpoint `source`) into `head` in place, where `wanted` is what
    `head` itself exports: the same keys and shapes or an error naming the difference (a checkpoint of a
    smaller configuration, e.g. fewer draft layers, must not initialise only part of the head)."""
    parts = state_mismatch(given, wanted)
    if parts:
        raise CheckpointError(f"--init-from {source} does not match the head being trained: " + "; ".join(parts)
                              + "; start from a checkpoint of the same configuration (layers, variant, draft "
                              "vocabulary)")
    # in place over the full state dict: what the task froze (not exported) stays as the head made it
    head.load_state_dict({**head.state_dict(), **{k: v.float() if v.is_floating_point() else v
                                                   for k, v in given.items()}}, strict=True)


def train(task: Task, target_spec: str, out: Path, *, data: str = "sharegpt", max_conversations: int | None = 1000,
          max_tokens: int = 512, epochs: int = 3, lr: float = 5e-4, batch_size: int = 4, seed: int = 0,
          corpus: Path | Sequence[Path] | None = None, resume: bool = True,
          feature_cache: Path | None = None, work_dir: Path | None = None, warmup_steps: int | None = None,
          save_every: int = 50, grad_clip_value: float = 0.5, heldout: int = 50, device: str = "auto",
          dtype: str = "float32", progress: bool = True, max_steps: int | None = None, command: str | None = None,
          init_from: Path | None = None) -> Path:
    """Train `task`'s head for `target_spec` and write it to `out` (draft-head checkpoint + MANIFEST.json).

    The target comes from specbench.models.load_model (embedded name, local dir or HF cache); the trainer
    state lives in `work_dir` (default ``cache_dir()/train/<task>-<hash of the settings>``), so an
    interrupted run resumes bit-identically. `init_from`: a checkpoint of the task's architecture whose
    weights initialise the head (a second training phase); its MANIFEST.json is embedded in the new one.
    `corpus`: train on a distillation corpus (`specbench distill`), or several shards of one, instead of
    `data`'s own replies.
    The held-out check is the top-1 agreement on `heldout` ShareGPT conversations never trained on.
    Returns `out`.
    """
    from accelerate import Accelerator

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
                                           max_tokens=max_tokens, corpus=corpus, feature_cache=feature_cache,
                                           progress=progress and acc.is_main_process)
    cache = load_feature_cache(fdir)
    log.info(f"feature cache {fdir}: {len(cache)} sequences, {sum(cache.lengths)} tokens")

    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, warmup_steps=warmup_steps,
                      save_every=save_every, grad_clip_value=grad_clip_value, max_steps=max_steps)
    fp: dict = {"target_sha256": loaded.weights_sha256, "cache_key": data_info["cache_key"]}
    init_info = None
    if init_from is not None:
        init_from = Path(init_from)
        init_info = {"path": str(init_from), "weights_sha256": checkpoint_sha256(init_from)}
        if (init_from / "MANIFEST.json").is_file():
            init_info["manifest"] = json.loads((init_from / "MANIFEST.json").read_text())
        fp["init_from_sha256"] = init_info["weights_sha256"]
    if work_dir is None:
        wkey = sha256_json({"out": str(out.resolve()), **fp, "task": task.describe(),
                            "train": cfg.to_dict() | {"max_steps": None}})[:16]
        work_dir = cache_dir() / "train" / f"{task.name}-{wkey}"
    log.info(f"trainer state and loss log in {work_dir}")

    task.target = (loaded.name, loaded.weights_sha256)
    head = task.make_head(model, cache, seed)
    if init_from is not None:
        src = task.load(init_from, model)  # strict: keys, shapes, hidden and vocab sizes
        init_state(head, task.exported_state(src), task.exported_state(head), init_from)
        log.info(f"initialised the head from {init_from} (sha256 {init_info['weights_sha256'][:16]}...)")
    res = train_loop(head, cache, task, cfg, Path(work_dir), resume=resume, progress=progress, accelerator=acc,
                     config_fingerprint=fp)
    log.info(f"training stopped at step {res.step} (finished={res.finished}) after {res.seconds:.0f} s")
    if not acc.is_main_process:
        return out
    head = acc.unwrap_model(head) if hasattr(acc, "unwrap_model") else head
    head = getattr(head, "module", head)

    out.mkdir(parents=True, exist_ok=True)
    task.export(head, out)
    wsha = sha256_file(out / "model.safetensors")
    dv = write_draft_vocab(out, cache, int(model.get_output_embeddings().weight.shape[0]))

    ho = heldout_conversations(data, heldout) if heldout else []
    # measured on the exported checkpoint, loaded as decoding loads it (a task may train with another attention)
    exported = task.load(out, model)
    hacc = task.heldout(exported, model, loaded.tokenizer, ho, max_tokens) if ho else None
    if hacc:
        log.info(f"held-out top-1 agreement with the target: {hacc['top1']:.4f} on {hacc['tokens']} tokens "
                 f"of {hacc['conversations']} conversations")
    shutil.copyfile(Path(work_dir) / "loss_log.jsonl", out / "loss_log.jsonl")
    import accelerate

    n_params = sum(v.numel() for v in task.exported_state(head).values() if v.is_floating_point())
    manifest = {
        "method": task.name,
        "variant": task.variant(),
        "format": task.format(),
        "weights_file": "model.safetensors", "weights_sha256": wsha, "weights_dtype": "float32",
        "trainable_parameters": n_params,
        "target": {"name": loaded.name, "source": loaded.source, "weights_sha256": loaded.weights_sha256},
        "data": data_info,
        "training": {**cfg.to_dict(), "fused_adamw": res.fused_adamw, "task": task.describe(), "optimizer": "AdamW",
                     "schedule": "linear warm-up then linear decay to 0",
                     "steps": res.step, "finished": res.finished, "resumed_from_step": res.resumed_from,
                     "train_seconds": round(res.seconds, 1)},
        "losses_per_epoch": res.epoch_losses,
        "heldout": {**(hacc or {}), "what": f"{task.heldout_what}, assistant tokens only, the last {heldout} usable "
                    "conversations of the source (never trained on)"},
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


def parser(task_cls: type[Task], method: str | None = None, defaults: dict | None = None) -> argparse.ArgumentParser:
    """The command line of `task_cls`'s training, as method `method` (default: the task's name) runs it, with
    the task options' `defaults` replaced (a method sharing a task with another: kld, tvd and tvdpp)."""
    method = method or task_cls.name
    p = argparse.ArgumentParser(prog=f"specbench train --method {method}",
                                description=f"Train a {task_cls.arch} draft head for the {method} method: "
                                + train.__doc__.splitlines()[0])
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", default="sharegpt")
    p.add_argument("--max-conversations", type=int, default=None, help="default 1000 (a corpus: all)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", type=Path, nargs="+",
                   help="train on a distillation corpus (the target's own answers, from `specbench distill`) instead "
                        "of the data's replies, or on several shards of one (disjoint --start ranges); "
                        "--max-conversations then defaults to all of it")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--feature-cache", type=Path)
    p.add_argument("--work-dir", type=Path)
    p.add_argument("--heldout", type=int, default=50)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log", type=Path, help="also append the log to this file")
    p.add_argument("--init-from", type=Path, help=f"{task_cls.arch} checkpoint to start from (a second phase)")
    p.add_argument("--no-progress", action="store_true")
    add_options(p, task_cls.Options, defaults)
    return p


def main(task_cls: type[Task], argv: list[str] | None = None, *, method: str | None = None,
         defaults: dict | None = None) -> int:
    """``specbench train --method M ...`` for the method whose task is `task_cls` (see `parser`)."""
    from accelerate import PartialState

    p = parser(task_cls, method, defaults)
    a = p.parse_args(argv)
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.log:  # checked before hours of feature extraction, not when the first line is logged
        check_writable(a.log, "--log")
    if a.threads:
        torch.set_num_threads(a.threads)
    task = task_cls(options_from_args(task_cls.Options, a), seed=a.seed)
    if a.max_conversations is not None and a.max_conversations < 1:
        p.error(f"--max-conversations must be >= 1, got {a.max_conversations}")
    if a.corpus is not None:  # checked before the target is loaded
        from .corpus import CorpusError, load_corpora

        try:
            load_corpora(a.corpus)
        except CorpusError as e:
            p.error(str(e))
    max_conv = a.max_conversations if a.max_conversations or a.corpus else 1000
    cmd = (f"specbench train --method {method or task_cls.name} "
           + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])))
    # Long jobs: timestamped lines, one copy of them (the main process's; the others only warn), and --log.
    configure(timestamps=True, level=logging.INFO if PartialState().is_main_process else logging.WARNING)
    init = a.init_from
    with log_file(a.log):
        for phase in task.phases():  # each phase starts from the one before (the first from --init-from)
            out = a.out / phase.subdir if phase.subdir else a.out
            work = a.work_dir / phase.subdir if a.work_dir and phase.subdir else a.work_dir
            init = train(task_cls(phase.opts, seed=a.seed), a.target, out, data=a.data,
                         max_conversations=max_conv, max_tokens=a.max_tokens,
                         epochs=phase.epochs or a.epochs, lr=phase.lr or a.lr, batch_size=a.batch_size, seed=a.seed,
                         corpus=a.corpus, resume=not a.no_resume,
                         feature_cache=a.feature_cache,
                         work_dir=work, heldout=a.heldout, save_every=a.save_every, progress=not a.no_progress,
                         command=cmd, init_from=init)
    return 0
