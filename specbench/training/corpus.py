"""A distillation corpus: the target's own answers to training conversations, stored as token ids.

HASS (appendix D) and the TVD++ paper (phase 2) train the draft on the target's answers to the ShareGPT
instructions. Generating them is the longest step of such a training run on a CPU, so it is a command of
its own, ``specbench distill --out DIR``, and what it writes is small enough to commit: every later run,
``specbench train --method M --corpus DIR`` on any machine, reads the same set and only extracts the
target's features again.

DIR holds

- ``corpus.jsonl.gz``: one JSON line per conversation, ``{"index", "id", "temperature", "top_p",
  "input_ids", "loss_spans", "truncated"}``: the chat-formatted token ids and the ``[start, end)`` runs of
  assistant tokens (the loss mask), one gzip member per generated batch. A batch is appended whole; one
  cut by a kill is dropped on the next run, which generates it again. Batches and their seeds are fixed by
  the selection, so a resumed corpus has the records of an uninterrupted one (on the same thread count:
  the manifest lists each run's threads).
- ``MANIFEST.json``: the spec (target weights sha256, source, selection, max_tokens, chat template,
  generation settings), progress, counts, size on disk, the content sha256 once complete, the commands.

The ids are those of the chat-formatted conversation (`format_conversation` over the decoded replies),
exactly what the feature cache is built from. Re-tokenising a reply's text can differ from the ids the
target sampled at a few merge boundaries; storing ids fixes that choice once for every run.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import shlex
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import environment, sha256_bytes, utc_now, write_json
from ..errors import SpecbenchError

__all__ = ["CORPUS_FILE", "Corpus", "CorpusError", "build_corpus", "generate_rows", "load_corpora", "load_corpus",
           "main", "parse_settings"]

CORPUS_FILE = "corpus.jsonl.gz"
MANIFEST = "MANIFEST.json"
_FORMAT = 1
log = logging.getLogger(__name__)


class CorpusError(SpecbenchError):
    """A corpus directory that cannot be used as asked (another spec, incomplete, corrupt, another target)."""


@dataclass
class CorpusRecord:
    index: int
    id: str
    input_ids: list[int]
    loss_mask: list[int]


@dataclass
class Corpus:
    paths: tuple[Path, ...]  # its directory, or the shards `load_corpora` joined
    manifest: dict
    records: list[CorpusRecord]  # by index into the source's pool; conversations without an answer left out

    @property
    def content_sha256(self) -> str:
        return self.manifest["content_sha256"]


def parse_settings(text: str) -> list[tuple[float, float]]:
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


# ---------------------------------------------------------------- records on disk


def _spans(mask: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i, m in enumerate(mask):
        if m and out and out[-1][1] == i:
            out[-1][1] = i + 1
        elif m:
            out.append([i, i + 1])
    return out


def _mask(spans: Sequence[Sequence[int]], n: int) -> list[int]:
    mask = [0] * n
    for s, e in spans:
        mask[s:e] = [1] * (e - s)
    return mask


def _line(rec: dict) -> str:
    return json.dumps(rec, separators=(",", ":"), sort_keys=True)


def _read_lines(path: Path) -> tuple[list[dict], bool]:
    """The records of `path` and whether the file ended cleanly (False: a member cut by a kill)."""
    recs: list[dict] = []
    if not path.is_file():
        return recs, True
    try:
        with gzip.open(path, "rt") as f:
            for line in f:
                recs.append(json.loads(line))
    except (EOFError, gzip.BadGzipFile, zlib.error, ValueError):
        return recs, False
    return recs, True


def _content_sha256(recs: Sequence[dict]) -> str:
    h = hashlib.sha256()
    for r in sorted(recs, key=lambda r: r["index"]):
        h.update((_line(r) + "\n").encode())
    return h.hexdigest()


def _batches(n: int, n_settings: int, batch_size: int) -> list[tuple[int, int, list[int]]]:
    """(setting index, batch number, conversation indices): settings round-robin by index, then fixed batches."""
    out = []
    for s in range(n_settings):
        mine = [i for i in range(n) if i % n_settings == s]
        out += [(s, b // batch_size, mine[b:b + batch_size]) for b in range(0, len(mine), batch_size)]
    return out


def _differs(a: dict, b: dict) -> list[str]:
    """The keys whose values differ between two specs (sorted)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _batch_seed(seed: int, setting: int, batch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{setting}:{batch}".encode()).digest()[:4], "little") & 0x7FFFFFFF


# ---------------------------------------------------------------- generation


def build_corpus(target, out_dir: Path, *, data: str = "sharegpt", start: int = 0, max_conversations: int,
                 max_tokens: int = 512, settings: Sequence[Sequence[float]] = ((0.0, 1.0),),
                 max_new_tokens: int = 256, batch_size: int = 8, seed: int = 0, progress: bool = True,
                 command: str | None = None) -> dict:
    """Generate (or finish) the corpus in `out_dir`: the target re-answers every user turn of the selected
    conversations, its own replies kept in the context, turn by turn in left-padded batches (greedy at
    temperature 0, else sampled with top-p from a seed fixed per batch). `settings` [(T, top_p), ...] are
    assigned round-robin by the conversation's index; a conversation stops once its context reaches
    `max_tokens`. `target` is a LoadedModel. Returns the manifest.
    """
    from tqdm.auto import tqdm

    from .sharegpt import format_conversation, select_training_conversations

    out_dir = Path(out_dir)
    tok = target.tokenizer
    sel = select_training_conversations(data, start=start, max_conversations=max_conversations, progress=progress)
    log.info(f"distill: {sel.describe()}")
    settings = [(float(t), float(p)) for t, p in settings]
    spec = {"format": _FORMAT, "target": target.name, "target_sha256": target.weights_sha256,
            "data": sel.source.ident, "source": sel.source.description, "selection": sel.spec,
            "conversations": len(sel.chosen), "max_tokens": int(max_tokens),
            "chat_template_sha256": sha256_bytes((getattr(tok, "chat_template", None) or "").encode()),
            "generation": {"settings": [list(x) for x in settings], "max_new_tokens": int(max_new_tokens),
                           "batch_size": int(batch_size), "seed": int(seed),
                           "sampler": "generate_rows: left-padded batches, finished rows dropped, "
                                      "decoding.sampling's top-p at T > 0"}}
    man_path, path = out_dir / MANIFEST, out_dir / CORPUS_FILE
    manifest = json.loads(man_path.read_text()) if man_path.is_file() else None
    if manifest is not None and manifest.get("spec") != spec:
        old = manifest.get("spec") or {}
        differs = _differs(old, spec)
        raise CorpusError(f"{out_dir} holds a corpus made with other settings (differs in: {differs}); use "
                          "another --out, or the command in its MANIFEST.json to finish it")
    if manifest is None and path.exists():
        raise CorpusError(f"{path} exists without {MANIFEST}; move it away or use another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = _batches(len(sel.chosen), len(settings), batch_size)
    recs, clean = _read_lines(path)
    by_index = {r["index"]: r for r in recs}
    done = {k for k, (_, _, idx) in enumerate(batches) if all(i in by_index for i in idx)}
    complete_batches = {i for k in done for i in batches[k][2]}
    rewrite = not clean or len(by_index) != len(recs) or set(by_index) != complete_batches
    if rewrite:
        keep = [by_index[i] for k in sorted(done) for i in batches[k][2]]
        log.info(f"distill: {path} ends in a cut batch; keeping the {len(keep)} records of complete batches")
        tmp = path.with_name(path.name + ".tmp")
        with gzip.open(tmp, "wt") as f:
            f.writelines(_line(r) + "\n" for r in keep)
        tmp.replace(path)
        by_index = {r["index"]: r for r in keep}
    todo = [k for k in range(len(batches)) if k not in done]
    if manifest is not None and manifest.get("complete") and not todo and not rewrite:
        log.info(f"distill: {out_dir} is complete ({manifest['conversations_answered']} answered conversations)")
        return manifest  # nothing to do: the manifest (a committed file) stays as it is
    manifest = manifest or {"kind": "specbench.corpus", "spec": spec, "created": utc_now(), "runs": []}
    run = {"date": utc_now(), "command": command or " ".join(shlex.quote(a) for a in sys.argv),
           "environment": environment(torch.device("cpu")), "batches": 0, "seconds": 0.0}
    manifest["runs"].append(run)

    def save(complete: bool) -> None:
        vals = list(by_index.values())
        answered = [r for r in vals if r["loss_spans"]]
        manifest.update({
            "complete": complete, "conversations_done": len(vals), "conversations_answered": len(answered),
            "tokens": sum(len(r["input_ids"]) for r in vals),
            "loss_tokens": sum(e - s for r in vals for s, e in r["loss_spans"]),
            "truncated_to_max_tokens": sum(bool(r["truncated"]) for r in vals),
            "file": CORPUS_FILE, "file_bytes": path.stat().st_size if path.exists() else 0,
            "content_sha256": _content_sha256(vals) if complete else None,
            "generation_seconds": round(sum(r["seconds"] for r in manifest["runs"]), 1)})
        write_json(man_path, manifest, indent=1)

    log.info(f"distill: {len(sel.chosen)} conversations in {len(batches)} batches, {len(done)} already done; "
             f"settings (temperature, top_p) {settings} -> {path}")
    old_side = tok.padding_side
    tok.padding_side = "left"
    bar = tqdm(total=sum(len(batches[k][2]) for k in todo), unit="conv", desc="distill", disable=not progress)
    try:
        for k in todo:
            t0 = time.time()
            s_idx, b, idx = batches[k]
            temp, tp = settings[s_idx]
            gen = torch.Generator(device="cpu").manual_seed(_batch_seed(seed, s_idx, b))
            hist = _answer_batch(target.model, tok, [sel.chosen[i] for i in idx], temp, tp, gen, max_tokens,
                                 max_new_tokens)
            lines = []
            for i, msgs in zip(idx, hist):
                f = format_conversation(tok, msgs, max_tokens) if any(m["role"] == "assistant" for m in msgs) \
                    else None
                rec = {"index": i, "id": sel.chosen[i][0], "temperature": temp, "top_p": tp,
                       "input_ids": f.input_ids if f else [], "loss_spans": _spans(f.loss_mask) if f else [],
                       "truncated": bool(f and f.truncated)}
                by_index[i] = rec
                lines.append(_line(rec) + "\n")
            with gzip.open(path, "at") as fh:  # one member per batch: a kill cuts at most this batch
                fh.writelines(lines)
            run["batches"] += 1
            run["seconds"] = round(run["seconds"] + time.time() - t0, 1)
            save(False)
            bar.update(len(idx))
            log.info(f"distill: batch {k + 1}/{len(batches)} (T {temp:g}, top_p {tp:g}) done; "
                     f"{len(by_index)}/{len(sel.chosen)} conversations, {manifest['tokens']} tokens")
    finally:
        tok.padding_side = old_side
        bar.close()
    save(True)
    log.info(f"distill: complete: {manifest['conversations_answered']} answered conversations, "
             f"{manifest['tokens']} tokens, {manifest['file_bytes']} bytes (content sha256 "
             f"{manifest['content_sha256'][:16]}...)")
    return manifest


def _answer_batch(model, tokenizer, batch, temperature: float, top_p: float, gen: torch.Generator, max_tokens: int,
                  max_new_tokens: int) -> list[list[dict]]:
    """The target's answers to every user turn of each conversation of `batch`, turn by turn, batched."""
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
        budgets = [max(1, min(max_new_tokens, max_tokens - len(p))) for p in prompts]
        outs = generate_rows(model, prompts, budgets, temperature, top_p, gen, _eos_ids(model, tokenizer), pad_id)
        for r, i in enumerate(rows):
            reply = tokenizer.decode(outs[r], skip_special_tokens=True).strip()
            hist[i] += [users[i][k], {"role": "assistant", "content": reply}]
        alive = rows
        k += 1
    return hist


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}


@torch.inference_mode()
def generate_rows(model, prompts: Sequence[Sequence[int]], budgets: Sequence[int], temperature: float,
                  top_p: float, gen: torch.Generator, eos_ids: set[int], pad_id: int) -> list[list[int]]:
    """Each prompt's continuation (its end-of-sequence token included, at most its budget): greedy at
    temperature 0, else sampled from `gen` with `decoding.sampling`'s temperature and top-p.

    One left-padded prefill, then one token per row per forward. A row that ends leaves the batch at
    once, its KV rows dropped (`Cache.reorder_cache` over the rows kept): on a CPU a forward's cost is
    about linear in its rows, and generate() would carry every finished row to the longest answer.
    """
    from transformers import DynamicCache

    from ..decoding.sampling import SamplingConfig, probs, sample
    from ..models.hf_compat import cache_kwargs

    cfg = SamplingConfig(temperature=temperature, top_p=top_p)
    device = next(model.parameters()).device
    L = max(len(p) for p in prompts)
    inp = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    att = torch.zeros(len(prompts), L, dtype=torch.long)
    for r, p in enumerate(prompts):
        inp[r, L - len(p):] = torch.tensor(list(p))
        att[r, L - len(p):] = 1
    inp, att = inp.to(device), att.to(device)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    outs: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # the prompt index of each live batch row
    logits = model(input_ids=inp, attention_mask=att, position_ids=pos, logits_to_keep=1,
                   **cache_kwargs(model, cache)).logits[:, -1]
    while True:
        nxt = logits.argmax(-1) if cfg.greedy else sample(probs(logits, cfg), gen)
        keep = []
        for b, (r, t) in enumerate(zip(rows, nxt.tolist())):
            outs[r].append(t)
            if t not in eos_ids and len(outs[r]) < budgets[r]:
                keep.append(b)
        if not keep:
            return outs
        if len(keep) < len(rows):
            idx = torch.tensor(keep, device=device)
            cache.reorder_cache(idx)
            att, pos, nxt = att[idx], pos[idx], nxt[idx]
            rows = [rows[b] for b in keep]
        att = torch.cat([att, att.new_ones(len(rows), 1)], dim=1)
        pos = pos[:, -1:] + 1
        logits = model(input_ids=nxt[:, None], attention_mask=att, position_ids=pos, logits_to_keep=1,
                       **cache_kwargs(model, cache)).logits[:, -1]


# ---------------------------------------------------------------- reading


def load_corpus(path: Path, *, target_sha256: str | None = None) -> Corpus:
    """A complete corpus, checked: its manifest, the content sha256 it records, and (given) the target."""
    path = Path(path)
    man_path = path / MANIFEST
    if not man_path.is_file():
        raise CorpusError(f"{path} is not a corpus directory (no {MANIFEST}); make one with `specbench distill`")
    try:
        manifest = json.loads(man_path.read_text())
    except ValueError as e:
        raise CorpusError(f"{man_path} is not valid JSON ({e})") from None
    if manifest.get("kind") != "specbench.corpus" or manifest.get("spec", {}).get("format") != _FORMAT:
        raise CorpusError(f"{man_path} is not a specbench corpus manifest of format {_FORMAT}")
    spec = manifest["spec"]
    if not manifest.get("complete"):
        cmd = manifest["runs"][-1]["command"] if manifest.get("runs") else "specbench distill"
        raise CorpusError(f"corpus {path} is incomplete ({manifest.get('conversations_done', 0)}/"
                          f"{spec['conversations']} conversations); finish it with: {cmd}")
    if target_sha256 is not None and spec["target_sha256"] != target_sha256:
        raise CorpusError(f"corpus {path} holds the answers of target {spec['target']} (weights sha256 "
                          f"{spec['target_sha256'][:16]}...), not of this target ({target_sha256[:16]}...)")
    recs, clean = _read_lines(path / CORPUS_FILE)
    sha = _content_sha256(recs) if clean else None
    if sha != manifest["content_sha256"]:
        raise CorpusError(f"{path / CORPUS_FILE} does not match its manifest (content sha256 {sha} != "
                          f"{manifest['content_sha256']}); it was changed or damaged: restore it from git")
    first = spec["selection"]["start"]  # a record's index counts from its corpus's --start
    out = [CorpusRecord(first + r["index"], r["id"], r["input_ids"], _mask(r["loss_spans"], len(r["input_ids"])))
           for r in sorted(recs, key=lambda r: r["index"]) if r["loss_spans"]]
    return Corpus((path,), manifest, out)


def load_corpora(paths: Path | Sequence[Path], *, target_sha256: str | None = None) -> Corpus:
    """One corpus from one directory, or from several (shards): corpora made with the same spec over
    disjoint ranges of the same source (``specbench distill --start S --max-conversations N``), so a large
    corpus can be generated and committed a range at a time. Each shard is read strictly (`load_corpus`);
    the union's records are in source order and its content sha256 is that of its shards' (in order), so it
    names the training data as one directory's does. One path: that corpus, unchanged."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise CorpusError("no corpus directory given")
    parts = sorted((load_corpus(p, target_sha256=target_sha256) for p in paths),
                   key=lambda c: c.manifest["spec"]["selection"]["start"])
    if len(parts) == 1:
        return parts[0]

    def shard_free(spec: dict) -> dict:  # a spec without what tells its shards apart
        return {**spec, "conversations": None,
                "selection": {**spec["selection"], "start": None, "max_conversations": None}}

    base = shard_free(parts[0].manifest["spec"])
    ranges = []
    for c in parts:
        spec = c.manifest["spec"]
        ranges.append((spec["selection"]["start"], spec["selection"]["start"] + spec["conversations"], c.paths[0]))
        differs = _differs(shard_free(spec), base)
        if differs:
            raise CorpusError(f"{c.paths[0]} and {parts[0].paths[0]} are not shards of one corpus (they differ in: "
                              f"{differs}); shards differ only in --start and --max-conversations")
    for (a0, a1, pa), (b0, b1, pb) in zip(ranges, ranges[1:]):
        if b0 < a1:
            raise CorpusError(f"{pa} (conversations {a0}-{a1 - 1}) and {pb} ({b0}-{b1 - 1}) overlap; shards must "
                              "cover disjoint ranges of the source")
    shas = [c.content_sha256 for c in parts]
    spec = {**parts[0].manifest["spec"], "conversations": sum(c.manifest["spec"]["conversations"] for c in parts),
            "selection": {**parts[0].manifest["spec"]["selection"], "shards": [[a, b] for a, b, _ in ranges]}}
    manifest = {"kind": "specbench.corpus", "spec": spec, "complete": True,
                "tokens": sum(c.manifest["tokens"] for c in parts),
                "content_sha256": sha256_bytes(",".join(shas).encode()), "shards_content_sha256": shas}
    return Corpus(tuple(p for c in parts for p in c.paths), manifest, [r for c in parts for r in c.records])


# ---------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specbench distill",
        description="Generate a distillation corpus: the target's answers to the training conversations' user "
                    "turns, as token ids (resumable; commit DIR and train on it with `specbench train --method M "
                    "--corpus DIR`).")
    p.add_argument("--out", type=Path, required=True, help="corpus directory (created, or finished if it exists)")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--data", default="sharegpt", help="source of the instructions (never the evaluation prompts)")
    p.add_argument("--start", type=int, default=0, help="first usable conversation of the source")
    p.add_argument("--max-conversations", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=512, help="a conversation stops once its context is this long")
    p.add_argument("--settings", default="0:1",
                   help="temperature:top_p pairs, assigned round-robin by conversation (default 0:1, greedy)")
    p.add_argument("--max-new", type=int, default=256, help="new tokens per answer at most")
    p.add_argument("--batch-size", type=int, default=8, help="conversations generated together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log", type=Path, help="also append the log to this file")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..artifacts import check_writable
    from ..logs import configure, log_file
    from ..models.loading import load_model

    p = parser()
    a = p.parse_args(argv)
    try:
        settings = parse_settings(a.settings)
    except ValueError as e:
        p.error(str(e))
    for name in ("max_conversations", "max_tokens", "max_new", "batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.start < 0 or (a.threads is not None and a.threads < 1):
        p.error("--start must be >= 0 and --threads >= 1")
    if a.log:
        check_writable(a.log, "--log")
    if a.threads:
        torch.set_num_threads(a.threads)
    cmd = "specbench distill " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    configure(timestamps=True)
    with log_file(a.log):
        target = load_model(a.target)
        target.model.eval()
        build_corpus(target, a.out, data=a.data, start=a.start, max_conversations=a.max_conversations,
                     max_tokens=a.max_tokens, settings=settings, max_new_tokens=a.max_new, batch_size=a.batch_size,
                     seed=a.seed, progress=not a.no_progress, command=cmd)
    return 0
