"""EAGLE head, checkpoint format and the EAGLE / EAGLE-2 drafters (tiny random Llama targets, fast)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import check_emitted, tiny_target
from transformers import LlamaConfig

from specbench.decoding import generate
from specbench.decoding.sampling import SamplingConfig, make_generator
from specbench.decoding.tree import Tree
from specbench.decoding.verify import Verdict, verify_tree_deterministic
from specbench.errors import UsageError
from specbench.methods.base import get_method
from specbench.methods.eagle import EAGLE, EAGLE2
from specbench.methods.head_drafters import (
    MC_SIM_7B_63,
    DynamicTreeDrafter,
    StaticTreeDrafter,
    parse_tree,
    resolve_head,
)
from specbench.methods.vanilla import METHOD as VANILLA
from specbench.models.draft_heads import CheckpointError, load_head, save_head
from specbench.models.eagle_head import EagleHead
from specbench.models.target import Target

pytestmark = pytest.mark.usefixtures("single_thread")

V, H = 64, 32
PROMPT = [3, 17, 5, 9, 22, 41]


def make_head(target: Target, seed: int = 1, fc_bias: bool = True) -> EagleHead:
    torch.manual_seed(seed)
    head = EagleHead.for_target(target, fc_bias=fc_bias).eval()
    with torch.no_grad():  # larger weights than nn.Linear's default: sharper, more varied draft distributions
        for p in head.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    head.requires_grad_(False)
    return head


def bigram_target_and_perfect_head(sharpness: float = 1.0) -> tuple[Target, EagleHead]:
    """A target whose last hidden state is (numerically) its current token's embedding, and a head that
    predicts it exactly: the head's distribution at every draft depth is the target's own.  `sharpness`
    scales the LM head (large: near-deterministic next tokens, so the greedy path also has the best
    cumulative draft score and EAGLE-2 keeps it whole)."""
    target = tiny_target(seed=3)
    m = target.model
    with torch.no_grad():
        for layer in m.model.layers:  # zero every residual branch: hidden = embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        e = m.model.embed_tokens.weight
        e.div_(e.pow(2).mean(-1, keepdim=True).sqrt())  # rms 1: the final RMSNorm is ~ identity
        m.model.norm.weight.fill_(1.0)
        m.lm_head.weight.mul_(sharpness)
    head = EagleHead.for_target(target).eval()
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, :H] = torch.eye(H)  # take the token embedding (the first half of the concat)
        head.fc.bias.zero_()
        head.layers[0].self_attn.o_proj.weight.zero_()
        head.layers[0].mlp.down_proj.weight.zero_()
    head.requires_grad_(False)
    return target, head


@pytest.fixture(scope="module")
def head(target) -> EagleHead:
    return make_head(target)


def vanilla_tokens(target, prompt, n):
    return generate(target, VANILLA.drafter(target, SamplingConfig(), None), prompt, n, SamplingConfig(),
                    None, stop_ids=set()).tokens


# ------------------------------------------------------------------ head and checkpoints


def official_files(head: EagleHead, target: Target, d, fmt: str, *, embed: bool = True, fc_bias: bool = True,
                   edit_sd=None, edit_cfg=None) -> None:
    """Write `head` the way SafeAILab/EAGLE checkpoints look: a 4.x-style Llama config + weights with the
    trained keys (+ the embedding copy EAGLE's trainer saves), fp16 like the published heads."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
           "hidden_size": H, "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 512,
           "model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
           "pad_token_id": 0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "float16",
           "transformers_version": "4.28.1", "use_cache": True, "vocab_size": V, "rope_theta": 10000.0,
           "bias": fc_bias}
    sd = {k: v.clone() for k, v in head.state_dict().items()}
    if embed:
        sd["embed_tokens.weight"] = target.model.get_input_embeddings().weight.clone()
    if edit_sd:
        edit_sd(sd)
    if edit_cfg:
        edit_cfg(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    if fmt == "bin":
        torch.save(sd, d / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))


def head_out(head, seed=0, T=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, T), generator=g)
    feats = torch.randn(2, T, H, generator=g)
    with torch.no_grad():
        return head(ids, feats, torch.arange(T))


