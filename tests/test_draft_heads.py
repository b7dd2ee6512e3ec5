"""The draft-head registry: generic strict checkpoints, the load record, and tree drafters over any head.

A toy architecture registered here (no attention; its output is two halves, one scoring the next token
and one fed to the next depth, as FSPAD's partial alignment does) goes through the same save/load and
the same static and dynamic tree drafters as EAGLE's head, and decodes losslessly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from specbench.decoding import SamplingConfig, generate, make_generator
from specbench.methods import DrafterBase
from specbench.methods.head_drafters import DynamicTreeDrafter, StaticTreeDrafter, parse_tree
from specbench.models.draft_heads import (
    ARCH_KEY,
    DRAFT_VOCAB_FILE,
    CheckpointError,
    HeadArch,
    LoadedHead,
    checkpoint_provenance,
    checkpoint_sha256,
    head_arch,
    load_head,
    register_head,
    save_head,
    target_parts,
)
from specbench.models.eagle_head import EagleHead

pytestmark = pytest.mark.usefixtures("single_thread")


class ToyHead(nn.Module):
    """out = cat(token half, next half) = mix(cat(embed(x), f)); no attention, so no KV use."""

    def __init__(self, target, width: int = 2):
        super().__init__()
        _, embed, lm_head, _ = target_parts(target)
        object.__setattr__(self, "_embed", embed)
        object.__setattr__(self, "_lm", lm_head)
        H = embed.weight.shape[1]
        self.width = width
        self.mix = nn.Linear(2 * H, width * H, device=embed.weight.device, dtype=embed.weight.dtype)

    hidden_size = property(lambda self: self._embed.weight.shape[1])
    vocab_size = property(lambda self: self._lm.weight.shape[0])
    lm_head = property(lambda self: self._lm)
    embed_tokens = property(lambda self: self._embed)

    def forward(self, input_ids, features, position_ids, attention_mask=None, past_key_values=None):
        if input_ids.dim() == 1:
            input_ids, features = input_ids[None], features[None]
        return self.mix(torch.cat([self._embed(input_ids).to(features.dtype), features], -1))

    def token_features(self, out):
        return out[..., : self.hidden_size]

    def next_features(self, out):
        return out[..., self.hidden_size:2 * self.hidden_size]

    def logits(self, features):
        return self._lm(features)

    def trainable_state_dict(self):
        return dict(self.state_dict())


def _build(target, cfg):
    return ToyHead(target, int((cfg or {}).get("width", 2)))


TOY = register_head(HeadArch("toy-test", _build, lambda head: {"width": head.width}, description="test only"))


@pytest.fixture(scope="module")
def toy_dir(target, tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = ToyHead(target)
    save_head(head, "toy-test", d)
    return d


def test_the_record_names_architecture_source_and_weights(target, toy_dir):
    (toy_dir / DRAFT_VOCAB_FILE).write_text("[3, 1, 2]")
    rec = load_head(toy_dir, target)
    assert isinstance(rec, LoadedHead) and isinstance(rec.head, ToyHead)
    assert rec.arch == "toy-test" and rec.source == toy_dir
    assert rec.weights_sha256 == checkpoint_sha256(toy_dir)
    assert rec.draft_vocab_file == toy_dir / DRAFT_VOCAB_FILE
    assert json.loads((toy_dir / "config.json").read_text())[ARCH_KEY] == "toy-test"
    assert not any(p.requires_grad for p in rec.head.parameters()) and not rec.head.training


def test_architecture_is_checked(target, toy_dir):
    with pytest.raises(CheckpointError, match="holds a toy-test head, not a eagle head"):
        load_head(toy_dir, target, "eagle")
    cfg = json.loads((toy_dir / "config.json").read_text())
    bad = toy_dir.parent / "unknown-arch"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, ARCH_KEY: "nope"}))
    (bad / "model.safetensors").write_bytes((toy_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="unknown draft head architecture 'nope'; known: .*eagle"):
        load_head(bad, target)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("mix.bias"), "missing key\\(s\\): mix.bias"),
    (lambda sd: sd.update(extra=torch.zeros(1)), "unexpected key\\(s\\): extra"),
    (lambda sd: sd.update({"mix.bias": torch.zeros(3)}), "wrong shapes \\(mix.bias: checkpoint \\(3,\\)"),
])
def test_strict_keys_and_shapes_for_any_architecture(target, toy_dir, tmp_path, edit, message):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(toy_dir / "model.safetensors"))
    edit(sd)
    (tmp_path / "config.json").write_text((toy_dir / "config.json").read_text())
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_head(tmp_path, target)


def test_a_config_describing_other_weights_is_refused(target, toy_dir, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({ARCH_KEY: "toy-test", "width": 3}))
    (tmp_path / "model.safetensors").write_bytes((toy_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_head(tmp_path, target)


def test_official_eagle_checkpoints_without_the_key_are_eagle(target, tmp_path):
    head = EagleHead.for_target(target)
    save_head(head, "eagle", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg[ARCH_KEY]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_head(tmp_path, target).arch == "eagle" and head_arch("eagle").name == "eagle"


def test_tree_drafters_over_any_head_are_lossless(target, toy_dir):
    """Greedy decoding over the toy head equals vanilla's; its drafts use the token half to score and the
    next half to feed deeper levels (a head that mixed them up would still be lossless, so the split is
    checked directly on the drafter's first level)."""
    rec = load_head(toy_dir, target)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (1, 6, 11)]
    cfg = SamplingConfig()
    for drafter in (StaticTreeDrafter(rec, parse_tree("cpu_10")), DynamicTreeDrafter(rec, 3, 3, 8)):
        assert drafter.checkpoint_sha256 == checkpoint_sha256(toy_dir)
        for prompt in prompts:
            ref = generate(target, DrafterBase(), prompt, 24, cfg, make_generator(0), stop_ids=set()).tokens
            got = generate(target, drafter, prompt, 24, cfg, make_generator(0), stop_ids=set())
            assert got.tokens == ref
            assert got.drafted > 0 or len(prompt) == 1
    d = DynamicTreeDrafter(rec, 2, 2, 5)
    prompt = prompts[2]
    target.prefill(prompt[:-1])
    d.begin(prompt, target.prefill(prompt[:-1]))
    prop = d.propose(prompt)
    first = rec.head.logits(rec.head.token_features(d.root_feature)).topk(2).indices.tolist()
    assert prop.tokens[:2] == first


