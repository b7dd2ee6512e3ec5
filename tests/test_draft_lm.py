"""The draft-LM distillation task: what it trains, its batches, each loss against the loss functions on
independently computed distributions, and the train command into a draft that sps decodes losslessly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from specbench.models.draft_heads import CheckpointError
from specbench.models.draft_lm import layer_prefix_draft, load_prefix_draft, save_prefix_draft
from specbench.training import losses as L
from specbench.training.draft_lm import DraftLMOptions, DraftLMTask, plain_batch

pytestmark = pytest.mark.usefixtures("single_thread")


def _rows(target, n=3, T=9, seed=0):
    """Feature-cache rows as extraction writes them: hidden states and the target's logit statistics over them."""
    from specbench.training.features import target_hidden_states, target_logit_stats

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):  # of unequal lengths: the batch pads them
        ids = torch.randint(0, 64, (T - 2 * i,), generator=g)
        mask = (torch.rand(T - 2 * i, generator=g) > 0.4).float()
        hidden = target_hidden_states(target.model, ids[None])[0]
        lse, top = target_logit_stats(target.model.get_output_embeddings(), hidden)
        rows.append({"input_ids": ids, "loss_mask": mask, "hidden": hidden, "target_lse": lse, "target_argmax": top})
    return rows


def test_only_the_layers_and_norm_train(target):
    task = DraftLMTask(DraftLMOptions(layers=1))
    head = task.make_head(target.model)
    trained = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("lm.model.layers.0.", "lm.model.norm.")) for n in trained)
    assert set(head.trainable_state_dict()) == {f"lm.{n.removeprefix('lm.')}" for n in trained}
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        want = layer_prefix_draft(target.model, 1)(input_ids=ids).logits
        torch.testing.assert_close(head.logits(head(ids)), want)


def test_the_batch_predicts_the_next_token():
    rows = [{"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([0.0, 1.0, 1.0]),
             "hidden": torch.ones(3, 4)},
            {"input_ids": torch.tensor([8, 9]), "loss_mask": torch.tensor([1.0, 0.0]), "hidden": torch.ones(2, 4)}]
    b = plain_batch(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["loss_mask"].tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]  # position t counts if token t+1 does
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("loss,fn", [("kld", L.kld_loss), ("tvd", L.tvd_loss),
                                     ("tvdpp", lambda q, p, m: L.tvdpp_loss(q, p, m, stats="batch"))])
def test_each_loss_scores_the_masked_positions_against_the_target(target, loss, fn):
    task = DraftLMTask(DraftLMOptions(layers=1, loss=loss, tvdpp_stats="batch"))
    head = task.make_head(target.model)
    rows = _rows(target)
    batch = plain_batch(rows)
    got = task.loss(head, batch)
    q_all, p_all = [], []
    with torch.no_grad():
        for r in rows:  # one sequence at a time, unpadded
            n = len(r["input_ids"])
            m = r["loss_mask"][1:n].bool()
            q_all.append(head.logits(head(r["input_ids"][None]))[0, :n - 1][m])
            p_all.append(target.model.get_output_embeddings()(r["hidden"][:n - 1][m]))
    q, p = torch.cat(q_all), torch.cat(p_all)
    ones = torch.ones(len(q))
    torch.testing.assert_close(got["loss"].detach(), fn(q, p, ones), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["tvd"], L.tvd(q, p, ones), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["kld", "tvd", "tvdpp"])
