"""Method identity in one place: the catalogue, the Method objects that take their identity from it,
and everything that orders, spells or resolves methods (baselines, compare, Spec-Bench ids, suites)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from specbench.bench import baselines as B
from specbench.bench import compare as C
from specbench.bench import specbench_jsonl as SB
from specbench.methods import Identity, Method, available_methods, catalogue

PAPER_ONLY = {"medusa", "hydra"}


def test_registered_methods_take_their_identity_from_the_catalogue():
    methods = available_methods()
    assert {"vanilla", "pld", "lookahead", "eagle", "eagle2"} <= set(methods)
    for name, m in methods.items():
        assert m.identity is catalogue.identity(name), name
        assert m.order == catalogue.identity(name).order
    assert list(methods) == sorted(methods, key=catalogue.sort_key)  # registry in display order


def test_paper_only_methods_have_names_and_order():
    assert PAPER_ONLY <= catalogue.NAMES and not PAPER_ONLY & set(available_methods())
    assert B.METHODS == catalogue.NAMES  # the baselines validator accepts exactly the catalogue's names
    order = [m.name for m in catalogue.KNOWN]
    assert order.index("vanilla") == 0 and order.index("eagle") < order.index("eagle2") < order.index("hass")
    assert catalogue.sort_key("my-plugin") > catalogue.sort_key("tvdpp")  # unknown names after the known ones


def test_aliases_are_unambiguous_and_case_insensitive():
    spelled = [a for m in catalogue.KNOWN for a in (m.name, *m.aliases)]
    assert len(spelled) == len(set(spelled))
    assert catalogue.canonical("LADE") == "lookahead" and catalogue.canonical("eagle-2") == "eagle2"
    assert catalogue.canonical("baseline") == "vanilla" and catalogue.canonical("nope") is None
    # Spec-Bench model ids go through the same aliases, a hyphenated one included
    assert SB.parse_model_id("vicuna-7b-v1.3-eagle-2-float16-temperature-0.0")["method"] == "eagle2"
    assert SB.parse_model_id("vicuna-7b-v1.3-eagle-2-float16-temperature-0.0")["target"] == "vicuna-7b-v1.3"
    assert SB.parse_model_id("vicuna-7b-v1.3-baseline-float16")["method"] == "vanilla"


def test_checkpoints_live_on_the_method():
    import specbench.methods.head_drafters as E

    m = available_methods()
    assert m["eagle"].needs_checkpoint and m["eagle2"].needs_checkpoint
    assert not any(m[n].needs_checkpoint for n in ("vanilla", "pld", "lookahead"))
    assert m["eagle2"].identity.draft_of == "eagle"
    heads = {"eagle": "eagle-smollm2-135m", "eagle2": "eagle-smollm2-135m", "hass": "hass-smollm2-135m",
             "fspad": "fspad-smollm2-135m", "kld": "kld-smollm2-135m", "tvd": "tvd-smollm2-135m",
             "tvdpp": "tvdpp-smollm2-135m"}
    for name, want in heads.items():
        head = m[name].default_checkpoint("smollm2-135m")
        assert head == want == E.default_checkpoint_dir(name).name
        assert m[name].default_checkpoint("llama2-chat-7b") is None
        assert E.default_checkpoint_dir(name).is_dir()
    assert m["pld"].default_checkpoint("smollm2-135m") is None


def test_a_method_without_its_own_default_head_never_loads_another_methods(monkeypatch):
    import dataclasses

    from helpers import tiny_target

    import specbench.methods.head_drafters as E
    from specbench.models.draft_heads import CheckpointError

    # fspad as it was before its head was committed: EAGLE's and HASS's heads exist for the same target
    monkeypatch.setitem(catalogue._BY_NAME, "fspad",
                        dataclasses.replace(catalogue.identity("fspad"), default_checkpoint=None))
    target = tiny_target(name="smollm2-135m")  # named as the embedded target, whose committed heads are others'
    with pytest.raises(CheckpointError, match="method fspad needs a draft checkpoint .*no committed default head"):
        E.resolve_head("fspad", target, "")
    with pytest.raises(CheckpointError, match="method my-plugin needs a draft checkpoint .*no committed default"):
        E.resolve_head("my-plugin", target, "")  # a plugin the catalogue does not list: none either


def test_a_plugin_gets_an_identity_of_its_own():
    def drafter(target, sampling, generator):
        return None

    mine = Method("my-plugin", "a third-party drafter", drafter)
    assert mine.identity == Identity("my-plugin") and mine.order == len(catalogue.KNOWN)
    own = Method("my-plugin", "with aliases", drafter, identity=Identity("my-plugin", aliases=("mp",)))
    assert own.aliases == ("mp",)
    with pytest.raises(ValueError, match="identity of 'eagle'"):
        Method("my-plugin", "wrong record", drafter, identity=catalogue.identity("eagle"))


def test_compare_orders_columns_by_the_catalogue():
    labels = ["eagle2", "vanilla", "hass", "my-plugin", "pld#2", "lookahead"]
    assert sorted(labels, key=C.label_sort_key) == ["vanilla", "pld#2", "lookahead", "eagle2",
                                                    "hass", "my-plugin"]


def test_catalogue_and_compare_import_without_torch():
    code = ("import sys; import specbench.methods.catalogue, specbench.bench.compare, specbench.bench.baselines; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False", out.stderr


def test_draft_budgets_count_the_verified_tree_nodes():
    m = available_methods()

    def budget(name, **params):
        return m[name].draft_budget(m[name].params(params))

    assert budget("vanilla") == {"tree_nodes": 1}
    assert budget("pld") == {"tree_nodes": 11}  # 10 predicted tokens after the root
    assert budget("lookahead", level=3, window=3, guess=3) == {"tree_nodes": 7}  # 3 n-grams of 2 tokens + root
    assert budget("eagle") == {"tree_nodes": 26, "draft_vocab": 0}  # mc_sim_7b_63: 25 drafts + the root
    assert budget("eagle", tree="cpu_4", draft_vocab="4096") == {"tree_nodes": 4, "draft_vocab": 4096}
    assert budget("eagle2", total_tokens=8, draft_vocab=4096) == {"tree_nodes": 8, "draft_vocab": 4096}
    for name, method in m.items():
        assert method.at_defaults(method.defaults), name
    assert m["eagle"].at_defaults(dict(m["eagle"].defaults, checkpoint="/some/head"))  # the draft is no setting
    assert not m["eagle2"].at_defaults(dict(m["eagle2"].defaults, total_tokens=8))
    assert not m["eagle2"].at_defaults({"depth": 6})  # a partial record is not the papers' setting