def test_head_keys_and_api(target, head):
    keys = set(head.state_dict())
    assert keys == set(head.trainable_state_dict()) == {
        "fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
        "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight",
        "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight", "layers.0.post_attention_layernorm.weight"}
    assert head.fc.weight.shape == (H, 2 * H)
    assert head.embed_tokens is target.model.get_input_embeddings() and head.lm_head is target.head
    out = head_out(head)
    assert out.shape == (2, 9, H) and head.logits(out).shape == (2, 9, V)
    assert not any(p is target.head.weight for p in head.parameters())


def test_fc_order_is_embedding_then_feature(target, head):
    """EAGLE: fc(cat(inputs_embeds, hidden_states)): the embedding occupies fc's first H input columns."""
    ids = torch.tensor([[7]])
    feats = torch.randn(1, 1, H)
    with torch.no_grad():
        e = target.model.get_input_embeddings()(ids)
        want = head.fc(torch.cat([e, feats], -1))
        h2 = make_head(target)
        h2.layers[0].self_attn.o_proj.weight.zero_()
        h2.layers[0].mlp.down_proj.weight.zero_()
        h2.load_state_dict({**h2.state_dict(), "fc.weight": head.fc.weight, "fc.bias": head.fc.bias})
        assert torch.allclose(h2(ids, feats, torch.zeros(1, 1, dtype=torch.long)), want, atol=1e-6)


def test_head_cache_and_masks_match_full_forward(head):
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(5)
    ids, feats = torch.randint(0, V, (2, 8), generator=g), torch.randn(2, 8, H, generator=g)
    with torch.no_grad():
        full = head(ids, feats, torch.arange(8))
        cache = DynamicCache()
        a = head(ids[:, :5], feats[:, :5], torch.arange(5), past_key_values=cache)
        b = head(ids[:, 5:], feats[:, 5:], torch.arange(5, 8), past_key_values=cache)
        padded = head(ids, feats, torch.arange(8), attention_mask=torch.ones(2, 8, dtype=torch.long))
        m4 = torch.tril(torch.ones(8, 8, dtype=torch.bool))[None, None]
        masked = head(ids, feats, torch.arange(8), attention_mask=m4)
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)
    assert torch.allclose(padded, full, atol=1e-6) and torch.allclose(masked, full, atol=1e-6)


def test_head_gradients_reach_only_draft_weights():
    target = tiny_target()
    target.model.requires_grad_(True)  # even with a trainable target, the head must not touch its weights
    head = EagleHead.for_target(target).train()
    ids, feats = torch.randint(0, V, (1, 6)), torch.randn(1, 6, H)
    head.logits(head(ids, feats, torch.arange(6))).logsumexp(-1).sum().backward()
    assert head.fc.weight.grad is not None and head.layers[0].mlp.up_proj.weight.grad is not None
    assert target.head.weight.grad is None and target.model.get_input_embeddings().weight.grad is None


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("fc_bias", [True, False])
def test_official_format_loads(tmp_path, target, fmt, fc_bias):
    src = make_head(target, fc_bias=fc_bias)
    official_files(src, target, tmp_path / "ck", fmt, fc_bias=fc_bias)
    loaded = load_head(tmp_path / "ck", target, "eagle").head
    assert loaded.fc_bias == fc_bias
    assert torch.allclose(head_out(loaded), head_out(src), atol=1e-6)
    assert set(loaded.state_dict()) == set(src.state_dict())


def test_official_format_without_embedding_copy_loads(tmp_path, target, head):
    official_files(head, target, tmp_path / "ck", "safetensors", embed=False)
    assert torch.allclose(head_out(load_head(tmp_path / "ck", target, "eagle").head), head_out(head), atol=1e-6)


def test_fp16_checkpoint_loads_into_fp32_target(tmp_path, target, head):
    def to_half(sd):
        for k in sd:
            sd[k] = sd[k].half()
    official_files(head, target, tmp_path / "ck", "bin", edit_sd=to_half)
    loaded = load_head(tmp_path / "ck", target, "eagle").head
    assert loaded.fc.weight.dtype == torch.float32
    assert torch.allclose(head_out(loaded), head_out(head), atol=5e-2)


