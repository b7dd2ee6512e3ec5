"""HASS training: the context-alignment mask, its equivalence with what the drafter feeds the head at
each depth, the top-K term, the official masking quirk, the two-phase schedule and the CLI options."""

from __future__ import annotations

import pytest
import torch

from specbench.models.eagle_head import EagleHead
from specbench.training import hass as H
from specbench.training.eagle import EagleOptions
from specbench.training.losses import distribution_loss, topk_distill_loss

pytestmark = pytest.mark.usefixtures("single_thread")


def _rows(mask: torch.Tensor, T: int, n: int) -> dict[int, set[tuple[int, int]]]:
    """query position -> {(set, position)} it attends to, for the last set's rows."""
    q = (n - 1) * T
    return {i: {(int(c) // T, int(c) % T) for c in mask[q + i].nonzero().flatten()} for i in range(T)}


def test_alignment_mask_rows_for_six_positions_and_three_forwards():
    """Every query row for L=6, J=3, written out from the rule (HASS cnets_hass.py, read in field_notes.md):
    forward n: query i sees T at j <= i-(n-1) and draft set k at j = i-(n-1)+k."""
    T = 6
    assert _rows(H.alignment_mask(T, 1), T, 1) == {i: {(0, j) for j in range(i + 1)} for i in range(T)}
    assert _rows(H.alignment_mask(T, 2), T, 2) == {
        0: {(1, 0)},
        **{i: {(0, j) for j in range(i)} | {(1, i)} for i in range(1, T)}}
    assert _rows(H.alignment_mask(T, 3), T, 3) == {
        0: {(2, 0)},
        1: {(1, 0), (2, 1)},
        **{i: {(0, j) for j in range(i - 1)} | {(1, i - 1), (2, i)} for i in range(2, T)}}
    # the rows of the earlier sets (outputs unused) attend causally inside their own set
    m = H.alignment_mask(T, 3)
    assert all(m[r].any() for r in range(3 * T))
    assert not m[:T, T:].any() and not m[T:2 * T, :T].any()


def _trained_like_forwards(head, ids, feats, J):
    """HassTask.forwards on one unpadded sequence, no noise."""
    T = ids.shape[1]
    batch = {"input_ids": ids, "features": feats, "position_ids": torch.arange(T)[None],
             "attention_mask": torch.ones(1, T, dtype=torch.long)}
    task = H.HassTask(H.HassOptions(forward_num_total=J, noise="none"))
    return task.forwards(head, batch)


@pytest.fixture(scope="module")
def setup(target):
    from specbench.training.features import target_hidden_states

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        head = EagleHead.for_target(target).eval()
        seq = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        feats = target_hidden_states(target.model, seq).float()
    return head, seq, feats


@torch.inference_mode()
def test_forward_n_is_what_the_drafter_feeds_the_head_at_depth_n(target, setup):
    """Training forward n at position i == the tree drafter's head output at draft depth n-1 below a root whose
    committed context ends at i-(n-1), drafting the sequence's own tokens."""
    from specbench.methods.head_drafters import DynamicTreeDrafter

    head, seq, feats = setup
    J = 3
    ids, f = seq[:, 1:], feats[:, :-1]  # pairs (f_t, s_{t+1}), EAGLE's shift
    preds = _trained_like_forwards(head, ids, f, J)
    s = seq[0].tolist()
    for C in (4, 9, 13):  # committed slots: positions 0..C-1
        d = DynamicTreeDrafter(head, 3, 2, 6)
        d.begin(s[:C + 1], type("P", (), {"hidden": feats[0, :C]})())
        assert torch.allclose(d.root_feature, preds[0][0, C - 1], atol=1e-5)
        d._start_draft()
        out, slots = d.root_feature[None], torch.tensor([-1])
        for depth in range(1, J):
            out, slots = d._draft_forward(torch.tensor([s[C + depth]]), out, slots, depth)
            torch.testing.assert_close(out[0], preds[depth][0, C + depth - 1], atol=1e-5, rtol=1e-5)


def test_the_equivalence_check_catches_an_off_by_one_alignment(target, setup, monkeypatch):
    real = H.alignment_mask

    def one_more_true_feature(T, n):
        m = real(T, n)
        q = (n - 1) * T
        i = torch.arange(T)
        ok = i - (n - 1) + 1 >= 0
        m[q + i[ok], (i - (n - 1) + 1)[ok]] = n > 1  # query also sees T at j = i-(n-2)
        return m

    monkeypatch.setattr(H, "alignment_mask", one_more_true_feature)
    with pytest.raises(AssertionError):
        test_forward_n_is_what_the_drafter_feeds_the_head_at_depth_n(target, setup)


def test_topk_term():
    t = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    h = torch.tensor([[0.0, 1.0, 0.5, 0.0]])
    p = torch.softmax(t, -1)[0]
    logq = torch.log_softmax(h, -1)[0]
    assert topk_distill_loss(h, t, 2) == pytest.approx(float(-(p[0] * logq[0] + p[1] * logq[1])))
    assert topk_distill_loss(h, t, 4) == pytest.approx(float(distribution_loss(h, t)[0]))


def test_official_attention_multiplies_instead_of_masking():
    torch.manual_seed(0)
    B, h, T, d = 1, 2, 4, 3

    class M:
        num_key_value_groups = 1

    q, k, v = torch.randn(B, h, T, d), torch.randn(B, h, T, d), torch.randn(B, h, T, d)
    allowed = torch.ones(T, T).tril().bool()
    additive = torch.zeros(T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    out, p = H._official_attention(M(), q, k, v, additive, scaling=d ** -0.5)
    w = (q @ k.transpose(2, 3)) * d ** -0.5 * allowed
    want = torch.softmax(w, -1) * allowed
    torch.testing.assert_close(p, want)
    torch.testing.assert_close(out, (want @ v).transpose(1, 2))
    assert (p.sum(-1)[..., :-1] < 1 - 1e-3).all()  # rows with masked keys lose mass; the last row sees all


def test_official_mask_mode_trains_with_that_attention(target):
    task = H.HassTask(H.HassOptions(mask_mode="official", embed_init_scale=1.0))
    head = task.make_head(target.model, seed=0)
    assert head.config._attn_implementation == H.OFFICIAL_ATTENTION
    additive = H.HassTask(H.HassOptions(embed_init_scale=1.0)).make_head(target.model, seed=0)
    assert additive.config._attn_implementation in ("sdpa", "eager")
    g = torch.Generator().manual_seed(0)
    ids, f = torch.randint(0, 64, (1, 8), generator=g), torch.randn(1, 8, 32, generator=g)
    a, b = _trained_like_forwards(head, ids, f, 1)[0], _trained_like_forwards(additive, ids, f, 1)[0]
    assert torch.allclose(a[:, -1], b[:, -1], atol=1e-5)  # the last row sees every key: no difference
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-3)  # the first row keeps weight on masked keys


def test_loss_has_every_forward_and_the_topk_term(target):
    from specbench.training.tasks import shift_batch

    task = H.HassTask(H.HassOptions(embed_init_scale=1.0, noise="none"))
    head = task.make_head(target.model, seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 10), generator=g)
    with torch.no_grad():
        hidden = target.model.get_decoder()(ids).last_hidden_state
    rows = [{"input_ids": ids[i], "loss_mask": torch.ones(10), "hidden": hidden[i]} for i in range(2)]
    out = task.loss(head, shift_batch(rows))
    names = {f"{k}_{n}" for k in ("vloss", "ploss", "topkloss", "acc") for n in (1, 2, 3)}
    assert names <= set(out)
    parts = sum(1.0 * out[f"vloss_{n}"] + 0.1 * out[f"ploss_{n}"] + 1.0 * out[f"topkloss_{n}"] for n in (1, 2, 3))
    assert float(out["loss"].detach()) == pytest.approx(float(parts), rel=1e-5)
    out["loss"].backward()
    assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0


def _recomputing_forwards(task, head, batch):
    """Forward n as the official code runs it: every one of the n sets through the layer, the last kept."""
    ids, pos, pad = batch["input_ids"], batch["position_ids"], batch["attention_mask"].bool()
    T = ids.shape[1]
    sets, preds = [batch["features"]], []
    for n in range(1, task.opts.forward_num_total + 1):
        if n == 1:
            pred = head(ids, sets[0], pos, attention_mask=batch["attention_mask"])
        else:
            allowed = H.alignment_mask(T, n)[None] & pad.repeat(1, n)[:, None, :]
            pred = head(ids.repeat(1, n), torch.cat(sets, 1), pos.repeat(1, n), attention_mask=allowed[:, None])[:, -T:]
        preds.append(pred)
        sets.append(torch.cat([sets[-1][:, :1], head.next_features(pred)[:, :-1]], 1).detach())
    return preds


@pytest.mark.parametrize("mask_mode", ["additive", "official"])
def test_cached_forwards_equal_recomputing_every_set(target, mask_mode):
    """Forward n runs only its last set, against the earlier forwards' keys and values: the same predictions
    and the same gradients as recomputing all n sets, on a padded batch, in both masking modes."""
    from specbench.training.tasks import shift_batch

    task = H.HassTask(H.HassOptions(embed_init_scale=1.0, noise="none", mask_mode=mask_mode))
    head = task.make_head(target.model, seed=0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    with torch.no_grad():
        hidden = target.model.get_decoder()(ids).last_hidden_state
    rows = [{"input_ids": ids[0], "loss_mask": torch.ones(12), "hidden": hidden[0]},
            {"input_ids": ids[1, :7], "loss_mask": torch.ones(7), "hidden": hidden[1, :7]}]  # padded
    batch = shift_batch(rows)
    assert not batch["attention_mask"].bool().all()
    grads = []
    for forwards in (task.forwards, lambda h, b: _recomputing_forwards(task, h, b)):
        head.zero_grad()
        preds = forwards(head, batch)
        keep = batch["attention_mask"].bool()[..., None]
        sum((p * keep).pow(2).sum() * (n + 1) for n, p in enumerate(preds)).backward()
        grads.append(([p.detach() * keep for p in preds], {k: v.grad.clone() for k, v in head.named_parameters()
                                                          if v.grad is not None}))
    (pa, ga), (pb, gb) = grads
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=1e-4, rtol=1e-4)


def test_two_phases_and_the_options():
    from specbench.training.pipeline import parser
    from specbench.training.tasks import options_from_args

    opts = H.HassOptions(phase2_epochs=2, phase2_lr=2e-5)
    first, second = H.HassTask(opts).phases()
    assert first.opts.topk_w == 0.0 and first.subdir == "phase1" and first.epochs is None
    assert second.opts == opts and second.epochs == 2 and second.lr == 2e-5 and second.subdir is None
    assert [p.opts for p in H.HassTask(H.HassOptions()).phases()] == [H.HassOptions()]
    a = parser(H.HassTask).parse_args(["--out", "x", "--topk", "5", "--mask-mode", "official",
                                       "--forward-num-total", "2"])
    o = options_from_args(H.HassOptions, a)
    assert (o.topk, o.mask_mode, o.forward_num_total) == (5, "official", 2)
    assert isinstance(o, EagleOptions)


def test_paper_ablations_map_to_training_options():
    """HASS Tables 4/7/8 vary the training: a suite case at the default training runs over the HASS head, any
    other value is skipped with the exact `specbench train` command, and variants not implemented say so."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "suites"))
    import _harness

    def params(setting):
        return _harness.method_params(SimpleNamespace(mode="paper", rows=(), setting=setting), "hass")

    assert params("topk_k=10,topk_w=1.0") == {} and params("align_steps=3") == {}
    assert params("data=fixed,depth=5,total_tokens=40") == {"depth": 5, "total_tokens": 40}
    for setting, says in [("topk_k=5,topk_w=1.0", "specbench train --method hass --topk 5`"),
                          ("align_steps=5", "--forward-num-total 5"),
                          ("data=model_generated,depth=6,total_tokens=60", "--corpus CORPUS"),
                          ("loss=bild", "an ablated algorithm or data this suite does not implement")]:
        with pytest.raises(pytest.skip.Exception, match=says.replace("(", "\\(")):
            params(setting)


def test_train_command_runs_both_phases_into_one_loadable_head(tmp_path, monkeypatch):
    """`specbench train --method hass --phase2-epochs 1` on the tiny target: phase 1 (topk_w 0) into OUT/phase1,
    phase 2 from it into OUT; both manifests say what they trained, the head loads strictly as an EAGLE head."""
    import json

    from test_training import tiny_train_inputs

    from specbench.models.draft_heads import checkpoint_sha256, load_head

    tiny, _, _ = tiny_train_inputs(tmp_path, monkeypatch)
    out = tmp_path / "hass"
    rc = H.main(["--target", str(tmp_path / "t"), "--out", str(out), "--data", str(tmp_path / "sg.json"),
                 "--max-conversations", "8", "--max-tokens", "64", "--epochs", "1", "--batch-size", "4",
                 "--heldout", "2", "--no-progress", "--phase2-epochs", "1", "--topk", "4"])
    assert rc == 0
    one, two = (json.loads((d / "MANIFEST.json").read_text()) for d in (out / "phase1", out))
    assert one["method"] == two["method"] == "hass"
    assert one["training"]["task"]["topk_w"] == 0.0 and two["training"]["task"]["topk_w"] == 1.0
    assert two["training"]["lr"] == 1e-5 and two["init_from"]["weights_sha256"] == checkpoint_sha256(out / "phase1")
    assert {"topkloss_1", "vloss_3"} <= set(two["losses_per_epoch"][0])
    assert load_head(out, tiny.model, "eagle").weights_sha256 == two["weights_sha256"]
