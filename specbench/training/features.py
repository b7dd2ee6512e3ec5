"""Target feature cache: tokens, loss mask and the target's last hidden states, extracted once.

The cache is a `datasets` (Arrow) dataset saved in shards under
``cache_dir()/features/<key>/shard-00000/ ...``. The key hashes the target weights' sha256, the data
identity (source + selection + self-distillation settings), the chat template and `max_tokens`, so every
method trained on the same target and data reuses it. Rows:

- ``id`` (string), ``input_ids`` (int32 list), ``loss_mask`` (int8 list: 1 on assistant-reply tokens),
- ``hidden``: ``L x H`` float16, the input of the target's LM head, i.e.
  ``model.get_decoder()(input_ids).last_hidden_state`` (after the final norm), at every position.

Extraction is resumable: each shard is written to a temporary directory and renamed into place when
complete; finished shards are skipped on the next run. Progress goes to a tqdm bar and to the log.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import sha256_bytes, sha256_json, utc_now, write_json

__all__ = ["FeatureExample", "feature_cache_key", "feature_cache_dir", "extract_features", "load_feature_cache",
           "FeatureCache", "target_hidden_states", "prepare_features", "heldout_conversations",
           "HELDOUT_TAIL", "regenerate_conversations"]

_FORMAT = 1
log = logging.getLogger(__name__)


@dataclass
class FeatureExample:
    id: str
    input_ids: list[int]
    loss_mask: list[int]


def feature_cache_key(*, target_sha256: str, data_ident: str, selection: dict, max_tokens: int,
                      chat_template: str | None) -> str:
    """Stable hex key of everything that determines the cache's content."""
    payload = {
        "format": _FORMAT,
        "target_sha256": target_sha256,
        "data": data_ident,
        "selection": selection,
        "max_tokens": int(max_tokens),
        "chat_template_sha256": sha256_bytes((chat_template or "").encode()),
        "features": "last_hidden_state(float16)",
    }
    return sha256_json(payload)


def feature_cache_dir(key: str, cache: Path | None = None) -> Path:
    from ..models.registry import cache_dir

    return (Path(cache) if cache is not None else cache_dir()) / "features" / key[:24]


