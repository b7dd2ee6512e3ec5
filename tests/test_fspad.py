"""FSPAD: the head's official checkpoint layout (strict), the Feature Sampler and PAD's split against their
formulas, what the tree drafter scores and feeds back, the training task's halves, and the train command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from specbench.models.draft_heads import ARCH_KEY, CheckpointError, load_head, save_head
from specbench.models.eagle_head import EagleHead
from specbench.models.fspad_head import VARIANT_KEY, VARIANTS, FspadHead

pytestmark = pytest.mark.usefixtures("single_thread")

H, I, KV = 32, 64, 16  # noqa: E741 - the tiny target: hidden, intermediate, kv heads x head dim

# The trainable keys of Luc4Gui/FSPAD's three models (cnets_fspad.py, cnets_fspad_wofs.py, cnets_mlplin.py)
# for the tiny target's sizes, written out from the official code.
ATTENTION = {"layers.0.self_attn.q_proj.weight": (H, H), "layers.0.self_attn.k_proj.weight": (KV, H),
             "layers.0.self_attn.v_proj.weight": (KV, H), "layers.0.self_attn.o_proj.weight": (H, H),
             "layers.0.mlp.gate_proj.weight": (I, H), "layers.0.mlp.up_proj.weight": (I, H),
             "layers.0.post_attention_layernorm.weight": (H,)}
SAMPLER = {"fc.fc.weight": (H, 2 * H), "fc.fc.bias": (H,), "fc.mlp.gate_proj.weight": (I, H),
           "fc.mlp.up_proj.weight": (I, H), "fc.mlp.down_proj.weight": (H, I),
           "fc.post_attention_layernorm.weight": (H,)}
PLAIN_FC = {"fc.weight": (H, 2 * H), "fc.bias": (H,)}
OFFICIAL_KEYS = {
    "fspad": {**SAMPLER, **ATTENTION, "layers.0.mlp.down_proj.weight": (2 * H, I)},
    "wofs": {**PLAIN_FC, **ATTENTION, "layers.0.mlp.down_proj.weight": (2 * H, I)},
    "mlplin": {**SAMPLER, **ATTENTION, "layers.0.mlp.down_proj.weight": (H, I)},
}


def _head(target, variant: str, seed: int = 0) -> FspadHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = FspadHead.for_target(target, variant=variant).eval()
        for p in head.parameters():  # a trained-looking head: the norms' weights are not all ones
            p.data.normal_(0, 0.3) if p.dim() > 1 else p.data.uniform_(0.5, 1.5)
    return head


def _official_checkpoint(target, d, variant: str, seed: int = 1, with_variant_key: bool = False) -> dict:
    """An official-layout checkpoint (no specbench_head key; the embedding copy EAGLE's trainer saves)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g) * 0.3 for k, shape in OFFICIAL_KEYS[variant].items()}
    save_file({**sd, "embed_tokens.weight": target.model.get_input_embeddings().weight.clone()},
              str(d / "model.safetensors"))
    cfg = {k: v for k, v in target.config.to_dict().items() if k in (
        "hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
        "rms_norm_eps", "hidden_act", "max_position_embeddings", "rope_theta", "model_type")}
    cfg.update(num_hidden_layers=1, architectures=["LlamaForCausalLM"], bias=True)
    if with_variant_key:
        cfg[VARIANT_KEY] = variant
    (d / "config.json").write_text(json.dumps(cfg))
    return sd


@pytest.mark.parametrize("variant", VARIANTS)
def test_keys_and_shapes_are_the_official_codes(target, variant):
    head = FspadHead.for_target(target, variant=variant)
    assert {k: tuple(v.shape) for k, v in head.trainable_state_dict().items()} == OFFICIAL_KEYS[variant]


def test_an_official_checkpoint_loads_strictly_as_fspad(target, tmp_path):
    from specbench.methods.head_drafters import resolve_head

    sd = _official_checkpoint(target, tmp_path, "fspad")
    rec = resolve_head("fspad", target, str(tmp_path))
    assert rec.arch == "fspad" and rec.head.variant == "fspad"
    own = rec.head.trainable_state_dict()
    assert set(own) == set(sd) and all(torch.equal(own[k], sd[k]) for k in sd)
    with pytest.raises(CheckpointError, match="does not match an eagle head.*unexpected key.*fc.fc.weight"):
        load_head(tmp_path, target)  # no architecture asked: read as EAGLE's, and refused


@pytest.mark.parametrize("variant", ["wofs", "mlplin"])
def test_an_ablation_checkpoint_needs_its_variant(target, tmp_path, variant):
    _official_checkpoint(target, tmp_path, variant)
    with pytest.raises(CheckpointError, match=f"names no {VARIANT_KEY}, read as fspad.*\"{VARIANT_KEY}\""):
        load_head(tmp_path, target, "fspad")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, VARIANT_KEY: variant}))
    assert load_head(tmp_path, target, "fspad").head.variant == variant
    (tmp_path / "config.json").write_text(json.dumps({**cfg, VARIANT_KEY: "nope"}))
    with pytest.raises(CheckpointError, match="fspad_variant='nope'; known: fspad, wofs, mlplin"):
        load_head(tmp_path, target, "fspad")


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_load_round_trip(target, tmp_path, variant):
    head = _head(target, variant)
    save_head(head, "fspad", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg[ARCH_KEY] == "fspad" and cfg[VARIANT_KEY] == variant
    back = load_head(tmp_path, target).head
    ids, f = torch.randint(0, 64, (1, 7)), torch.randn(1, 7, H)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, f, torch.arange(7)), head(ids, f, torch.arange(7)), rtol=0, atol=0)