def test_round_trip(tmp_path, target, head):
    save_head(head, "eagle", tmp_path / "rt", extra_config={"specbench": {"target": "tiny"}})
    cfg = json.loads((tmp_path / "rt" / "config.json").read_text())
    assert cfg["bias"] is True and cfg["num_hidden_layers"] == 1 and cfg["hidden_size"] == H
    assert cfg["vocab_size"] == V and cfg["rope_theta"] == 10000.0 and cfg["specbench"] == {"target": "tiny"}
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "rt" / "model.safetensors"))) == set(head.state_dict())
    loaded = load_head(tmp_path / "rt", target, "eagle").head
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(head_out(loaded), head_out(head))


def _expect_error(tmp_path, target, head, *must_contain, **kw):
    d = tmp_path / "bad"
    official_files(head, target, d, kw.pop("fmt", "safetensors"), **kw)
    with pytest.raises(CheckpointError) as err:
        load_head(d, target, "eagle")
    msg = str(err.value)
    for s in must_contain:
        assert s in msg, msg
    return msg


def test_strict_missing_key(tmp_path, target, head):
    _expect_error(tmp_path, target, head, "missing key(s): layers.0.mlp.up_proj.weight",
                  edit_sd=lambda sd: sd.pop("layers.0.mlp.up_proj.weight"))


def test_strict_unexpected_key(tmp_path, target, head):
    def add(sd):
        sd["layers.0.input_layernorm.weight"] = torch.ones(H)
    _expect_error(tmp_path, target, head, "unexpected key(s): layers.0.input_layernorm.weight", edit_sd=add,
                  fmt="bin")


def test_strict_bias_flag_mismatch(tmp_path, target, head):
    _expect_error(tmp_path, target, head, "missing key(s): fc.bias", "bias=True",
                  edit_sd=lambda sd: sd.pop("fc.bias"))


def test_strict_hidden_size_mismatch(tmp_path, target, head):
    _expect_error(tmp_path, target, head, "hidden_size 48", "has 32",
                  edit_cfg=lambda c: c.update(hidden_size=48))


def test_strict_vocab_mismatch(tmp_path, target, head):
    _expect_error(tmp_path, target, head, "vocab_size 100", "has 64", edit_cfg=lambda c: c.update(vocab_size=100))


def test_strict_shape_mismatch(tmp_path, target, head):
    _expect_error(tmp_path, target, head, "layers.0.mlp.up_proj.weight", "(64, 32)",
                  edit_cfg=lambda c: c.update(intermediate_size=96))


def test_embedding_copy_of_another_target_is_refused(tmp_path, target, head):
    other = tiny_target(seed=11)

    def swap(sd):
        sd["embed_tokens.weight"] = other.model.get_input_embeddings().weight.clone()
    _expect_error(tmp_path, target, head, "embed_tokens.weight differs", edit_sd=swap)


def test_missing_weights_and_default_checkpoint(tmp_path, target):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"hidden_size": H, "vocab_size": V}))
    with pytest.raises(CheckpointError, match="no draft weights"):
        load_head(tmp_path / "empty", target, "eagle")
    for name in ("eagle", "eagle2"):
        m = get_method(name)
        with pytest.raises(CheckpointError, match=f"method {name} needs a draft checkpoint for tiny: pass --param "
                                                  "checkpoint=PATH or train one with `specbench train --method eagle"):
            m.drafter(target, SamplingConfig(), None, **m.params())


def test_checkpoint_param_path(tmp_path, target, head):
    save_head(head, "eagle", tmp_path / "ck")
    d = EAGLE2.drafter(target, SamplingConfig(), None, **EAGLE2.params({"checkpoint": str(tmp_path / "ck")}))
    assert torch.equal(head_out(d.head), head_out(head))
    import hashlib

    want = hashlib.sha256((tmp_path / "ck" / "model.safetensors").read_bytes()).hexdigest()
    assert d.checkpoint == str((tmp_path / "ck").resolve()) and d.checkpoint_sha256 == want


