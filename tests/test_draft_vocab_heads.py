"""Heads trained over a reduced draft vocabulary (EAGLE-3's d2t/t2d mapping in the checkpoint): strict
loading, training over the draft vocabulary's rows, the held-out check, and drafting over exactly it.
Losslessness with such a head runs in tests/test_lossless_e2e.py (REDUCED_VOCAB)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_target

from specbench.errors import UsageError
from specbench.models.draft_heads import CheckpointError, load_head, save_head
from specbench.models.eagle_head import EagleHead
from specbench.training.eagle import EagleOptions, EagleTask

IDS = [3, 9, 10, 17, 22, 40, 41, 50, 60, 63]


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def _head(target, ids=IDS):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = EagleHead.for_target(target.model, draft_vocab_size=len(ids))
    head.set_draft_vocab(list(reversed(ids)))  # any order: draft ids follow target-id order
    return head.eval()


def test_the_mapping_is_saved_loaded_strictly_and_scores_its_rows(target, tmp_path):
    head = _head(target)
    assert head.draft_ids.tolist() == IDS and int(head.t2d.sum()) == len(IDS)
    x = torch.randn(5, head.hidden_size)
    w = target.model.get_output_embeddings().weight
    torch.testing.assert_close(head.logits(x), x @ w[IDS].T)
    save_head(head, "eagle", tmp_path / "h")
    assert json.loads((tmp_path / "h" / "config.json").read_text())["draft_vocab_size"] == len(IDS)
    loaded = load_head(tmp_path / "h", target.model, "eagle").head
    assert loaded.draft_ids.tolist() == IDS
    torch.testing.assert_close(loaded.logits(x), head.logits(x))

    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "h" / "model.safetensors"))
    assert sd["d2t"].dtype == torch.int64 and sd["t2d"].dtype == torch.bool
    # the mapping missing: an error naming it, never the identity
    save_file({k: v for k, v in sd.items() if k != "d2t"}, str(tmp_path / "h" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="draft_vocab_size=10: the d2t/t2d mapping.*missing key.*d2t"):
        load_head(tmp_path / "h", target.model, "eagle")
    # a mapping that is not one (t2d marks other ids than d2t gives)
    bad = dict(sd)
    bad["t2d"] = torch.roll(sd["t2d"], 1)
    save_file(bad, str(tmp_path / "h" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="inconsistent"):
        load_head(tmp_path / "h", target.model, "eagle")
    # weights with a mapping under a config that names no draft vocabulary
    save_file(sd, str(tmp_path / "h" / "model.safetensors"))
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    del cfg["draft_vocab_size"]
    (tmp_path / "h" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="names no draft_vocab_size.*unexpected key.*d2t, t2d"):
        load_head(tmp_path / "h", target.model, "eagle")


def test_training_scores_the_draft_vocabulary_renormalised(target):
    """make_head takes the data's N most frequent assistant tokens; both distributions of the loss are over
    those rows only (the target's softmax renormalised over them)."""
    from specbench.training.features import target_hidden_states
    from specbench.training.losses import distribution_loss

    model = target.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (6, 12), generator=g)
    hidden = target_hidden_states(model, ids)
    rows = [{"input_ids": ids[i], "loss_mask": torch.ones(12), "hidden": hidden[i]} for i in range(6)]
    counts = torch.bincount(ids.reshape(-1), minlength=64)  # every token is an assistant one here
    top = sorted(range(64), key=lambda t: (-int(counts[t]), t))[:12]
    task = EagleTask(EagleOptions(embed_init_scale=1.0, draft_vocab=12, noise="none"))
    head = task.make_head(model, rows, seed=0)
    assert head.draft_ids.tolist() == sorted(top)
    batch = task.collate(rows)
    out = task.loss(head, batch)
    pred = task.forward(head, batch)
    m = batch["loss_mask"].reshape(-1) > 0
    w = model.get_output_embeddings().weight[sorted(top)]
    ce, _ = distribution_loss(pred.reshape(-1, 32)[m] @ w.T, batch["target"].reshape(-1, 32)[m] @ w.T)
    torch.testing.assert_close(out["ploss"], ce.detach())
    with pytest.raises(ValueError, match="draft_vocab must lie in 1..63"):
        EagleTask(EagleOptions(embed_init_scale=1.0, draft_vocab=64)).make_head(model, rows)


def test_heldout_top1_maps_draft_ids_and_takes_the_targets_full_argmax(target, monkeypatch):
    """An oracle head (its forward returns the target's true next features) over a vocabulary holding most of
    the target's argmaxes: held-out top-1 is the share of positions whose argmax is in the vocabulary."""
    import specbench.training.sharegpt as sg
    from specbench.training.features import target_hidden_states
    from specbench.training.tasks import head_heldout_accuracy

    model = target.model
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 64, (20,), generator=g).tolist() for _ in range(3)]
    hidden = {tuple(s[1:]): target_hidden_states(model, torch.tensor([s])).float()[:, 1:] for s in seqs}
    argmax = torch.cat([model.get_output_embeddings()(h[0]).argmax(-1) for h in hidden.values()])
    common = torch.bincount(argmax, minlength=64).argsort(descending=True)[:10].tolist()
    head = _head(target, common)
    head.forward = lambda ids, feats, pos, **kw: hidden[tuple(ids[0].tolist())]  # the oracle
    monkeypatch.setattr(sg, "format_conversation", lambda tok, conv, n: sg.Formatted(conv, [0] + [1] * (len(conv) - 1)))
    got = head_heldout_accuracy(head, model, None, [(str(i), s) for i, s in enumerate(seqs)], 64)
    want = sum(int(a) in common for a in argmax) / len(argmax)
    assert got["tokens"] == len(argmax) and want > 0.3 and got["top1"] == pytest.approx(want)


def test_a_mapping_head_drafts_exactly_its_vocabulary(target, tmp_path):
    from specbench.decoding import SamplingConfig, generate, make_generator
    from specbench.methods import get_method

    save_head(_head(target), "eagle", tmp_path / "h")
    m = get_method("eagle2")
    drafter = m.drafter(target, SamplingConfig(), make_generator(0), **m.params({"checkpoint": str(tmp_path / "h")}))
    drafted: list[int] = []
    propose = drafter.propose
    drafter.propose = lambda tokens: drafted.extend(p.tokens) or p if (p := propose(tokens)) else p
    generate(target, drafter, [5, 6, 7, 8, 1, 2], 12, SamplingConfig(), make_generator(0), stop_ids=set())
    assert len(drafted) > 10 and set(drafted) <= set(IDS)  # never a token outside the head's vocabulary
    with pytest.raises(UsageError, match="trained over a draft vocabulary of 10 ids"):
        m.drafter(target, SamplingConfig(), make_generator(0), **m.params({"checkpoint": str(tmp_path / "h"),
                                                                            "draft_vocab": 5}))
