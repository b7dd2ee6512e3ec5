"""sps: the draft model's q is exactly its distribution given the sequence at every step (its KV cache
rolled back right), greedy drafts are its argmax chain, and drafts of another vocabulary are refused.
Losslessness end to end (greedy identity, the first tokens' and drafted steps' distributions) is in
test_lossless_e2e, which runs every registered method."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import tiny_target

from specbench.decoding import SamplingConfig, generate, make_generator, probs
from specbench.errors import UsageError
from specbench.methods import get_method
from specbench.methods.sps import DraftModelDrafter, check_same_vocabulary
from specbench.models.draft_heads import CheckpointError
from specbench.models.draft_lm import layer_prefix_draft
from specbench.models.target import Target

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def draft(target):
    """The tiny target's first layer + its norm and LM head, on the shared runtime."""
    return Target(layer_prefix_draft(target.model, 1), name="tiny-draft")


@torch.inference_mode()
def test_a_layer_prefix_draft_is_the_targets_first_layers(target):
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(5))
    model = target.model
    d = layer_prefix_draft(model, 1)
    assert d.config.num_hidden_layers == 1 and len(model.model.layers) == 2  # the target keeps its layers
    h = model.model.embed_tokens(ids)
    pos = torch.arange(9)[None]
    h = model.model.layers[0](h, position_embeddings=model.model.rotary_emb(h, pos), position_ids=pos)
    h = h[0] if isinstance(h, tuple) else h
    want = model.lm_head(model.model.norm(h))
    torch.testing.assert_close(d(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keeps 1..2 of the target's layers, not 3"):
        layer_prefix_draft(model, 3)


@torch.inference_mode()
def _uncached_next(model, seq: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([seq])).logits[0, -1:].float()


class Checking(DraftModelDrafter):
    """Records every proposal with the sequence it continued."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[list[int], list[int], torch.Tensor | None]] = []

    def propose(self, tokens):
        ids = None if self.vocab.ids is None else self.vocab.ids.clone()
        prop = super().propose(tokens)
        self.seen.append((list(tokens), list(prop.tokens), prop.draft_probs, ids))
        return prop


def _check_q(target, draft, cfg: SamplingConfig, drafter_cls=Checking, n_gen: int = 6, new: int = 20,
             **kwargs) -> int:
    """Every proposal's q rows == probs(the draft's uncached logits at that prefix, -inf outside the draft
    vocabulary of that step); returns the steps checked."""
    g = make_generator(3)
    drafter = drafter_cls(draft, cfg, g, gamma=3, **kwargs)
    prompt_g = torch.Generator().manual_seed(8)
    checked = 0
    for _ in range(n_gen):
        prompt = torch.randint(0, 64, (7,), generator=prompt_g).tolist()
        generate(target, drafter, prompt, new, cfg, g, stop_ids=set())
        for tokens, drafts, q, ids in drafter.seen:
            if ids is not None:  # the sequence's tokens are in it; nothing else beyond the ranking's first ids
                assert set(tokens) <= set(ids.tolist()) and len(set(ids.tolist()) - set(tokens)) <= drafter.vocab.size
            for i in range(len(drafts)):
                logits = _uncached_next(draft.model, tokens + drafts[:i])
                if ids is not None:
                    logits = torch.full_like(logits, float("-inf")).index_copy_(1, ids, logits[:, ids])
                want = probs(logits, cfg)[0]
                torch.testing.assert_close(q[i], want, atol=1e-5, rtol=1e-4)
            checked += 1
        drafter.seen.clear()
    return checked


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=1.0),
                                 SamplingConfig(temperature=0.8, top_k=12, top_p=0.9)], ids=["T1", "topk-topp"])
def test_q_is_the_draft_distribution_at_every_step(target, draft, cfg):
    assert _check_q(target, draft, cfg) > 12


def test_a_reduced_vocabulary_zeroes_q_outside_it(target, draft, tmp_path):
    ranking = tmp_path / "draft_vocab.json"
    ranking.write_text(json.dumps(list(range(63, -1, -1))))
    assert _check_q(target, draft, SamplingConfig(temperature=1.0), draft_vocab=12, ranking=ranking) > 12


def test_a_reduced_vocabulary_stays_lossless(target, draft):
    """The first tokens of many T=1 generations with a 12-id draft vocabulary follow the target exactly."""
    from helpers import check_sequence
    from test_lossless_e2e import exact_rows, first_tokens, sampling_prompt

    cfg = SamplingConfig(temperature=1.0)
    prompt = sampling_prompt(target.model, cfg)
    g = make_generator(99)
    d = DraftModelDrafter(draft, cfg, g, gamma=3, draft_vocab=12)
    emitted, _, firsts = first_tokens(target, d, prompt, cfg, g)
    result = check_sequence(emitted, exact_rows(target.model, prompt, emitted, cfg))
    assert result.ok, str(result)
    assert sum(n > 1 for n in firsts) > len(firsts) // 20  # drafts were accepted: the check is not vacuous


def test_the_q_check_catches_rejected_drafts_left_in_the_cache(target, draft, monkeypatch):
    """Mutation: the KV layers ignore the roll-back, so the rejected drafts stay in the draft's context."""
    from specbench.models.target import BufferLayer

    monkeypatch.setattr(BufferLayer, "truncate", lambda self, size: None)
    with pytest.raises(AssertionError):
        _check_q(target, draft, SamplingConfig(temperature=1.0))


@torch.inference_mode()
def test_greedy_drafts_are_the_draft_argmax_chain(target, draft):
    cfg = SamplingConfig()
    drafter = Checking(draft, cfg, None, gamma=4)
    prompt = torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    gen = generate(target, drafter, prompt, 24, cfg, None, stop_ids=set())
    assert len(gen.steps) < 24  # some drafts accepted
    for tokens, drafts, q, _ in drafter.seen:
        assert q is None
        seq = list(tokens)
        for tok in drafts:
            assert tok == int(_uncached_next(draft.model, seq).argmax())
            seq.append(tok)


def test_gamma_is_bounded_by_the_draft_context(target):
    short = copy.deepcopy(target.model)
    short.config.max_position_embeddings = 12
    d = DraftModelDrafter(Target(short, name="short"), SamplingConfig(), None, gamma=5)
    d.begin(list(range(10)), None)
    assert len(d.propose(list(range(10))).tokens) == 2


def test_other_vocabularies_are_refused(target):
    bigger = tiny_target(vocab_size=80)
    with pytest.raises(CheckpointError, match="scores 80 token ids, the target tiny 64"):
        check_same_vocabulary(target, bigger)

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    a, b = copy.copy(target), copy.copy(target)
    a.tokenizer, b.tokenizer = Tok({"x": 0, "y": 1}), Tok({"x": 0, "z": 1})
    with pytest.raises(CheckpointError, match="another tokenizer than the target"):
        check_same_vocabulary(a, b)
    b.tokenizer = Tok({"x": 0, "y": 1})
    check_same_vocabulary(a, b)


def test_the_method_needs_a_draft_and_checks_it(target, tmp_path):
    method = get_method("sps")
    with pytest.raises(CheckpointError, match="method sps needs a draft model for tiny: pass --param checkpoint=PATH"):
        method.drafter(target, SamplingConfig(), None, **method.params())
    tvdpp = get_method("tvdpp")
    with pytest.raises(CheckpointError, match="or train one with `specbench train --method tvdpp ...`"):
        tvdpp.drafter(target, SamplingConfig(), None, **tvdpp.params())
    tiny_target(vocab_size=80).model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="scores 80 token ids"):
        method.drafter(target, SamplingConfig(), None, **method.params({"checkpoint": str(tmp_path)}))
    with pytest.raises(UsageError, match="gamma must be >= 1"):
        method.drafter(target, SamplingConfig(), None, **method.params({"checkpoint": target, "gamma": "0"}))


