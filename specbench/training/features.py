"""Target feature cache: tokens, loss mask and the target's last hidden states, extracted once.

The cache is a `datasets` (Arrow) dataset saved in shards under
``cache_dir()/features/<key>/shard-00000/ ...``. The key hashes the target weights' sha256, the data
identity (source + selection, or a distillation corpus's content sha256), the chat template and `max_tokens`, so every
method trained on the same target and data reuses it. Rows:

- ``id`` (string), ``input_ids`` (int32 list), ``loss_mask`` (int8 list: 1 on assistant-reply tokens),
- ``hidden``: ``L x H`` float16, the input of the target's LM head, i.e.
  ``model.get_decoder()(input_ids).last_hidden_state`` (after the final norm), at every position;
- ``target_lse`` (float32 list) and ``target_argmax`` (int32 list): the logsumexp and the argmax of the target's
  full-vocabulary logits over the stored (float16) hidden state at every position (`target_logit_stats`). A
  drafter over a reduced vocabulary S needs the target's p on S only, ``exp(W_S h - lse)``: with the
  logsumexp cached, its step computes |S| rows of the LM head instead of all of them (12x fewer at S = 4,096
  of SmolLM2's 49,152), once for every drafter trained on the cache.

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
           "assistant_token_ranking", "draft_vocab_ids", "target_logit_stats"]

_FORMAT = 2  # 2: target_lse and target_argmax beside the hidden states
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
        "features": "last_hidden_state(float16), target_lse, target_argmax",
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


@torch.no_grad()
def target_logit_stats(lm_head: torch.nn.Module, hidden: torch.Tensor, rows: int = 512
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp, argmax) of the target's logits ``lm_head(hidden)`` over the full vocabulary, per row of
    `hidden` (..., H), in float32 and int64; computed `rows` rows at a time to bound the logits' memory. In float32
    whatever the model's dtype: a drafter divides float32 logits of its vocabulary by this normaliser."""
    flat = hidden.reshape(-1, hidden.shape[-1]).float()
    w = lm_head.weight.float()
    b = None if getattr(lm_head, "bias", None) is None else lm_head.bias.float()
    lse, top = [], []
    for i in range(0, flat.shape[0], rows):
        logits = torch.nn.functional.linear(flat[i:i + rows], w, b)
        lse.append(torch.logsumexp(logits, -1))
        top.append(logits.argmax(-1))
    shape = hidden.shape[:-1]
    if not lse:
        return torch.zeros(shape), torch.zeros(shape, dtype=torch.long)
    return torch.cat(lse).reshape(shape), torch.cat(top).reshape(shape)


def _hidden_array(hs: Sequence[np.ndarray], hidden: int):
    import pyarrow as pa

    flat = pa.array(np.concatenate([h.reshape(-1) for h in hs]) if hs else np.zeros(0, np.float16),
                    type=pa.float16())
    fsl = pa.FixedSizeListArray.from_arrays(flat, hidden)
    offs = np.concatenate([[0], np.cumsum([len(h) for h in hs])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offs), fsl)