def _rms(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def test_feature_sampler_is_efc(target):
    """x = fc(cat(e, f)); x + down(SiLU(gate(e)) * up(RMSNorm(x))), written out."""
    head = _head(target, "fspad")
    sd = head.trainable_state_dict()
    ids, f = torch.randint(0, 64, (2, 5)), torch.randn(2, 5, H)
    e = target.model.get_input_embeddings()(ids)
    x = F.linear(torch.cat((e, f), -1), sd["fc.fc.weight"], sd["fc.fc.bias"])
    n = _rms(x, sd["fc.post_attention_layernorm.weight"], target.config.rms_norm_eps)
    want = x + F.linear(F.silu(F.linear(e, sd["fc.mlp.gate_proj.weight"])) * F.linear(n, sd["fc.mlp.up_proj.weight"]),
                        sd["fc.mlp.down_proj.weight"])
    torch.testing.assert_close(head.fuse(e, f), want)


def _eagle_with_down_rows(target, head: FspadHead, rows: slice) -> EagleHead:
    """An EAGLE head with `head`'s decoder layer whose down_proj keeps the given output rows."""
    eagle = EagleHead.for_target(target).eval()
    sd = {k: v for k, v in head.state_dict().items() if k.startswith("layers.0.")}
    sd["layers.0.mlp.down_proj.weight"] = sd["layers.0.mlp.down_proj.weight"][rows]
    eagle.load_state_dict({**eagle.state_dict(), **sd})
    return eagle


@pytest.mark.parametrize("variant", ["fspad", "wofs"])
@torch.no_grad()
def test_pad_halves_are_the_layer_with_each_half_of_down_proj(target, variant):
    """predict / regress == the decoder layer (shared attention and residual) with down_proj's first / second
    H rows: the residual is duplicated, the MLP output split."""
    head = _head(target, variant)
    T = 6
    h, pos = torch.randn(1, T, H), torch.arange(T)[None]
    pe = head.rotary_emb(h, pos)
    out = head.decode(h, None, pos, pe, None)
    assert out.shape == (1, T, 2 * H)
    for rows, half in ((slice(0, H), head.token_features(out)), (slice(H, 2 * H), head.next_features(out))):
        torch.testing.assert_close(half, _eagle_with_down_rows(target, head, rows).decode(h, None, pos, pe, None))


@torch.no_grad()
def test_mlplin_has_one_output_that_scores_and_feeds(target):
    head = _head(target, "mlplin")
    out = head(torch.randint(0, 64, (1, 4)), torch.randn(1, 4, H), torch.arange(4))
    assert out.shape[-1] == H and head.token_features(out) is out and head.next_features(out) is out


def _drafter_matches_uncached(target, head, feed=None) -> None:
    """The dynamic tree drafter's depth-1 and depth-2 head outputs along a chain == one uncached head forward
    over the committed pairs plus the drafted ones, whose features are `feed` (default the head's regress half)
    of the previous output."""
    from specbench.methods.head_drafters import DynamicTreeDrafter
    from specbench.training.features import target_hidden_states

    feed = feed or head.next_features
    g = torch.Generator().manual_seed(4)
    seq = torch.randint(0, 64, (1, 14), generator=g)
    feats = target_hidden_states(target.model, seq).float()
    C = 9  # committed slots 0..C-1 (pairs (f_t, s_{t+1}))
    s = seq[0].tolist()
    d = DynamicTreeDrafter(head, 3, 2, 6)
    d.begin(s[:C + 1], type("P", (), {"hidden": feats[0, :C]})())
    d._start_draft()
    out, slots = d.root_feature[None], torch.tensor([-1])
    ids, fs = seq[:, 1:C + 1], feats[:, :C]
    prev = d.root_feature
    for depth in (1, 2):
        tok = s[C + depth]
        out, slots = d._draft_forward(torch.tensor([tok]), out, slots, depth)
        ids = torch.cat([ids, torch.tensor([[tok]])], 1)
        fs = torch.cat([fs, feed(prev)[None, None]], 1)
        ref = head(ids, fs, torch.arange(ids.shape[1]))[0, -1]
        torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)
        prev = out[0]


