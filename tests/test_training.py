"""Training pipeline: ShareGPT reading, chat formatting + loss mask, feature cache, trainer, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from specbench.training.features import FeatureCache, prepare_features, target_hidden_states, target_logit_stats
from specbench.training.sharegpt import (
    DataError,
    ReadStats,
    format_conversation,
    is_contaminated,
    iter_json_array,
    load_conversations,
    normalize_record,
    resolve_source,
)
from specbench.training.tasks import shift_batch
from specbench.training.trainer import TrainConfig, batch_order, train_loop

# ---------------------------------------------------------------- fixtures


def _fake_tokenizer():
    """A character-level fast tokenizer (47 ids) with a ChatML template: no files, no network."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789 \n.,?!:'":
        vocab[c] = len(vocab)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                  unk_token="<unk>", eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "{{ '<|im_start|>system\nbe nice<|im_end|>\n' }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return tok


WORDS = "the cat sat on a mat and then it ran far away to see the big old tree near my house".split()


def tiny_train_inputs(tmp_path, monkeypatch):
    """A tiny target with a tokenizer saved to tmp_path/t and 30 ShareGPT-style conversations in tmp_path/sg.json,
    the feature cache under tmp_path: what a `specbench train` test runs on. Returns (loaded tiny, t, sg.json)."""
    from dataclasses import replace

    from specbench.models import tiny_llama

    monkeypatch.setenv("SPECBENCH_CACHE", str(tmp_path / "cache"))
    tiny = replace(tiny_llama(max_position_embeddings=256), tokenizer=_fake_tokenizer(), name="tiny")
    tiny.model.save_pretrained(tmp_path / "t")
    tiny.tokenizer.save_pretrained(tmp_path / "t")
    (tmp_path / "sg.json").write_text(json.dumps(_conversations(30)))
    return tiny, tmp_path / "t", tmp_path / "sg.json"