@pytest.mark.parametrize("params, message", [
    ({"draft_vocab": "-5"}, "draft_vocab must be >= 0"),
    ({"depth": "0"}, "the dynamic tree needs depth >= 1"),
])
def test_bad_head_parameters_are_one_usage_error(tmp_path, target, head, params, message):
    save_head(head, "eagle", tmp_path / "ck")
    with pytest.raises(UsageError, match=message):
        EAGLE2.drafter(target, SamplingConfig(), None, **EAGLE2.params({"checkpoint": str(tmp_path / "ck"), **params}))


def test_checkpoint_param_naming_a_file_is_refused(tmp_path, target):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    for m in (EAGLE, EAGLE2):
        with pytest.raises(CheckpointError, match="is a file; pass a directory"):
            m.drafter(target, SamplingConfig(), None, **m.params({"checkpoint": str(f)}))


# ------------------------------------------------------------------ trees


def test_static_tree_is_eagle_mc_sim_7b_63(target, head):
    paths = parse_tree("mc_sim_7b_63")
    assert len(paths) == 25 and max(map(len, paths)) == 5  # 25 drafts + root = 26 nodes, 5 draft levels
    d = StaticTreeDrafter(head, paths)
    d.begin(PROMPT, target.prefill(PROMPT[:-1]))
    prop = d.propose(PROMPT)
    tree = Tree(PROMPT[-1], prop)
    assert len(tree) == 26 and tree.max_depth == 5
    want = {(): 0}
    for i, p in enumerate(sorted(map(tuple, MC_SIM_7B_63), key=lambda p: (len(p), p)), start=1):
        want[p] = i
        assert tree.parents[i] == want[p[:-1]]


def _naive_tokens_feats(target, seq):
    with torch.no_grad():
        return target.body(input_ids=torch.tensor([seq[:-1]])).last_hidden_state[0]


def _naive_feature(head, seq, target_feats, path_tokens, path_feats):
    """The head's prediction after the committed pairs + drafted pairs, by one fresh causal forward."""
    ids = torch.tensor([seq[1:] + list(path_tokens)])
    feats = torch.cat([target_feats] + ([torch.stack(path_feats)] if path_feats else []))[None]
    with torch.no_grad():
        return head(ids, feats, torch.arange(ids.shape[1]))[0, -1]


def naive_eagle2(head, target, seq, depth, k, total):
    """EAGLE-2 drafting with every node's feature recomputed from scratch (no cache, no tree mask)."""
    tf = _naive_tokens_feats(target, seq)
    root = _naive_feature(head, seq, tf, [], [])
    cands = {}  # path -> score
    logp = torch.log_softmax(head.logits(root).float(), -1)
    v, i = torch.topk(logp, k)
    frontier = []  # (path, score, feats along the path: predicted feature of the parent of each node)
    for s, t in zip(v.tolist(), i.tolist()):
        cands[(t,)] = s
        frontier.append(((t,), s, [root]))
    for _ in range(2, depth + 1):
        level = []
        for path, score, pf in frontier:
            f = _naive_feature(head, seq, tf, path, pf)
            lp = torch.log_softmax(head.logits(f).float(), -1)
            v, i = torch.topk(lp, k)
            for s, t in zip(v.tolist(), i.tolist()):
                cands[path + (t,)] = score + s
                level.append((path + (t,), score + s, pf + [f]))
        level.sort(key=lambda x: -x[1])
        frontier = level[:k]
    best = sorted(cands.items(), key=lambda x: (-x[1], len(x[0])))[: total - 1]
    return dict(best)


def proposal_paths(tree: Tree) -> dict:
    return {tuple(tree.tokens[j] for j in tree.path_to(i)): i for i in range(1, len(tree))}