def test_a_draft_vocabulary_scores_the_datas_most_frequent_assistant_tokens(target, loss):
    """--draft-vocab N: q is the draft's full logits' columns at the data's N most frequent assistant ids, p the
    target's full distribution there; the support is the ranking decoding's draft_vocab=N reads."""
    from specbench.methods.draft_vocab import complete_ranking
    from specbench.training.features import assistant_token_ranking

    rows = _rows(target, seed=1)
    V = int(target.model.get_output_embeddings().weight.shape[0])
    task = DraftLMTask(DraftLMOptions(layers=1, loss=loss, draft_vocab=7))
    head = task.make_head(target.model, rows)
    S = torch.tensor(complete_ranking(assistant_token_ranking(rows, V)[0], V)[:7])
    assert torch.equal(task.support, S)
    counts = torch.bincount(torch.cat([r["input_ids"][r["loss_mask"] > 0] for r in rows]), minlength=V)
    assert counts[S].min() >= counts[torch.tensor([i for i in range(V) if i not in set(S.tolist())])].max()
    batch = plain_batch(rows)
    got = task.loss(head, batch)
    sel = batch["loss_mask"].reshape(-1).nonzero().squeeze(-1)
    with torch.no_grad():
        hidden = head(batch["input_ids"], batch["attention_mask"])
        q = head.logits(hidden).reshape(-1, V)[sel][:, S]  # the full logits' columns: another route
        p = target.model.get_output_embeddings()(batch["hidden"].reshape(-1, batch["hidden"].shape[-1])[sel])
    ones = torch.ones(len(q))
    fn = {"kld": L.kld_loss, "tvd": L.tvd_loss, "tvdpp": L.tvdpp_loss}[loss]
    torch.testing.assert_close(got["loss"].detach(), fn(q, p, ones, support=S), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["tvd"], L.tvd(q, p, ones, support=S), atol=1e-5, rtol=1e-5)
    want_acc = (S[q.argmax(-1)] == p.argmax(-1)).float().mean()  # the draft's token ids, not its column numbers
    torch.testing.assert_close(got["acc"], want_acc)
    with pytest.raises(ValueError, match="draft_vocab must lie in 1"):
        DraftLMTask(DraftLMOptions(layers=1, draft_vocab=V)).make_head(target.model, rows)
    # p on S comes from the cached logsumexp of all the target's logits: a batch without it is refused
    with pytest.raises(ValueError, match="target_lse"):
        task.loss(head, {k: v for k, v in batch.items() if k != "target_lse"})