def _write_shard(path: Path, rows: list[tuple[FeatureExample, tuple[np.ndarray, np.ndarray, np.ndarray]]],
                 hidden: int) -> None:
    """Rows of (example, (hidden float16, target_lse float32, target_argmax int32))."""
    import datasets
    import pyarrow as pa

    table = pa.table({
        "id": pa.array([r[0].id for r in rows], type=pa.string()),
        "input_ids": pa.array([np.asarray(r[0].input_ids, np.int32) for r in rows], type=pa.list_(pa.int32())),
        "loss_mask": pa.array([np.asarray(r[0].loss_mask, np.int8) for r in rows], type=pa.list_(pa.int8())),
        "hidden": _hidden_array([r[1][0] for r in rows], hidden),
        "target_lse": pa.array([r[1][1] for r in rows], type=pa.list_(pa.float32())),
        "target_argmax": pa.array([r[1][2] for r in rows], type=pa.list_(pa.int32())),
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
        feats: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
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
            # the stored (float16) states, and the target's logit statistics over exactly those
            h16 = target_hidden_states(model, ids.to(device), att.to(device)).to(torch.float16)
            lse, top = target_logit_stats(model.get_output_embeddings(), h16.float())
            h16, lse, top = h16.cpu(), lse.cpu(), top.cpu()
            for r, j in enumerate(idx):
                n = len(chunk[j].input_ids)
                feats[j] = (h16[r, :n].numpy(), lse[r, :n].numpy(), top[r, :n].to(torch.int32).numpy())
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
    """Random access to a finished feature cache: ``cache[i] -> dict(input_ids, loss_mask, hidden, target_lse,
    target_argmax)`` as tensors."""

    def __init__(self, path: Path):
        import datasets

        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        if self.meta.get("format") != _FORMAT:
            raise RuntimeError(f"feature cache {self.path} is of format {self.meta.get('format')}, this specbench "
                               f"reads format {_FORMAT}; delete it and extract the features again")
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
            "target_lse": torch.from_numpy(np.asarray(row["target_lse"], dtype=np.float32)),
            "target_argmax": torch.from_numpy(np.asarray(row["target_argmax"], dtype=np.int64)),
        }


def load_feature_cache(path: Path) -> FeatureCache:
    return FeatureCache(path)


def assistant_token_ranking(cache, vocab_size: int) -> tuple[list[int], np.ndarray]:
    """(ids of the assistant (loss) tokens of `cache` (a FeatureCache, or any sequence of rows with input_ids and
    loss_mask), most frequent first, ties by id; the count of every id): the frequency ranking a reduced draft
    vocabulary is taken from (EAGLE-3, FR-Spec)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    if isinstance(cache, FeatureCache):  # the token columns only, not the hidden states
        cols = cache.dataset.select_columns(["input_ids", "loss_mask"]).with_format("numpy")
    else:
        cols = [{k: np.asarray(r[k]) for k in ("input_ids", "loss_mask")} for r in cache]
    for row in cols:
        ids = np.asarray(row["input_ids"], dtype=np.int64)
        counts += np.bincount(ids[np.asarray(row["loss_mask"]) > 0], minlength=vocab_size)
    seen = np.flatnonzero(counts)
    return seen[np.lexsort((seen, -counts[seen]))].tolist(), counts


def draft_vocab_ids(data, vocab_size: int, n: int) -> list[int]:
    """The `n` ids a reduced draft vocabulary of `n` trains over: the data's assistant tokens by frequency, then
    unlisted ids in id order (the ranking training writes to draft_vocab.json, whose first `n` ids decoding's
    ``draft_vocab=n`` starts from)."""
    from ..methods.draft_vocab import complete_ranking

    if data is None:
        raise ValueError("draft_vocab needs the training data (its assistant-token frequencies)")
    if not 0 < n < vocab_size:
        raise ValueError(f"draft_vocab must lie in 1..{vocab_size - 1} (0 = the full vocabulary), got {n}")
    return complete_ranking(assistant_token_ranking(data, vocab_size)[0], vocab_size)[:n]


# ---------------------------------------------------------------- end to end: data -> cache


def prepare_features(target, *, data: str = "sharegpt", max_conversations: int | None, max_tokens: int = 512,
                     start: int = 0, corpus: Path | Sequence[Path] | None = None, feature_cache: Path | None = None,
                     cache: Path | None = None, shard_size: int = 64, progress: bool = True) -> tuple[Path, dict]:
    """Read + format the training conversations and extract the target's features (cached, resumable).

    `target` is a LoadedModel (model, tokenizer, name, weights_sha256). Without `corpus` the conversations
    are the usable ones number `start`..`start+max_conversations` of `data`, after decontamination against
    the evaluation prompts, never the last HELDOUT_TAIL usable ones of the source. With `corpus` (a
    directory written by `specbench distill`: the target's own answers, as token ids; or several, shards of one
    corpus, `corpus.load_corpora`) they are its first `max_conversations` (all when None), cut at
    `max_tokens`. Returns (cache directory, data info for the manifest).
    """
    from .sharegpt import format_conversation, select_training_conversations

    tok = target.tokenizer
    examples = []
    n_trunc = 0
    if corpus is not None:
        from .corpus import load_corpora

        cp = load_corpora(corpus, target_sha256=target.weights_sha256)
        spec = cp.manifest["spec"]
        where = ", ".join(map(str, cp.paths))
        for r in cp.records[:max_conversations]:
            n_trunc += len(r.input_ids) > max_tokens
            ids, mask = r.input_ids[:max_tokens], r.loss_mask[:max_tokens]
            if sum(mask) and len(ids) >= 2:
                examples.append(FeatureExample(r.id, ids, mask))
        data_ident = f"corpus:sha256={cp.content_sha256}"
        selection = {"corpus": True, "max_conversations": max_conversations}
        info = {"source": f"corpus {where}: the target's answers to {spec['source']}", "source_id": data_ident,
                "corpus": {"path": where, "content_sha256": cp.content_sha256, "spec": spec,
                           "conversations": spec["conversations"], "tokens": cp.manifest["tokens"]},
                "heldout_tail": spec["selection"]["heldout_tail"], "start": spec["selection"]["start"]}
        log.info(f"data: corpus {where}: {len(cp.records)} answered conversations; using {len(examples)}")
    else:
        if max_conversations is None:
            raise ValueError("max_conversations is required without a corpus")
        sel = select_training_conversations(data, start=start, max_conversations=max_conversations, cache=cache,
                                            progress=progress)
        log.info(f"data: {sel.describe()}")
        if len(sel.chosen) < max_conversations:
            log.info(f"data: only {len(sel.chosen)} conversations available (asked {max_conversations})")
        for cid, conv in sel.chosen:
            f = format_conversation(tok, conv, max_tokens)
            n_trunc += f.truncated
            if sum(f.loss_mask) == 0 or len(f.input_ids) < 2:
                continue
            examples.append(FeatureExample(cid, f.input_ids, f.loss_mask))
        data_ident = sel.source.ident
        # self_distill False: the key every cache made before corpora existed was computed with
        selection = {**sel.spec, "self_distill": False}
        info = {"source": sel.source.description, "source_id": data_ident, "records_read": sel.stats.records,
                "source_truncated": sel.stats.truncated, "usable_conversations": sel.n_usable,
                "skipped": sel.stats.skipped, "heldout_tail": sel.tail, "start": start}
    if not examples:
        from .sharegpt import DataError

        raise DataError(f"no training sequence: no selected conversation has an assistant reply within the first "
                        f"{max_tokens} tokens; raise --max-tokens or select more conversations")
    key = feature_cache_key(target_sha256=target.weights_sha256, data_ident=data_ident, selection=selection,
                            max_tokens=max_tokens, chat_template=getattr(tok, "chat_template", None))
    out_dir = Path(feature_cache) if feature_cache is not None else feature_cache_dir(key, cache)
    info.update({
        "conversations_used": len(examples), "conversations_truncated_to_max_tokens": n_trunc,
        "max_tokens": max_tokens, "self_distill": corpus is not None,
        "tokens": int(sum(len(e.input_ids) for e in examples)),
        "loss_tokens": int(sum(sum(e.loss_mask) for e in examples)), "cache_key": key,
    })
    meta = {"key": key, "target": target.name, "target_sha256": target.weights_sha256, "data": data_ident,
            "selection": selection, "max_tokens": max_tokens}
    extract_features(target.model, examples, out_dir, meta=meta, shard_size=shard_size, progress=progress)
    info["feature_cache"] = str(out_dir)
    done_meta = json.loads((out_dir / "meta.json").read_text())
    info["feature_extraction"] = {k: done_meta.get(k) for k in ("created", "extraction_seconds")}
    return out_dir, info


def heldout_conversations(data: str = "sharegpt", n: int = 50, cache: Path | None = None):
    """The last `n` (<= heldout_tail) usable conversations of the source: never used for training."""
    from .sharegpt import heldout_tail, load_conversations, resolve_source

    convs = load_conversations(resolve_source(data, cache=cache, progress=False), start=0, limit=None)
    return convs[len(convs) - min(n, heldout_tail(len(convs))):]