@pytest.mark.parametrize("depth,k,total", [(6, 10, 60), (4, 3, 9), (3, 5, 100)])
def test_dynamic_tree_matches_naive_eagle2(target, head, depth, k, total):
    d = DynamicTreeDrafter(head, depth, k, total)
    seq = PROMPT + [1, 2, 3]
    d.begin(seq, target.prefill(seq[:-1]))
    tree = Tree(seq[-1], d.propose(seq))
    n_cand = k + (depth - 1) * k * k
    assert len(tree) == min(total, n_cand + 1)
    assert tree.max_depth <= depth
    # closed under ancestors + topological + sorted by depth, then score (siblings in rank order)
    scores = [0.0] + d.last_scores.tolist()
    for i in range(1, len(tree)):
        p = tree.parents[i]
        assert 0 <= p < i and scores[i] <= scores[p] + 1e-6
        if i > 1:
            assert (tree.depth[i], -scores[i]) >= (tree.depth[i - 1], -scores[i - 1] - 1e-6)
    ref = naive_eagle2(head, target, seq, depth, k, total)
    got = proposal_paths(tree)
    assert set(got) == set(ref)
    for path, i in got.items():
        assert abs(scores[i] - ref[path]) < 1e-4 + 1e-5 * abs(ref[path])


def test_static_tree_matches_naive(target, head):
    seq = PROMPT + [8]
    paths = parse_tree("mc_sim_7b_63")
    d = StaticTreeDrafter(head, paths)
    d.begin(seq, target.prefill(seq[:-1]))
    tree = Tree(seq[-1], d.propose(seq))
    tf = _naive_tokens_feats(target, seq)
    memo = {(): ([], _naive_feature(head, seq, tf, [], []))}  # rank path -> (tokens, predicted feature)

    def node(rp):
        if rp not in memo:
            toks, f = node(rp[:-1])
            parent_feats = [node(rp[:j])[1] for j in range(len(rp) - 1)]
            t = int(torch.topk(head.logits(f), rp[-1] + 1).indices[-1])
            nt = toks + [t]
            memo[rp] = (nt, _naive_feature(head, seq, tf, nt, parent_feats + [f]) if len(rp) < 5 else None)
        return memo[rp]
    for i, rp in enumerate(paths, start=1):
        assert tree.tokens[i] == node(tuple(rp))[0][-1]


# ------------------------------------------------------------------ KV refresh


@pytest.mark.parametrize("method", ["eagle", "eagle2"])
def test_kv_refresh_equals_fresh_recompute(target, head, method):
    """After every step the head's cached state equals a fresh forward over the whole sequence with the
    target's real features; the target's own KV cache is untouched by drafting."""
    d = (StaticTreeDrafter(head, parse_tree("mc_sim_7b_63")) if method == "eagle"
         else DynamicTreeDrafter(head, 4, 4, 12))
    seq = list(PROMPT)
    d.begin(seq, target.prefill(seq[:-1]))
    accepted = 0
    for step in range(8):
        tf = _naive_tokens_feats(target, seq)
        assert d.committed == len(seq) - 1
        assert torch.allclose(d.root_feature, _naive_feature(head, seq, tf, [], []), atol=1e-4, rtol=1e-4)
        keys = [lay.keys.clone() for lay in target.cache.layers]
        tree = Tree(seq[-1], d.propose(seq))
        assert [torch.equal(a, lay.keys) for a, lay in zip(keys, target.cache.layers)] == [True] * len(keys)
        out = target.forward_tree(tree)
        # force some acceptance: follow the drafted first-child path for a few nodes when possible
        path, node = [], 0
        while tree.children[node] and len(path) < step % 4:
            node = tree.children[node][0]
            path.append(node)
        verdict = Verdict(path, int(out.logits[node].argmax()))
        accepted += len(path)
        target.commit([0, *path])
        seq += [tree.tokens[i] for i in path] + [verdict.token]
        d.update(tree, verdict, out)
    assert accepted > 5


# ------------------------------------------------------------------ losslessness


@pytest.mark.parametrize("method,params", [
    ("eagle", {}), ("eagle", {"tree": "cpu_10"}), ("eagle", {"tree": "[[0],[1],[0,0],[0,0,0]]"}),
    ("eagle2", {}), ("eagle2", {"depth": 3, "top_k": 4, "total_tokens": 12}),
    ("eagle2", {"draft_vocab": 16}),
])
def test_greedy_equals_vanilla(target, head, method, params):
    m = get_method(method)
    ref = vanilla_tokens(target, PROMPT, 48)
    d = m.drafter(target, SamplingConfig(), None, **m.params({"checkpoint": head, **params}))
    gen = generate(target, d, PROMPT, 48, SamplingConfig(), None, stop_ids=set())
    assert gen.tokens == ref