def test_train_command_makes_a_draft_that_sps_decodes_losslessly(tmp_path, monkeypatch):
    """`specbench train --method tvd --layers 1` on the tiny target: the manifest says the loss, only the kept
    layers and the norm changed, and the exported directory drafts for `tvd` with vanilla's greedy output."""

    from test_training import tiny_train_inputs

    from specbench.decoding import SamplingConfig, generate
    from specbench.methods import DrafterBase, get_method
    from specbench.models import load_model
    from specbench.models.target import Target

    tiny, _, _ = tiny_train_inputs(tmp_path, monkeypatch)
    out = tmp_path / "tvd"
    rc = get_method("tvd").train(["--target", str(tmp_path / "t"), "--out", str(out), "--data",
                                  str(tmp_path / "sg.json"), "--max-conversations", "8", "--max-tokens", "64",
                                  "--epochs", "1", "--batch-size", "4", "--heldout", "2", "--no-progress",
                                  "--layers", "1", "--lr", "1e-2"])
    assert rc == 0
    man = json.loads((out / "MANIFEST.json").read_text())
    assert man["method"] == "tvd" and man["training"]["task"]["loss"] == "tvd" and man["heldout"]["tokens"] > 0
    stored = load_file(str(out / "model.safetensors"))  # the compact format: what training changed only
    assert stored and all(k.startswith(("model.layers.0.", "model.norm.")) for k in stored)
    assert json.loads((out / "config.json").read_text())["specbench_prefix_draft"]["layers"] == 1
    tiny_sha = load_model(str(tmp_path / "t")).weights_sha256
    draft = load_prefix_draft(out, tiny.model, target="t", target_sha256=tiny_sha)
    before = layer_prefix_draft(tiny.model, 1)
    changed = {k for k, v in draft.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert changed and all(k.startswith(("model.layers.0.", "model.norm.")) for k in changed)

    # a second phase from it (over a reduced draft vocabulary) keeps the embedding and LM head frozen
    rc = get_method("tvd").train(["--target", str(tmp_path / "t"), "--out", str(tmp_path / "again"), "--data",
                                  str(tmp_path / "sg.json"), "--max-conversations", "8", "--max-tokens", "64",
                                  "--epochs", "1", "--batch-size", "4", "--heldout", "2", "--no-progress",
                                  "--layers", "1", "--lr", "1e-2", "--init-from", str(out), "--draft-vocab", "16"])
    assert rc == 0
    again = json.loads((tmp_path / "again" / "MANIFEST.json").read_text())
    assert again["trainable_parameters"] == man["trainable_parameters"]
    assert again["training"]["task"]["draft_vocab"] == 16 and "16 most frequent" in again["training"]["task"]["q"]
    assert again["heldout"]["tokens"] > 0
    assert set(load_file(str(tmp_path / "again" / "model.safetensors"))) == set(stored)
    # ... and refuses to initialise a deeper draft from it (only its first layer would be loaded)
    deeper = r"does not match the head being trained: missing key\(s\): [^;]*model\.layers\.1\."
    with pytest.raises(CheckpointError, match=deeper):
        get_method("tvd").train(["--target", str(tmp_path / "t"), "--out", str(tmp_path / "deeper"), "--data",
                                 str(tmp_path / "sg.json"), "--max-conversations", "8", "--max-tokens", "64",
                                 "--epochs", "1", "--batch-size", "4", "--heldout", "0", "--no-progress",
                                 "--layers", "2", "--init-from", str(out)])

    target = Target(tiny.model, name="tiny", weights_sha256=tiny_sha)
    method = get_method("tvd")
    cfg = SamplingConfig()
    drafter = method.drafter(target, cfg, None, **method.params({"checkpoint": str(out)}))
    prompt = [3, 4, 5, 6, 7]
    ref = generate(target, DrafterBase(), prompt, 16, cfg, None, stop_ids=set()).tokens
    assert generate(target, drafter, prompt, 16, cfg, None, stop_ids=set()).tokens == ref
    reduced = method.drafter(target, cfg, None, **method.params({"checkpoint": str(tmp_path / "again"),
                                                                  "draft_vocab": "16"}))
    assert reduced.vocab.size == 16 and reduced.draft_vocab_sha256 is not None  # the checkpoint's own ranking
    assert generate(target, reduced, prompt, 16, cfg, None, stop_ids=set()).tokens == ref


def test_a_stored_prefix_draft_loads_strictly_over_its_own_target(target, tmp_path):
    """The compact format round-trips exactly, and refuses another target, and weights that are not a K-layer
    prefix's layers and norm (missing, unexpected, misshapen), naming what is wrong."""
    lm = layer_prefix_draft(target.model, 1)
    with torch.no_grad():
        lm.model.norm.weight.add_(0.5)  # not the target's: the round trip must carry it
    save_prefix_draft(lm, tmp_path, target="tiny", target_sha256="a" * 64)
    back = load_prefix_draft(tmp_path, target.model, target="tiny", target_sha256="a" * 64)
    for k, v in lm.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="fine-tuned from the layers of target tiny"):
        load_prefix_draft(tmp_path, target.model, target="other", target_sha256="b" * 64)
    good = load_file(str(tmp_path / "model.safetensors"))
    for broken, what in [({k: v for k, v in good.items() if k != "model.norm.weight"}, "missing key.*model.norm"),
                         ({**good, "model.layers.1.mlp.up_proj.weight": torch.zeros(2)}, "unexpected key"),
                         ({**good, "model.norm.weight": torch.zeros(3)}, r"model.norm.weight: shape \(3,\)")]:
        save_file(broken, str(tmp_path / "model.safetensors"))
        with pytest.raises(CheckpointError, match=what):
            load_prefix_draft(tmp_path, target.model, target="tiny", target_sha256="a" * 64)


def test_each_distilled_method_defaults_to_its_own_loss():
    """kld, tvd and tvdpp share one task: each one's command line (and its --help) defaults to its loss."""
    from specbench.training.draft_lm import LOSSES
    from specbench.training.pipeline import parser

    for loss in LOSSES:
        p = parser(DraftLMTask, loss, {"loss": loss})
        assert p.parse_args(["--out", "x"]).loss == loss
        assert p.prog == f"specbench train --method {loss}" and f"(default {loss})" in " ".join(p.format_help().split())
    with pytest.raises(ValueError, match="no option"):
        parser(DraftLMTask, "kld", {"los": "kld"})