def test_a_method_refuses_a_loaded_head_of_another_architecture(target, toy_dir):
    from specbench.methods.head_drafters import resolve_head

    with pytest.raises(CheckpointError, match="method eagle2 drafts with a eagle head, not the given toy-test head"):
        resolve_head("eagle2", target, load_head(toy_dir, target))


def test_every_committed_head_carries_a_manifest_that_matches_it(tmp_path):
    """Each head under specbench/checkpoints/ (package data) has a MANIFEST.json naming its weights' sha256,
    the method that trained it and the target it was trained for, consistent with its config.json; the
    catalogue's default heads are among them."""
    from specbench.methods import catalogue
    from specbench.methods.head_drafters import CHECKPOINTS_DIR
    from specbench.models.draft_heads import checkpoint_sha256

    dirs = sorted(d for d in CHECKPOINTS_DIR.iterdir() if d.is_dir())
    defaults = {m.default_checkpoint.name for m in catalogue.KNOWN if m.default_checkpoint}
    assert defaults <= {d.name for d in dirs}
    for d in dirs:
        man = json.loads((d / "MANIFEST.json").read_text())
        cfg = json.loads((d / "config.json").read_text())
        assert man["weights_sha256"] == checkpoint_sha256(d), d.name
        assert d.name.endswith(f"-{man['target']['name']}") and d.name.startswith(man["method"]), d.name
        seeded = re.search(r"-s(\d+)-", d.name)  # another training seed of a head (`specbench fidelity install`)
        assert not seeded or int(seeded[1]) == man["training"]["seed"] != 0, d.name
        assert cfg.get("specbench_head") == catalogue.identity(man["method"]).head, d.name
        if "specbench_prefix_draft" in cfg:  # a distilled draft LM: the layers of the target it names
            assert cfg["specbench_prefix_draft"]["target_sha256"] == man["target"]["weights_sha256"], d.name
            assert cfg["specbench_prefix_draft"]["layers"] == man["training"]["task"]["layers"], d.name
        variant = man["training"]["task"].get("variant")
        assert cfg.get("fspad_variant") == variant, d.name
        assert variant in (None, "fspad") or f"-{variant}-" in d.name, d.name
        # what results files record of it: the arm, seed and data claims group runs by
        prov = checkpoint_provenance(d)
        arm = {"fspad": None if variant == "fspad" else variant,
               "hass": {"additive": None}.get(man["training"]["task"].get("mask_mode"), "official")}.get(man["method"])
        assert prov["variant"] == man["variant"] == arm, d.name
        assert prov["seed"] == man["training"]["seed"] and prov["epochs"] == man["training"]["epochs"], d.name
        assert prov["draft_vocab"] == man["training"]["task"].get("draft_vocab"), d.name
        again = json.loads(json.dumps(man))  # the recipe: what differs apart from the seed changes it
        again["training"].update(seed=7, steps=1, train_seconds=1.0, fused_adamw=True)  # fused: how it ran
        assert _provenance_of(again, tmp_path / d.name)["recipe"] == prov["recipe"], d.name
        again["training"]["lr"] = 1.0
        assert _provenance_of(again, tmp_path / d.name)["recipe"] != prov["recipe"], d.name
        corpus = man["data"].get("corpus")
        assert prov["data"] == (f"corpus:sha256={corpus['content_sha256']}" if corpus else
                                f"{man['data']['source_id']} start=0 conversations={man['data']['conversations_used']} "
                                f"max_tokens={man['data']['max_tokens']}"), d.name


def _provenance_of(manifest: dict, d: Path) -> dict:
    d.mkdir(exist_ok=True)
    (d / "MANIFEST.json").write_text(json.dumps(manifest))
    return checkpoint_provenance(d)


def test_a_head_without_a_manifest_has_no_provenance(tmp_path):
    assert checkpoint_provenance(tmp_path) is None and checkpoint_provenance(None) is None
    (tmp_path / "MANIFEST.json").write_text("{not json")
    assert checkpoint_provenance(tmp_path) is None


def test_a_task_names_its_arm_only_off_the_default():
    from specbench.training.fspad import FspadOptions, FspadTask
    from specbench.training.hass import HassOptions, HassTask

    assert HassTask().variant() is None and HassTask(HassOptions(mask_mode="official")).variant() == "official"
    assert FspadTask().variant() is None and FspadTask(FspadOptions(variant="wofs")).variant() == "wofs"