def _conversations(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    recs = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 2)):
            turns.append({"from": "human", "value": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))) + "?"})
            turns.append({"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(3, 10))) + "."})
        recs.append({"id": f"c{i}", "conversations": turns})
    return recs


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Llama (vocab 64, 256 positions) with the character tokenizer."""
    from dataclasses import replace

    from specbench.models import tiny_llama

    return replace(tiny_llama(max_position_embeddings=256), tokenizer=_fake_tokenizer(), name="tiny")


@pytest.fixture()
def sharegpt_file(tmp_path):
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(_conversations(40), indent=1))
    return p


# ---------------------------------------------------------------- reading


def test_truncated_array_stops_at_cut_every_position():
    recs = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i} [x] {{y}} \"z\""}],
             "n": 1.5e-3 * i} for i in range(4)]
    text = json.dumps(recs, indent=1)
    ends = []  # end offset of each record in the text
    dec = json.JSONDecoder()
    pos = text.index("{")
    for _ in recs:
        _, pos = dec.raw_decode(text, pos)
        ends.append(pos)
        nxt = text.find("{", pos)
        pos = nxt if nxt >= 0 else pos
    for cut in range(0, len(text) + 1, 3):
        st = ReadStats()
        got = list(iter_json_array(io.StringIO(text[:cut]), st, chunk_chars=7))
        assert len(got) == sum(e <= cut for e in ends)  # a record is yielded once its closing brace is read
        assert got == recs[:len(got)]
        assert st.records == len(got)
        assert st.truncated == (cut < len(text))
    st = ReadStats()
    assert list(iter_json_array(io.StringIO(text), st, chunk_chars=5)) == recs and not st.truncated


def test_truncated_file_source(tmp_path):
    recs = _conversations(5)
    text = json.dumps(recs)
    p = tmp_path / "cut.json"
    p.write_text(text[: text.index('"c4"') + 10])  # cut inside the 5th record
    st = ReadStats()
    convs = load_conversations(resolve_source(str(p)), stats=st, decontaminate=False)
    assert st.records == 4 and st.truncated and len(convs) == 4
    assert [c[0] for c in convs] == ["c0", "c1", "c2", "c3"]


def test_normalize_and_decontaminate():
    rec = {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "yo"}, {"from": "human", "value": "dangling"}]}
    assert normalize_record(rec) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert normalize_record({"conversations": [{"from": "human", "value": "x"}]}) is None
    fp = {"compose an engaging travel blog post about a recent trip to hawaii"}
    conv = [{"role": "user", "content": "Compose an engaging   travel blog post about a recent trip to Hawaii"},
            {"role": "assistant", "content": "ok"}]
    assert is_contaminated(conv, fp)
    assert not is_contaminated([{"role": "user", "content": "something else entirely, long enough"}], fp)


# ---------------------------------------------------------------- formatting


def test_loss_mask_covers_exactly_assistant_replies():
    tok = _fake_tokenizer()
    conv = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you."},
            {"role": "user", "content": "why?"}, {"role": "assistant", "content": "because."}]
    f = format_conversation(tok, conv)
    assert f.input_ids == tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    spans, cur = [], []
    for i, m in zip(f.input_ids, f.loss_mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    texts = [tok.decode(s).replace(" ", "") for s in spans]  # the char tokenizer's decode adds spaces
    assert texts == ["helloyou.<|im_end|>\n", "because.<|im_end|>\n"]
    g = format_conversation(tok, conv, max_tokens=20)
    assert len(g.input_ids) == 20 and g.truncated and g.loss_mask == f.loss_mask[:20]


# ---------------------------------------------------------------- features


def test_feature_cache_round_trip_reuse_and_resume(tiny, sharegpt_file, tmp_path, monkeypatch):
    d, info = prepare_features(tiny, data=str(sharegpt_file), max_conversations=12, max_tokens=96,
                               cache=tmp_path / "cache", shard_size=5, progress=False)
    assert info["conversations_used"] == 12 and info["records_read"] == 40
    cache = FeatureCache(d)
    assert len(cache) == 12 and len(list(d.glob("shard-*"))) == 3
    row = cache[7]
    ids = row["input_ids"][None]
    ref = target_hidden_states(tiny.model, ids)[0]
    assert row["hidden"].shape == ref.shape
    torch.testing.assert_close(row["hidden"], ref.half().float())
    assert row["loss_mask"].sum() > 0 and row["loss_mask"][0] == 0
    # the target's full-vocabulary logit statistics over the stored (float16) states, however they are chunked
    logits = tiny.model.get_output_embeddings()(row["hidden"])
    torch.testing.assert_close(row["target_lse"], torch.logsumexp(logits, -1))
    assert torch.equal(row["target_argmax"], logits.argmax(-1))
    lse2, top2 = target_logit_stats(tiny.model.get_output_embeddings(), row["hidden"], rows=2)
    torch.testing.assert_close(lse2, row["target_lse"])
    assert torch.equal(top2, row["target_argmax"])

    # reuse: same key -> same directory, nothing recomputed
    def boom(*a, **k):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr("specbench.training.features.target_hidden_states", boom)
    d2, _ = prepare_features(tiny, data=str(sharegpt_file), max_conversations=12, max_tokens=96,
                             cache=tmp_path / "cache", shard_size=5, progress=False)
    assert d2 == d
    # resume: an unfinished extraction redoes only the missing shard
    import shutil

    shutil.rmtree(d / "shard-00001")
    meta = json.loads((d / "meta.json").read_text())
    meta["complete"] = False
    (d / "meta.json").write_text(json.dumps(meta))
    calls = []
    monkeypatch.setattr("specbench.training.features.target_hidden_states",
                        lambda m, i, a=None: calls.append(i.shape) or target_hidden_states(m, i, a))
    prepare_features(tiny, data=str(sharegpt_file), max_conversations=12, max_tokens=96,
                     cache=tmp_path / "cache", shard_size=5, progress=False)
    assert sum(s[0] for s in calls) == 5
    torch.testing.assert_close(FeatureCache(d)[7]["hidden"], row["hidden"])
    # a cache of another format is refused with what to do, not read into a KeyError
    good = (d / "meta.json").read_text()
    (d / "meta.json").write_text(json.dumps({**json.loads(good), "format": 1}))
    with pytest.raises(RuntimeError, match="format 1.*extract the features again"):
        FeatureCache(d)
    (d / "meta.json").write_text(good)
    # another max_tokens -> another key, another directory
    d3, _ = prepare_features(tiny, data=str(sharegpt_file), max_conversations=4, max_tokens=64,
                             cache=tmp_path / "cache", shard_size=5, progress=False)
    assert d3 != d


def test_shift_batch():
    rows = [{"input_ids": torch.arange(5), "loss_mask": torch.tensor([0., 0, 1, 1, 1]),
             "hidden": torch.arange(5.)[:, None].repeat(1, 3)},
            {"input_ids": torch.arange(3), "loss_mask": torch.tensor([0., 1, 1]),
             "hidden": torch.arange(3.)[:, None].repeat(1, 3)}]
    b = shift_batch(rows)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 0, 0]]
    assert b["features"][0, :, 0].tolist() == [0, 1, 2, 3] and b["target"][0, :, 0].tolist() == [1, 2, 3, 4]
    assert b["loss_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch_order([3, 5, 4, 2, 9], 2, 0, 1) == batch_order([3, 5, 4, 2, 9], 2, 0, 1)


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_cache(tiny, tmp_path_factory):
    p = tmp_path_factory.mktemp("sg") / "sg.json"
    p.write_text(json.dumps(_conversations(40)))
    d, _ = prepare_features(tiny, data=str(p), max_conversations=16, max_tokens=64,
                            cache=tmp_path_factory.mktemp("cache"), progress=False)
    return FeatureCache(d)


def _head_and_task(tiny, **options):
    from specbench.training.eagle import EagleOptions, EagleTask

    task = EagleTask(EagleOptions(embed_init_scale=1.0, **options))
    return task.make_head(tiny.model, seed=0), task


def test_a_few_steps_reduce_the_loss(tiny, tiny_cache, tmp_path):
    head, task = _head_and_task(tiny, noise="none")
    cfg = TrainConfig(epochs=8, lr=3e-3, batch_size=4, warmup_steps=2, save_every=1000)
    res = train_loop(head, tiny_cache, task, cfg, tmp_path / "w", progress=False)
    assert res.finished and res.step == 32
    rows = [json.loads(x) for x in (tmp_path / "w" / "loss_log.jsonl").read_text().splitlines()]
    assert len(rows) == 32
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.85 * first, (first, last)
    assert rows[-1]["vloss"] < rows[0]["vloss"] and rows[-1]["ploss"] < rows[0]["ploss"]
    assert res.epoch_losses[0]["loss"]["first"] == rows[0]["loss"]


def test_resume_after_interruption_is_identical(tiny, tiny_cache, tmp_path):
    cfg = dict(epochs=2, lr=1e-3, batch_size=3, warmup_steps=1, save_every=2)
    # uninterrupted
    head_a, task_a = _head_and_task(tiny, ce_fraction=0.5, noise="uniform")
    train_loop(head_a, tiny_cache, task_a, TrainConfig(**cfg), tmp_path / "a", progress=False)
    # interrupted after step 5 (last checkpoint at step 4 + the stop save at 5), then resumed by a fresh process
    head_b, task_b = _head_and_task(tiny, ce_fraction=0.5, noise="uniform")
    r1 = train_loop(head_b, tiny_cache, task_b, TrainConfig(**cfg, max_steps=5), tmp_path / "b", progress=False)
    assert r1.step == 5 and not r1.finished
    st = torch.load(tmp_path / "b" / "state.pt", weights_only=False)
    assert st["step"] == 5
    assert st["optimizer"]["param_groups"][0]["fused"] is True  # TrainConfig.fused_adamw, on the CPU's kernel
    head_c, task_c = _head_and_task(tiny, ce_fraction=0.5, noise="uniform")
    r2 = train_loop(head_c, tiny_cache, task_c, TrainConfig(**cfg), tmp_path / "b", progress=False)
    assert r2.resumed_from == 5 and r2.finished and r2.step == 12
    for k, v in head_a.trainable_state_dict().items():
        torch.testing.assert_close(head_c.trainable_state_dict()[k], v, rtol=0, atol=0)
    la = (tmp_path / "a" / "loss_log.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "loss_log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "t"} for x in lines]  # noqa: E731
    assert strip(la) == strip(lb)


def test_train_end_to_end_writes_a_loadable_checkpoint(tiny, sharegpt_file, tmp_path, monkeypatch):
    from specbench.models.draft_heads import checkpoint_sha256, load_head
    from specbench.training.eagle import EagleTask
    from specbench.training.pipeline import train

    monkeypatch.setenv("SPECBENCH_CACHE", str(tmp_path / "cache"))
    tdir = tmp_path / "target"
    tiny.model.save_pretrained(tdir)
    tiny.tokenizer.save_pretrained(tdir)
    out = train(EagleTask(), str(tdir), tmp_path / "ckpt", data=str(sharegpt_file), max_conversations=8, max_tokens=64,
                epochs=2, lr=2e-3, batch_size=4, seed=0, heldout=3, progress=False, device="cpu",
                command="test")
    man = json.loads((out / "MANIFEST.json").read_text())
    assert man["weights_sha256"] == checkpoint_sha256(out)
    assert man["data"]["conversations_used"] == 8 and man["training"]["steps"] == 4
    assert man["target"]["weights_sha256"] and 0 <= man["heldout"]["top1"] <= 1 and man["heldout"]["tokens"] > 0
    assert [e["epoch"] for e in man["losses_per_epoch"]] == [0, 1]
    assert man["training"]["fused_adamw"] is True  # the CPU has the fused kernel, and the manifest says it ran
    head = load_head(out, tiny.model, "eagle").head
    assert sorted(head.trainable_state_dict()) == sorted(json.loads(json.dumps(list(head.expected_keys()))))
    # the draft vocabulary: assistant-token ids of the training data, most frequent first
    from collections import Counter

    from specbench.training.features import load_feature_cache

    cache = load_feature_cache(Path(man["data"]["feature_cache"]))
    counts = Counter(int(t) for i in range(len(cache)) for t, m in zip(cache[i]["input_ids"], cache[i]["loss_mask"])
                     if m > 0)
    ranked = json.loads((out / "draft_vocab.json").read_text())
    assert sorted(ranked) == sorted(counts) and len(ranked) == man["draft_vocab"]["distinct_ids"]
    assert [counts[t] for t in ranked] == sorted(counts.values(), reverse=True)
    assert man["draft_vocab"]["tokens_counted"] == sum(counts.values())


def _corpus(tiny, data, out, **kw):
    from specbench.training.corpus import build_corpus

    args = {"max_conversations": 5, "max_tokens": 120, "batch_size": 2, "max_new_tokens": 6, "progress": False,
            "command": "test"} | kw
    return build_corpus(tiny, out, data=str(data), **args)


def test_distill_corpus_regenerates_answers_as_token_ids_and_resumes(tiny, sharegpt_file, tmp_path, monkeypatch):
    """`specbench distill`'s corpus: every assistant turn is the target's, the stored ids and mask are the
    formatted conversation's, a second run generates nothing, and a batch cut by a kill is generated again
    so that the corpus equals an uninterrupted one."""
    import gzip

    from specbench.training.corpus import CORPUS_FILE, load_corpus
    from specbench.training.sharegpt import load_conversations

    man = _corpus(tiny, sharegpt_file, tmp_path / "c")
    assert man["complete"] and man["conversations_done"] == 5 and man["spec"]["conversations"] == 5
    cp = load_corpus(tmp_path / "c", target_sha256=tiny.weights_sha256)
    src = dict(load_conversations(str(sharegpt_file), limit=5))
    assert len(cp.records) >= 4 and all(r.id in src for r in cp.records)
    assert [r.index for r in cp.records] == sorted(r.index for r in cp.records)
    text = lambda ids: "".join(tiny.tokenizer.convert_ids_to_tokens(ids))  # noqa: E731 (character tokens)
    for r in cp.records:
        conv = src[r.id]
        assert [m["content"] for m in conv if m["role"] == "user"][0] in text(r.input_ids)
        answers = text([t for t, m in zip(r.input_ids, r.loss_mask) if m])
        assert not any(m["content"] in answers for m in conv if m["role"] == "assistant")  # the target's replies
        assert sum(r.loss_mask) > 0 and r.loss_mask[0] == 0 and len(r.loss_mask) == len(r.input_ids)
    assert man["tokens"] == sum(len(r.input_ids) for r in cp.records)

    def boom(*a, **k):
        raise AssertionError("a finished batch was generated again")

    monkeypatch.setattr("specbench.training.corpus._answer_batch", boom)
    before = (tmp_path / "c" / "MANIFEST.json").read_bytes()
    assert _corpus(tiny, sharegpt_file, tmp_path / "c")["content_sha256"] == man["content_sha256"]
    assert (tmp_path / "c" / "MANIFEST.json").read_bytes() == before  # a complete corpus is left as it is
    monkeypatch.undo()
    # a kill in the middle of the last batch's write: a cut gzip member at the end of the file
    f = tmp_path / "c" / CORPUS_FILE
    member = gzip.compress(b'{"index":4,"id":"c4","input_ids":[1,2')
    f.write_bytes(f.read_bytes() + member[:len(member) // 2])
    again = _corpus(tiny, sharegpt_file, tmp_path / "c")
    assert again["content_sha256"] == man["content_sha256"] and len(again["runs"]) == 2  # the file cleaned
    assert again["file_bytes"] == f.stat().st_size
    assert [x.input_ids for x in load_corpus(tmp_path / "c").records] == [x.input_ids for x in cp.records]
    # and a cut inside a finished batch's records (the last one dropped): that batch is generated again
    with gzip.open(f, "rt") as fh:
        lines = fh.read().splitlines()
    f.write_bytes(gzip.compress(("\n".join(lines[:-1]) + "\n").encode()))
    assert _corpus(tiny, sharegpt_file, tmp_path / "c")["content_sha256"] == man["content_sha256"]


def test_distill_generation_batched_with_rows_dropped_equals_each_row_alone(tiny):
    """`generate_rows`: left padding, positions and dropping finished rows' KV change no row's tokens. Greedy
    rows of different lengths and budgets, one of them ended early by an end-of-sequence id, equal each
    prompt decoded alone and transformers' greedy generate(); top_p near 0 keeps only the argmax."""
    from specbench.training.corpus import generate_rows

    model = tiny.model.eval()
    prompts = [[3, 9, 4, 17, 2, 30, 11], [5, 6], [40, 2, 2, 8, 13], [21, 22, 23, 24]]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    free = generate_rows(model, prompts, [12] * 4, 0.0, 1.0, gen(), set(), 0)
    assert all(len(o) == 12 for o in free)
    for p, o in zip(prompts, free):
        ref = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert o == ref[0, len(p):].tolist()
    eos = {free[0][2]}  # row 0 ends at its third token, the others (unless they meet it) run on
    budgets = [12, 7, 12, 9]
    batched = generate_rows(model, prompts, budgets, 0.0, 1.0, gen(), eos, 0)
    alone = [generate_rows(model, [p], [b], 0.0, 1.0, gen(), eos, 0)[0] for p, b in zip(prompts, budgets)]
    assert batched == alone and len(batched[0]) == 3 and batched[0][-1] in eos
    assert [len(o) for o in batched[1:]] != [3, 3, 3]  # the other rows outlived the dropped one
    assert generate_rows(model, prompts, budgets, 1.0, 1e-9, gen(), eos, 0) == batched
    sampled = generate_rows(model, prompts, [12] * 4, 1.0, 1.0, gen(), set(), 0)
    assert sampled == generate_rows(model, prompts, [12] * 4, 1.0, 1.0, gen(), set(), 0) and sampled != free


def test_distill_corpus_settings_round_robin_and_refusals(tiny, sharegpt_file, tmp_path):
    import gzip
    import json as js

    from specbench.training.corpus import CORPUS_FILE, CorpusError, load_corpus, parse_settings

    settings = parse_settings("0:1, 1.0:0.9")
    assert settings == [(0.0, 1.0), (1.0, 0.9)]
    man = _corpus(tiny, sharegpt_file, tmp_path / "c", settings=settings, seed=3)
    with gzip.open(tmp_path / "c" / CORPUS_FILE, "rt") as fh:
        recs = {r["index"]: r for r in map(js.loads, fh)}
    assert {i: (r["temperature"], r["top_p"]) for i, r in recs.items()} == {i: settings[i % 2] for i in range(5)}
    _corpus(tiny, sharegpt_file, tmp_path / "g", max_conversations=1)
    with gzip.open(tmp_path / "g" / CORPUS_FILE, "rt") as fh:
        assert js.loads(fh.readline())["input_ids"] == recs[0]["input_ids"]  # setting 0 is greedy
    for bad, why in (("0.7", None), ("x:1", "not temperature:top_p"), ("1:0", "0 < top_p <= 1"), ("", "no distil")):
        if why is None:
            assert parse_settings(bad) == [(0.7, 1.0)]
            continue
        with pytest.raises(ValueError, match=why):
            parse_settings(bad)
    # one directory, one spec: finishing it with other settings is refused, naming what differs
    with pytest.raises(CorpusError, match=r"differs in: \['generation'\]"):
        _corpus(tiny, sharegpt_file, tmp_path / "c", settings=settings, seed=4)
    # strict reading: another target, an altered file, an unfinished corpus, not a corpus
    with pytest.raises(CorpusError, match="not of this target"):
        load_corpus(tmp_path / "c", target_sha256="0" * 64)
    lines = gzip.decompress((tmp_path / "c" / CORPUS_FILE).read_bytes()).decode().splitlines()
    lines[0] = lines[0].replace('"input_ids":[', '"input_ids":[3,', 1)
    (tmp_path / "c" / CORPUS_FILE).write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(CorpusError, match="does not match its manifest"):
        load_corpus(tmp_path / "c")
    m = js.loads((tmp_path / "g" / "MANIFEST.json").read_text())
    (tmp_path / "g" / "MANIFEST.json").write_text(js.dumps(m | {"complete": False}))
    with pytest.raises(CorpusError, match="incomplete .*finish it with: test"):
        load_corpus(tmp_path / "g")
    with pytest.raises(CorpusError, match="not a corpus directory"):
        load_corpus(tmp_path)
    assert man["file_bytes"] > 0


def test_features_from_a_corpus_are_its_token_ids(tiny, sharegpt_file, tmp_path):
    """`train --corpus DIR` trains on exactly the corpus's ids and mask (cut at max_tokens), keyed by its
    content; a ShareGPT selection keeps the cache key it had before corpora existed."""
    from specbench.training.corpus import load_corpus

    _corpus(tiny, sharegpt_file, tmp_path / "c")
    cp = load_corpus(tmp_path / "c")
    d, info = prepare_features(tiny, max_conversations=None, max_tokens=90, corpus=tmp_path / "c",
                               cache=tmp_path / "cache", progress=False)
    cache = FeatureCache(d)
    kept = [r for r in cp.records if sum(r.loss_mask[:90])]
    assert len(kept) >= 3 and info["conversations_truncated_to_max_tokens"] >= 1
    assert [cache[i]["input_ids"].tolist() for i in range(len(cache))] == [r.input_ids[:90] for r in kept]
    assert [cache[i]["loss_mask"].tolist() for i in range(len(cache))] == [r.loss_mask[:90] for r in kept]
    assert info["corpus"]["content_sha256"] == cp.content_sha256 and info["self_distill"] is True
    d2, _ = prepare_features(tiny, max_conversations=2, max_tokens=90, corpus=tmp_path / "c",
                             cache=tmp_path / "cache", progress=False)
    assert d2 != d and len(FeatureCache(d2)) == len([r for r in cp.records[:2] if sum(r.loss_mask[:90])])
    with pytest.raises(DataError, match="no training sequence"):
        prepare_features(tiny, max_conversations=None, max_tokens=20, corpus=tmp_path / "c",
                         cache=tmp_path / "cache", progress=False)
    # the selection entering a ShareGPT cache's key is the one the committed heads' manifests were made with
    d3, _ = prepare_features(tiny, data=str(sharegpt_file), max_conversations=4, max_tokens=90,
                             cache=tmp_path / "cache", progress=False)
    assert json.loads((d3 / "meta.json").read_text())["selection"] == {
        "start": 0, "max_conversations": 4, "decontaminated": True, "heldout_tail": 4, "self_distill": False}


def test_corpus_shards_train_as_the_corpus_of_their_union(tiny, sharegpt_file, tmp_path):
    """Shards over disjoint --start ranges read as one corpus: greedy answers do not depend on the batching,
    so two shards give the records (ids, masks, source indices) and the features of one corpus over both
    ranges, in source order whatever order they are named in; the union's content sha256 is its own; shards
    that overlap or were made with other settings are refused, naming both."""
    from specbench.training.corpus import CorpusError, load_corpora, load_corpus

    _corpus(tiny, sharegpt_file, tmp_path / "all")
    _corpus(tiny, sharegpt_file, tmp_path / "a", max_conversations=3)
    _corpus(tiny, sharegpt_file, tmp_path / "b", start=3, max_conversations=2)
    whole = load_corpus(tmp_path / "all")
    union = load_corpora([tmp_path / "b", tmp_path / "a"])
    assert union.paths == (tmp_path / "a", tmp_path / "b")
    assert [(r.index, r.id, r.input_ids, r.loss_mask) for r in union.records] == [
        (r.index, r.id, r.input_ids, r.loss_mask) for r in whole.records]
    assert [r.index for r in load_corpus(tmp_path / "b").records][0] >= 3  # indices count from the source
    shards = {load_corpus(tmp_path / p).content_sha256 for p in ("a", "b")}
    assert union.content_sha256 not in shards | {whole.content_sha256}
    assert union.manifest["spec"]["selection"]["shards"] == [[0, 3], [3, 5]]
    assert load_corpora([tmp_path / "a"]).manifest == load_corpus(tmp_path / "a").manifest  # one: unchanged
    d, info = prepare_features(tiny, max_conversations=None, max_tokens=90, corpus=[tmp_path / "a", tmp_path / "b"],
                               cache=tmp_path / "cache", progress=False)
    dw, _ = prepare_features(tiny, max_conversations=None, max_tokens=90, corpus=tmp_path / "all",
                             cache=tmp_path / "cache", progress=False)
    got, want = FeatureCache(d), FeatureCache(dw)
    assert d != dw and len(got) == len(want) >= 3
    assert all(got[i]["input_ids"].tolist() == want[i]["input_ids"].tolist() for i in range(len(want)))
    assert info["corpus"]["content_sha256"] == union.content_sha256 and str(tmp_path / "b") in info["corpus"]["path"]
    _corpus(tiny, sharegpt_file, tmp_path / "over", start=2, max_conversations=2)
    with pytest.raises(CorpusError, match=r"a \(conversations 0-2\) and .*over \(2-3\) overlap"):
        load_corpora([tmp_path / "a", tmp_path / "over"])
    _corpus(tiny, sharegpt_file, tmp_path / "other", start=3, max_conversations=2, max_tokens=100)
    with pytest.raises(CorpusError, match=r"not shards of one corpus .*\['max_tokens'\]"):
        load_corpora([tmp_path / "a", tmp_path / "other"])
    with pytest.raises(CorpusError, match="no corpus directory"):
        load_corpora([])


def test_train_options_are_checked_before_any_work(tmp_path):
    from specbench.errors import UsageError
    from specbench.training.eagle import main

    (tmp_path / "afile").write_text("")
    with pytest.raises(UsageError, match="--log .*cannot write in"):
        main(["--out", str(tmp_path / "o"), "--log", str(tmp_path / "afile" / "x.log")])
    for bad in (["--embed-init-scale", "abc"], ["--threads", "-1"], ["--corpus", str(tmp_path)],
                ["--max-conversations", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(tmp_path / "o"), *bad])
        assert e.value.code == 2
    assert not (tmp_path / "o").exists()


def test_the_task_options_are_the_train_command_options(tmp_path):
    """`specbench train --method eagle` takes each field of EagleOptions as an option, typed and checked."""
    from specbench.training.eagle import EagleOptions, EagleTask
    from specbench.training.pipeline import parser
    from specbench.training.tasks import options_from_args

    p = parser(EagleTask)
    a = p.parse_args(["--out", str(tmp_path), "--v-w", "0.5", "--noise", "none", "--embed-init-scale", "2"])
    assert options_from_args(EagleOptions, a) == EagleOptions(v_w=0.5, noise="none", embed_init_scale=2.0)
    assert options_from_args(EagleOptions, p.parse_args(["--out", str(tmp_path)])) == EagleOptions()
    for bad in (["--noise", "pink"], ["--p-w", "x"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(["--out", str(tmp_path), *bad])
        assert e.value.code == 2
    assert "weight of the soft-label cross-entropy term (default 0.1)" in " ".join(p.format_help().split())


def test_distill_then_train_on_the_corpus_from_the_command_line(tmp_path, monkeypatch, capsys):
    """`specbench distill` writes a corpus whose manifest records its command; `specbench train --corpus` trains
    on all of it and names it in the head's manifest; a bad corpus is refused before the target loads."""
    from specbench.cli import main

    tiny, tdir, sg = tiny_train_inputs(tmp_path, monkeypatch)
    args = ["--out", str(tmp_path / "corpus"), "--target", str(tdir), "--data", str(sg), "--max-conversations", "6",
            "--max-tokens", "100", "--max-new", "5", "--batch-size", "3", "--no-progress"]
    assert main(["distill", *args]) == 0
    man = json.loads((tmp_path / "corpus" / "MANIFEST.json").read_text())
    assert man["complete"] and man["runs"][0]["command"] == "specbench distill " + " ".join(args)
    with pytest.raises(SystemExit):
        main(["distill", *args[:-1], "--settings", "1:0"])
    assert "0 < top_p <= 1" in capsys.readouterr().err
    assert main(["train", "--method", "eagle", "--out", str(tmp_path / "h"), "--target", str(tdir), "--corpus",
                 str(tmp_path / "corpus"), "--max-tokens", "100", "--epochs", "1", "--heldout", "2",
                 "--data", str(sg), "--no-progress"]) == 0
    hm = json.loads((tmp_path / "h" / "MANIFEST.json").read_text())
    assert hm["data"]["corpus"]["content_sha256"] == man["content_sha256"]
    assert hm["data"]["conversations_used"] == man["conversations_answered"] and hm["data"]["self_distill"]
    with pytest.raises(SystemExit):
        main(["train", "--method", "eagle", "--out", str(tmp_path / "h2"), "--corpus", str(tmp_path)])
    assert "not a corpus directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # shards are checked before the target is loaded, too
        main(["train", "--method", "eagle", "--out", str(tmp_path / "h2"), "--corpus", str(tmp_path / "corpus"),
              str(tmp_path / "corpus")])
    assert "overlap" in capsys.readouterr().err


def test_the_fused_adamw_update_is_adamws():
    """The trainer's fused AdamW (TrainConfig.fused_adamw) takes the per-op loop's steps, up to float rounding."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(37, 11, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) * 10 ** -k for p in init] for k in range(6)]
    runs = []
    for fused in (None, True):
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        opt = torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
        for gs in grads:
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
        runs.append([p.detach() for p in ps])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(runs[1][0], init[0])  # it moved