@pytest.mark.parametrize("method,params,tau", [
    ("eagle", {}, 6), ("eagle2", {}, 7), ("eagle2", {"depth": 3, "top_k": 2, "total_tokens": 5}, 4),
])
def test_perfect_head_accepts_everything(method, params, tau):
    """Non-vacuous acceptance: with a head that predicts the target exactly, every step accepts a whole
    root-to-leaf path of the deepest level (tau = draft depth + 1), and output still equals vanilla."""
    target, head = bigram_target_and_perfect_head(sharpness=20.0)
    m = get_method(method)
    prompt = [5, 9, 11]
    ref = vanilla_tokens(target, prompt, 42)
    d = m.drafter(target, SamplingConfig(), None, **m.params({"checkpoint": head, **params}))
    gen = generate(target, d, prompt, 42, SamplingConfig(), None, stop_ids=set())
    assert gen.tokens == ref
    assert gen.steps == [tau] * (42 // tau) + ([42 % tau] if 42 % tau else [])


def _first_two_draws(target, drafter, prompt, cfg, n, seed):
    """n draws of the first two emitted tokens of the decode loop, batched: step 1's proposal is
    deterministic, so it is verified n times in one call; draws that emitted one token continue with
    the drafter's (deterministic) second proposal after that token, replayed per distinct token."""
    from specbench.decoding.sampling import probs

    g = make_generator(seed)
    drafter.begin(prompt, target.prefill(prompt[:-1]))
    tree = Tree(prompt[-1], drafter.propose(prompt))
    out = target.forward_tree(tree)
    p = probs(out.logits, cfg)[None].expand(n, -1, -1)
    bv = verify_tree_deterministic(p, tree, g)
    first2 = bv.emitted(2)
    for tok in first2[bv.n_accepted == 0, 0].unique().tolist():
        rows = (bv.n_accepted == 0) & (first2[:, 0] == tok)
        drafter.begin(prompt, target.prefill(prompt[:-1]))
        t1 = Tree(prompt[-1], drafter.propose(prompt))
        o1 = target.forward_tree(t1)
        target.commit([0])
        drafter.update(t1, Verdict([], tok), o1)
        t2 = Tree(tok, drafter.propose(prompt + [tok]))
        o2 = target.forward_tree(t2)
        p2 = probs(o2.logits, cfg)[None].expand(int(rows.sum()), -1, -1)
        first2[rows, 1] = verify_tree_deterministic(p2, t2, g).emitted(1)[:, 0]
    return first2, bv


def _exact_first_two(target, prompt, cfg):
    from specbench.decoding.sampling import probs

    with torch.no_grad():
        p0 = probs(target.model(torch.tensor([prompt])).logits[0, -1], cfg)
        seqs = torch.tensor([prompt + [t] for t in range(V)])
        p1 = probs(target.model(seqs).logits[:, -1], cfg)
    return p0, p1


def noisy_head(head: EagleHead, seed: int = 2) -> EagleHead:
    """The perfect head perturbed (fc, and a live attention branch): imperfect but correlated drafts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.fc.weight.add_(torch.randn(head.fc.weight.shape, generator=g) * 0.04)
        o = head.layers[0].self_attn.o_proj.weight
        o.copy_(torch.randn(o.shape, generator=g) * 0.05)
    return head


@pytest.mark.parametrize("which", ["random", "noisy", "perfect"])
@pytest.mark.parametrize("method", ["eagle", "eagle2"])
def test_temperature_one_first_two_tokens_match_target(target, head, method, which):
    cfg = SamplingConfig(temperature=1.0)
    if which == "random":
        tgt, hd = target, head
    else:
        tgt, hd = bigram_target_and_perfect_head()
        if which == "noisy":
            hd = noisy_head(hd)
    m = get_method(method)
    d = m.drafter(tgt, cfg, None, **m.params({"checkpoint": hd}))
    first2, bv = _first_two_draws(tgt, d, PROMPT, cfg, 20_000, seed=7)
    accepted = float((bv.n_accepted >= 1).float().mean())
    print(f"{method}/{which}: first draft accepted in {accepted:.1%} of draws")
    assert accepted > {"random": 0.001, "noisy": 0.1, "perfect": 0.5}[which], accepted  # not vacuous
    res = check_emitted(first2, *_exact_first_two(tgt, PROMPT, cfg))
    assert res.ok, str(res)


def test_temperature_one_generate_runs(target, head):
    cfg = SamplingConfig(temperature=1.0, top_p=0.9)
    for m in (EAGLE, EAGLE2):
        d = m.drafter(target, cfg, None, **m.params({"checkpoint": head}))
        gen = generate(target, d, PROMPT, 30, cfg, make_generator(0), stop_ids=set())
        assert len(gen.tokens) == 30 and all(0 <= t < V for t in gen.tokens)


def test_one_token_prompt_and_resolve_head(target, head):
    for m in (EAGLE, EAGLE2):
        d = m.drafter(target, SamplingConfig(), None, **m.params({"checkpoint": head}))
        gen = generate(target, d, [4], 20, SamplingConfig(), None, stop_ids=set())
        assert gen.tokens == vanilla_tokens(target, [4], 20)
        assert gen.steps[0] == 1  # nothing to draft from before the first target feature exists
    assert resolve_head("eagle", target, head).head is head


def test_draft_vocab_grows_with_the_sequence(target, head):
    d = DynamicTreeDrafter(head, 3, 4, 12, draft_vocab=8)
    gen = generate(target, d, PROMPT, 30, SamplingConfig(), None, stop_ids=set())
    assert gen.tokens == vanilla_tokens(target, PROMPT, 30)
    vocab = set(d.vocab.ids.tolist())
    emitted_before_last_step = gen.tokens[: len(gen.tokens) - gen.steps[-1]]
    assert vocab >= set(range(8)) | set(PROMPT) | set(emitted_before_last_step)
    assert len(vocab) == d.vocab.ids.numel()  # no duplicates: siblings stay distinct
    assert set(d.propose(PROMPT + gen.tokens).tokens) <= vocab


def test_draft_vocab_file_in_checkpoint(tmp_path, target, head):
    save_head(head, "eagle", tmp_path / "ck")
    (tmp_path / "ck" / "draft_vocab.json").write_text(json.dumps(list(range(V - 1, -1, -1))))
    d = EAGLE2.drafter(target, SamplingConfig(), None,
                       **EAGLE2.params({"checkpoint": str(tmp_path / "ck"), "draft_vocab": "4"}))
    d.begin([1], target.prefill([]))
    assert d.vocab.ids.tolist() == [63, 62, 61, 60, 1]
    from specbench.artifacts import sha256_file

    assert d.draft_vocab_sha256 == sha256_file(tmp_path / "ck" / "draft_vocab.json")  # recorded in results
    full = EAGLE2.drafter(target, SamplingConfig(), None, **EAGLE2.params({"checkpoint": str(tmp_path / "ck")}))
    assert full.draft_vocab_sha256 is None  # full vocabulary: the ranking plays no part


def test_eager_and_sdpa_heads_agree(target, head):
    """Without a mask the head is causal under both attention implementations (eager has no is_causal)."""
    eager = EagleHead(LlamaConfig(**{**target.config.to_dict(), "attn_implementation": "eager"}),
                      target.model.get_input_embeddings(), target.head)
    assert eager.config._attn_implementation == "eager"
    eager.load_state_dict(head.state_dict())
    assert torch.allclose(head_out(eager), head_out(head), atol=1e-5)


def test_draft_vocab_file_lists_some_ids_only(tmp_path, target, head):
    """Ids a frequency list does not name follow it in id order, so draft_vocab=N always has N base ids."""
    save_head(head, "eagle", tmp_path / "ck")
    (tmp_path / "ck" / "draft_vocab.json").write_text(json.dumps([9, 5]))
    d = EAGLE2.drafter(target, SamplingConfig(), None,
                       **EAGLE2.params({"checkpoint": str(tmp_path / "ck"), "draft_vocab": "4"}))
    d.begin([7], target.prefill([]))
    assert d.vocab.ids.tolist() == [9, 5, 0, 1, 7]