@torch.inference_mode()
def test_the_drafter_feeds_regress_to_the_next_depth(target):
    _drafter_matches_uncached(target, _head(target, "fspad"))


@torch.inference_mode()
def test_the_drafter_check_catches_predict_fed_back(target):
    head = _head(target, "fspad")
    with pytest.raises(AssertionError):
        _drafter_matches_uncached(target, head, feed=head.token_features)


def _batch(target, B=2, T=10):
    from specbench.training.features import target_hidden_states
    from specbench.training.tasks import shift_batch

    g = torch.Generator().manual_seed(6)
    seq = torch.randint(0, 64, (B, T + 1), generator=g)
    hid = target_hidden_states(target.model, seq).float()
    rows = [{"input_ids": seq[b], "loss_mask": torch.ones(T + 1), "hidden": hid[b]} for b in range(B)]
    return shift_batch(rows)


def test_the_loss_puts_smoothl1_on_regress_and_ce_on_predict(target):
    from specbench.training.fspad import FspadOptions, FspadTask
    from specbench.training.losses import distribution_loss, feature_loss

    task = FspadTask(FspadOptions(noise="none", embed_init_scale=1.0))
    head = task.make_head(target.model, seed=0)
    batch = _batch(target)
    got = task.loss(head, batch)
    with torch.no_grad():
        out = head(batch["input_ids"], batch["features"], batch["position_ids"],
                   attention_mask=batch["attention_mask"])
        predict, regress = out[..., :H], out[..., H:]
        lm = target.model.get_output_embeddings()
        vloss = feature_loss(regress, batch["target"], batch["loss_mask"])
        ploss, _ = distribution_loss(lm(predict.reshape(-1, H)), lm(batch["target"].reshape(-1, H)))
    torch.testing.assert_close(got["vloss"], vloss)
    torch.testing.assert_close(got["ploss"], ploss)
    torch.testing.assert_close(got["loss"].detach(), vloss + 0.1 * ploss)


def test_the_embedding_init_scale_reaches_the_samplers_fc(target):
    from specbench.training.eagle import build_head

    a = build_head(target.model, seed=0, cls=FspadHead, variant="fspad")
    b = build_head(target.model, seed=0, embed_init_scale=3.0, cls=FspadHead, variant="fspad")
    torch.testing.assert_close(b.fc.fc.weight[:, :H], 3 * a.fc.fc.weight[:, :H])
    torch.testing.assert_close(b.fc.fc.weight[:, H:], a.fc.fc.weight[:, H:])


def test_train_command_trains_an_ablation_into_a_loadable_head(tmp_path, monkeypatch):
    """`specbench train --method fspad --variant wofs` on the tiny target: the manifest says which variant,
    the exported head loads strictly as that FSPAD variant."""

    from test_training import tiny_train_inputs

    from specbench.training.fspad import main

    tiny, _, _ = tiny_train_inputs(tmp_path, monkeypatch)
    out = tmp_path / "wofs"
    rc = main(["--target", str(tmp_path / "t"), "--out", str(out), "--data", str(tmp_path / "sg.json"),
               "--max-conversations", "8", "--max-tokens", "64", "--epochs", "1", "--batch-size", "4",
               "--heldout", "2", "--no-progress", "--variant", "wofs"])
    assert rc == 0
    man = json.loads((out / "MANIFEST.json").read_text())
    assert man["method"] == "fspad" and man["training"]["task"]["variant"] == "wofs"
    assert man["training"]["task"]["partial_alignment"] and not man["training"]["task"]["feature_sampler"]
    rec = load_head(out, tiny.model, "fspad")
    assert rec.head.variant == "wofs" and rec.weights_sha256 == man["weights_sha256"]


def test_parameter_overhead_on_the_embedded_target_as_the_readme_states():
    """Trainable parameters of each head for SmolLM2-135M's sizes (H 576, I 1536, 9 heads, 3 KV heads), built on
    the meta device: the README's overhead figures."""
    from torch import nn
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      vocab_size=49152, num_hidden_layers=30)
    with torch.device("meta"):
        emb, lm = nn.Embedding(49152, 576), nn.Linear(576, 49152, bias=False)
        count = {"eagle": EagleHead(cfg, emb, lm)} | {v: FspadHead(cfg, emb, lm, variant=v) for v in VARIANTS}
        count = {k: sum(t.numel() for t in h.trainable_state_dict().values()) for k, h in count.items()}
    assert count == {"eagle": 4_203_648, "fspad": 7_743_168, "wofs": 5_088_384, "mlplin": 6_858_432}