@torch.no_grad()
def target_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states (the LM head's input) of a causal LM: ``get_decoder()(...).last_hidden_state``."""
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def _hidden_array(hs: Sequence[np.ndarray], hidden: int):
    import pyarrow as pa

    flat = pa.array(np.concatenate([h.reshape(-1) for h in hs]) if hs else np.zeros(0, np.float16),
                    type=pa.float16())
    fsl = pa.FixedSizeListArray.from_arrays(flat, hidden)
    offs = np.concatenate([[0], np.cumsum([len(h) for h in hs])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offs), fsl)


def _write_shard(path: Path, rows: list[tuple[FeatureExample, np.ndarray]], hidden: int) -> None:
    import datasets
    import pyarrow as pa

    table = pa.table({
        "id": pa.array([r[0].id for r in rows], type=pa.string()),
        "input_ids": pa.array([np.asarray(r[0].input_ids, np.int32) for r in rows], type=pa.list_(pa.int32())),
        "loss_mask": pa.array([np.asarray(r[0].loss_mask, np.int8) for r in rows], type=pa.list_(pa.int8())),
        "hidden": _hidden_array([r[1] for r in rows], hidden),
    })
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset(datasets.table.InMemoryTable(table)).save_to_disk(str(tmp))
    (tmp / "DONE").write_text(json.dumps({"rows": len(rows), "tokens": int(sum(len(r[0].input_ids) for r in rows))}))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _shard_done(path: Path) -> bool:
    return (path / "DONE").is_file()


def extract_features(model, examples: Sequence[FeatureExample], out_dir: Path, *, meta: dict,
                     shard_size: int = 64, batch_tokens: int = 2048, progress: bool = True) -> Path:
    """Run the target over `examples` and store the feature cache in `out_dir` (resumable, sharded).

    Sequences within a shard are batched by length (right padding; at most `batch_tokens` padded tokens
    per forward). Returns `out_dir`. `meta` is written to ``out_dir/meta.json`` (and checked on resume:
    a cache directory with a different meta is an error, never silently mixed).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta.update({"format": _FORMAT, "shard_size": shard_size, "n_examples": len(examples),
                 "n_tokens": int(sum(len(e.input_ids) for e in examples)),
                 "n_loss_tokens": int(sum(sum(e.loss_mask) for e in examples))})
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        strip = lambda m: {k: v for k, v in m.items() if k not in ("complete", "extraction_seconds", "created")}  # noqa: E731
        if strip(old) != strip(meta):
            differs = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise RuntimeError(f"feature cache {out_dir} was made with different settings; delete it or use another "
                               f"cache dir (differs in: {differs})")
        if old.get("complete"):
            return out_dir
    else:
        meta["created"] = utc_now()
        write_json(meta_path, meta)
    hidden = int(model.config.hidden_size)
    device = next(model.parameters()).device
    n_shards = (len(examples) + shard_size - 1) // shard_size
    todo = [s for s in range(n_shards) if not _shard_done(out_dir / f"shard-{s:05d}")]
    total_tokens = sum(len(e.input_ids) for s in todo for e in examples[s * shard_size:(s + 1) * shard_size])
    log.info(f"feature extraction: {len(examples)} sequences in {n_shards} shards, "
             f"{n_shards - len(todo)} already done; {total_tokens} tokens to go -> {out_dir}")
    t0 = time.time()
    done_tokens = 0
    bar = tqdm(total=total_tokens, unit="tok", desc="features", disable=not progress, mininterval=5)
    for s in todo:
        chunk = list(examples[s * shard_size:(s + 1) * shard_size])
        order = sorted(range(len(chunk)), key=lambda i: -len(chunk[i].input_ids))
        feats: dict[int, np.ndarray] = {}
        i = 0
        while i < len(order):
            L = len(chunk[order[i]].input_ids)
            nb = max(1, batch_tokens // max(L, 1))
            idx = order[i:i + nb]
            i += len(idx)
            ids = torch.zeros(len(idx), L, dtype=torch.long)
            att = torch.zeros(len(idx), L, dtype=torch.long)
            for r, j in enumerate(idx):
                seq = chunk[j].input_ids
                ids[r, :len(seq)] = torch.tensor(seq)
                att[r, :len(seq)] = 1
            h = target_hidden_states(model, ids.to(device), att.to(device)).float().cpu()
            for r, j in enumerate(idx):
                feats[j] = h[r, :len(chunk[j].input_ids)].to(torch.float16).numpy()
            n = int(att.sum())
            done_tokens += n
            bar.update(n)
        _write_shard(out_dir / f"shard-{s:05d}", [(chunk[j], feats[j]) for j in range(len(chunk))], hidden)
        el = time.time() - t0
        log.info(f"features: shard {s + 1}/{n_shards} done; {done_tokens}/{total_tokens} tokens, "
                 f"{done_tokens / max(el, 1e-9):.0f} tok/s, "
                 f"eta {(total_tokens - done_tokens) / max(done_tokens / max(el, 1e-9), 1e-9):.0f} s")
    bar.close()
    meta["complete"] = True
    meta["extraction_seconds"] = round(time.time() - t0, 1)
    write_json(meta_path, meta)
    return out_dir


class FeatureCache:
    """Random access to a finished feature cache: ``cache[i] -> dict(input_ids, loss_mask, hidden)`` as tensors."""

    def __init__(self, path: Path):
        import datasets

        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        if not self.meta.get("complete"):
            raise RuntimeError(f"feature cache {self.path} is incomplete; run the extraction again (it resumes)")
        shards = sorted(p for p in self.path.glob("shard-*") if p.is_dir() and not p.name.startswith("."))
        parts = [datasets.load_from_disk(str(p)) for p in shards]
        self.dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        self._np = self.dataset.with_format("numpy")
        self.lengths = [len(x) for x in self.dataset["input_ids"]]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        row = self._np[int(i)]
        return {
            "id": str(row["id"]),
            "input_ids": torch.from_numpy(np.asarray(row["input_ids"], dtype=np.int64)),
            "loss_mask": torch.from_numpy(np.asarray(row["loss_mask"], dtype=np.float32)),
            "hidden": torch.from_numpy(np.asarray(row["hidden"], dtype=np.float32)),
        }


def load_feature_cache(path: Path) -> FeatureCache:
    return FeatureCache(path)


# ---------------------------------------------------------------- end to end: data -> cache


HELDOUT_TAIL = 200  # the last usable conversations of a source are reserved for held-out checks


def heldout_tail(n_usable: int) -> int:
    """How many of the last usable conversations are held out: 200, or a tenth of a small source."""
    return min(HELDOUT_TAIL, n_usable // 10)


def prepare_features(target, *, data: str = "sharegpt", max_conversations: int, max_tokens: int = 512,
                     start: int = 0, self_distill: bool = False, distill_kwargs: dict | None = None,
                     feature_cache: Path | None = None, cache: Path | None = None, shard_size: int = 64,
                     progress: bool = True) -> tuple[Path, dict]:
    """Read + format the training conversations and extract the target's features (cached, resumable).

    `target` is a LoadedModel (model, tokenizer, name, weights_sha256). Conversations are the usable ones
    number `start`..`start+max_conversations` of the source, after decontamination against the evaluation
    prompts; the last HELDOUT_TAIL usable conversations of the source are never used for training.
    Returns (cache directory, data info for the manifest).
    """
    from .sharegpt import ReadStats, format_conversation, load_conversations, resolve_source

    src = resolve_source(data, cache=cache, progress=progress)
    tok = target.tokenizer
    stats = ReadStats()
    t0 = time.time()
    convs = load_conversations(src, start=0, limit=None, stats=stats)
    n_usable = len(convs)
    tail = heldout_tail(n_usable)
    train_pool = convs[:max(0, n_usable - tail)]
    selection = {"start": int(start), "max_conversations": int(max_conversations), "decontaminated": True,
                 "heldout_tail": tail, "self_distill": bool(self_distill)}
    if self_distill:
        selection["distill"] = dict(sorted((distill_kwargs or {}).items()))
    key = feature_cache_key(target_sha256=target.weights_sha256, data_ident=src.ident, selection=selection,
                            max_tokens=max_tokens, chat_template=getattr(tok, "chat_template", None))
    out_dir = Path(feature_cache) if feature_cache is not None else feature_cache_dir(key, cache)
    chosen = train_pool[start:start + max_conversations]
    log.info(f"data: {src.description}: {stats.records} records read (truncated at the cut: {stats.truncated}), "
             f"{n_usable} usable, skipped {stats.skipped}; using {len(chosen)} (#{start}..) "
             f"in {time.time() - t0:.1f} s")
    if len(chosen) < max_conversations:
        log.info(f"data: only {len(chosen)} conversations available (asked {max_conversations})")
    if self_distill:
        chosen = regenerate_conversations(target.model, tok, chosen, out_dir=out_dir, max_tokens=max_tokens,
                                          progress=progress, **(distill_kwargs or {}))
    examples = []
    n_trunc = 0
    for cid, conv in chosen:
        f = format_conversation(tok, conv, max_tokens)
        n_trunc += f.truncated
        if sum(f.loss_mask) == 0 or len(f.input_ids) < 2:
            continue
        examples.append(FeatureExample(cid, f.input_ids, f.loss_mask))
    info = {
        "source": src.description, "source_id": src.ident, "records_read": stats.records,
        "source_truncated": stats.truncated, "usable_conversations": n_usable, "skipped": stats.skipped,
        "heldout_tail": tail, "start": start, "conversations_used": len(examples),
        "conversations_truncated_to_max_tokens": n_trunc, "max_tokens": max_tokens, "self_distill": self_distill,
        "tokens": int(sum(len(e.input_ids) for e in examples)),
        "loss_tokens": int(sum(sum(e.loss_mask) for e in examples)), "cache_key": key,
    }
    meta = {"key": key, "target": target.name, "target_sha256": target.weights_sha256, "data": src.ident,
            "selection": selection, "max_tokens": max_tokens}
    extract_features(target.model, examples, out_dir, meta=meta, shard_size=shard_size, progress=progress)
    info["feature_cache"] = str(out_dir)
    done_meta = json.loads((out_dir / "meta.json").read_text())
    info["feature_extraction"] = {k: done_meta.get(k) for k in ("created", "extraction_seconds")}
    return out_dir, info


def heldout_conversations(data: str = "sharegpt", n: int = 50, cache: Path | None = None):
    """The last `n` (<= heldout_tail) usable conversations of the source: never used for training."""
    from .sharegpt import load_conversations, resolve_source

    convs = load_conversations(resolve_source(data, cache=cache, progress=False), start=0, limit=None)
    return convs[len(convs) - min(n, heldout_tail(len(convs))):]


# ---------------------------------------------------------------- self-distillation (HASS appendix D)


def parse_distill_settings(text: str) -> list[tuple[float, float]]:
    """``"T:P,T:P,..."`` (temperature:top_p pairs; ``0`` for greedy) -> [(T, P), ...]."""
    out = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        t, _, p = part.partition(":")
        try:
            pair = (float(t), float(p or 1.0))
        except ValueError:
            raise ValueError(f"distillation setting {part!r} is not temperature:top_p (e.g. 0.7:0.95)") from None
        if pair[0] < 0 or not 0 < pair[1] <= 1:
            raise ValueError(f"distillation setting {part!r}: temperature >= 0 and 0 < top_p <= 1")
        out.append(pair)
    if not out:
        raise ValueError("no distillation setting given (e.g. 0:1,0.7:0.95,1:1)")
    return out


@torch.no_grad()
def regenerate_conversations(model, tokenizer, convs, *, out_dir: Path, max_tokens: int = 512, batch_size: int = 8,
                             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                             settings: Sequence[Sequence[float]] | None = None, progress: bool = True):
    """Self-distillation data: the target re-answers every user turn, its own replies kept in the context.

    HASS appendix D (after Medusa / DistillSpec): "we feed the prompts from the ShareGPT dataset into the
    target models recursively and collect the responses as multi-turn conversations"; the TVD++ paper's
    distillation set does the same at several temperatures and top-p. `settings` [(T, top_p), ...]
    (default: the one `temperature`/`top_p`) are assigned round-robin by the conversation's position in
    `convs`. Conversations of one setting are processed in batches, turn by turn (left-padded batched
    ``generate``: greedy at temperature 0, else sampled from a seeded generator); a conversation stops once
    its context reaches `max_tokens`. Results (with their setting) are appended to ``out_dir/distilled.jsonl``
    per batch, so an interrupted run resumes where it stopped. Returns the regenerated ``(id, messages)``
    list (same order).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "distilled.jsonl"
    done: dict[str, list[dict]] = {}
    if store.is_file():
        for line in store.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            done[rec["id"]] = rec["messages"]
    settings = [(float(t), float(p)) for t, p in (settings or [(temperature, top_p)])]
    todo = [(i, cid, conv) for i, (cid, conv) in enumerate(convs) if cid not in done]
    log.info(f"self-distillation: {len(convs)} conversations, {len(convs) - len(todo)} already regenerated, "
             f"settings (temperature, top_p) {settings} -> {store}")
    if not todo:
        return [(cid, done[cid]) for cid, _ in convs if done.get(cid)]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bar = tqdm(total=len(todo), unit="conv", desc="self-distill", disable=not progress)
    try:
        with open(store, "a") as f:
            for s_idx, (temp, tp) in enumerate(settings):
                mine = [(cid, conv) for i, cid, conv in todo if i % len(settings) == s_idx]
                for b in range(0, len(mine), batch_size):
                    batch = mine[b:b + batch_size]
                    hist = _answer_batch(model, tokenizer, batch, temp, tp, gen, max_tokens, max_new_tokens)
                    for (cid, _), msgs in zip(batch, hist):
                        done[cid] = msgs if any(m["role"] == "assistant" for m in msgs) else []
                        f.write(json.dumps({"id": cid, "temperature": temp, "top_p": tp, "messages": done[cid]})
                                + "\n")
                    f.flush()
                    bar.update(len(batch))
    finally:
        tokenizer.padding_side = old_side
        bar.close()
    return [(cid, done[cid]) for cid, _ in convs if done.get(cid)]


def _answer_batch(model, tokenizer, batch, temperature: float, top_p: float, gen: torch.Generator, max_tokens: int,
                  max_new_tokens: int) -> list[list[dict]]:
    """The target's answers to every user turn of each conversation of `batch`, turn by turn, batched."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    users = [[m for m in conv if m["role"] == "user"] for _, conv in batch]
    hist = [[m for m in conv[:1] if m["role"] == "system"] for _, conv in batch]
    alive = list(range(len(batch)))
    k = 0
    while alive:
        rows, prompts = [], []
        for i in alive:
            if k >= len(users[i]):
                continue
            msgs = hist[i] + [users[i][k]]
            ids = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            if len(ids) >= max_tokens - 8:
                continue
            rows.append(i)
            prompts.append(ids)
        if not rows:
            break
        L = max(len(p) for p in prompts)
        inp = torch.full((len(prompts), L), pad_id, dtype=torch.long)
        att = torch.zeros(len(prompts), L, dtype=torch.long)
        for r, p in enumerate(prompts):
            inp[r, L - len(p):] = torch.tensor(p)
            att[r, L - len(p):] = 1
        budget = max(1, min(max_new_tokens, max_tokens - min(len(p) for p in prompts)))
        kw = {"do_sample": temperature > 0, "max_new_tokens": budget, "pad_token_id": pad_id}
        if temperature > 0:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kw.update(temperature=temperature, top_p=top_p)
        outs = model.generate(input_ids=inp.to(device), attention_mask=att.to(device), **kw)
        for r, i in enumerate(rows):
            reply = tokenizer.decode(outs[r, L:], skip_special_tokens=True).strip()
            hist[i] += [users[i][k], {"role": "assistant", "content": reply}]
        alive = rows
        k += 1
    return hist