@torch.inference_mode()
def test_truncate_then_extend_equals_a_fresh_prefill(target):
    seq = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    target.prefill(seq[:5])
    target.extend(seq[5:9])
    target.truncate(6)
    got = target.extend(seq[6:])
    want = target.prefill(seq)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.hidden, want.hidden[6:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot truncate a cached sequence of 12 tokens to 13"):
        target.truncate(13)


def test_the_reduced_vocabulary_check_catches_q_reported_over_the_full_vocabulary(target, draft, monkeypatch):
    """Mutation: drafts drawn from the reduced q, but the verifier told the full-vocabulary q."""
    from helpers import check_sequence
    from test_lossless_e2e import MUTANT_GENERATIONS, exact_rows, first_tokens, sampling_prompt

    real = DraftModelDrafter.propose

    def wrong_q(self, tokens):
        prop = real(self, tokens)
        seqs = [tokens + prop.tokens[:i] for i in range(len(prop.tokens))]
        prop.draft_probs = torch.cat([probs(_uncached_next(self.draft.model, s), self.sampling) for s in seqs])
        return prop

    monkeypatch.setattr(DraftModelDrafter, "propose", wrong_q)
    cfg = SamplingConfig(temperature=1.0)
    prompt = sampling_prompt(target.model, cfg)
    g = make_generator(99)
    d = DraftModelDrafter(draft, cfg, g, gamma=3, draft_vocab=12)
    emitted, _, _ = first_tokens(target, d, prompt, cfg, g, n=MUTANT_GENERATIONS)
    assert not check_sequence(emitted, exact_rows(target.model, prompt, emitted, cfg)).ok


def test_a_prefix_checkpoint_is_built_from_the_target(target):
    method = get_method("sps")
    d = method.drafter(target, SamplingConfig(), None, **method.params({"checkpoint": "prefix:1"}))
    assert d.draft.config.num_hidden_layers == 1 and d.checkpoint_sha256.endswith(":prefix:1")
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(d.draft.model(input_ids=ids).logits,
                                   layer_prefix_draft(target.model, 1)(input_ids=ids).logits)
    for bad in ("prefix:3", "prefix:x"):
        with pytest.raises(CheckpointError, match=f"checkpoint={bad}: prefix:K needs an integer K in 1..2"):
            method.drafter(target, SamplingConfig(), None, **method.params({"checkpoint": bad}))


def test_the_ranking_follows_the_draft_and_is_recorded(target, tmp_path):
    """A trained draft's directory ranks its vocabulary; the drafter reports the ranking's sha256 only when a
    reduced vocabulary uses it."""
    from specbench.artifacts import sha256_file

    layer_prefix_draft(target.model, 1).save_pretrained(tmp_path)
    (tmp_path / "draft_vocab.json").write_text(json.dumps(list(range(63, -1, -1))))
    method = get_method("sps")
    d = method.drafter(target, SamplingConfig(), None, **method.params({"checkpoint": str(tmp_path),
                                                                          "draft_vocab": "8"}))
    assert d.vocab.ranking == tmp_path / "draft_vocab.json"
    assert d.draft_vocab_sha256 == sha256_file(tmp_path / "draft_vocab.json")
    d.begin([1, 2], None)
    assert sorted(d.vocab.ids.tolist()) == sorted({*range(56, 64), 1, 2})
    full = method.drafter(target, SamplingConfig(), None, **method.params({"checkpoint": str(tmp_path)}))
    assert full.draft_vocab_sha256 is None


def test_on_the_embedded_target_sps_drafts_with_its_phase1_prefix_over_the_distilled_drafts_ranking():
    """No checkpoint: the embedded target's sps draft is its 3-layer prefix (the CPU search's choice), and a
    reduced vocabulary follows the committed distilled drafts' ranking, the one their own decoding reads."""
    from helpers import tiny_target

    from specbench.methods.head_drafters import CHECKPOINTS_DIR

    named = tiny_target(name="smollm2-135m", num_layers=4)  # named as the embedded target
    method = get_method("sps")
    d = method.drafter(named, SamplingConfig(), None, **method.params({"draft_vocab": "8"}))
    assert d.draft.config.num_hidden_layers == 3 and d.checkpoint_sha256.endswith(":prefix:3")
    assert d.vocab.ranking == CHECKPOINTS_DIR / "kld-smollm2-135m" / "draft_vocab.json"
    assert (d.vocab.ranking.read_bytes() == (CHECKPOINTS_DIR / "tvdpp-smollm2-135m" / "draft_vocab.json").read_bytes()
            == (CHECKPOINTS_DIR / "tvd-smollm2-135m" / "draft_vocab.json").read_bytes())
