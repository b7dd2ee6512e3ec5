"""A target spread over devices by accelerate (`--device-map auto`), the path a target larger than one GPU
takes. There is one device here, so the tiny target is spread over what there is: decoder layers
offloaded to disk (accelerate's hooks load them layer by layer, as they move activations between GPUs),
by an explicit map and by `max_memory`. Decoding must give the undispersed target's tokens, for vanilla,
a chain method and a head method (whose head goes with the LM head); an offloaded embedding is refused."""

from __future__ import annotations

import pytest
from test_lossless_e2e import checkpoint_params

from specbench.bench.runner import parse_max_memory
from specbench.decoding import SamplingConfig, generate
from specbench.errors import UsageError
from specbench.methods import DrafterBase, get_method
from specbench.models.loading import dispatch, tiny_llama
from specbench.models.registry import ModelError
from specbench.models.target import Target

pytestmark = pytest.mark.usefixtures("single_thread")

SIZES = dict(seed=7, num_layers=4, hidden_size=32, intermediate_size=64)
PROMPTS = ([1, 2, 3], [9, 8, 7, 6, 5], [4, 4, 4, 4])


def _tokens(target, method, params):
    m = get_method(method)
    out = []
    for p in PROMPTS:
        d = DrafterBase() if method == "vanilla" else m.drafter(target, SamplingConfig(), None, **m.params(params))
        out.append(generate(target, d, p, 20, SamplingConfig(), None, stop_ids=set()).tokens)
    return out


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """tied -> method parameters pointing at a head made for that tiny target (made on first use)."""
    made = {}

    def for_target(tied: bool):
        if tied not in made:
            made[tied] = checkpoint_params(Target(tiny_llama(**SIZES, tie_word_embeddings=tied).model, name="tiny"),
                                           tmp_path_factory)
        return made[tied]

    return for_target


@pytest.mark.parametrize("placement", ["explicit map", "max_memory"])
@pytest.mark.parametrize("method", ["vanilla", "pld", "eagle2"])
def test_a_target_spread_over_devices_decodes_as_the_whole_one(tmp_path, heads, placement, method):
    tied = placement == "max_memory"  # a tied LM head stays with the embedding, on a real device
    whole = Target(tiny_llama(**SIZES, tie_word_embeddings=tied).model, name="tiny")
    model = tiny_llama(**SIZES, tie_word_embeddings=tied).model
    if placement == "explicit map":
        dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
        model = dispatch(model, dm, offload_dir=str(tmp_path))
    else:  # room on "cpu" for the embedding and one layer: accelerate sends the rest to disk
        model = dispatch(model, "auto", max_memory={"cpu": 60_000}, offload_dir=str(tmp_path))
    assert "disk" in set(model.hf_device_map.values()) and "cpu" in set(model.hf_device_map.values())
    spread = Target(model, name="tiny", runtime="auto")
    assert spread.runtime_name == "hf"  # the fast runtime copies weights: not for a dispatched model
    params = heads(tied)(method)
    assert _tokens(spread, method, params) == _tokens(whole, method, params)


def test_an_offloaded_embedding_is_refused(tmp_path):
    dm = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers": "cpu", "model.norm": "cpu",
          "lm_head": "cpu"}
    model = dispatch(tiny_llama(**SIZES).model, dm, offload_dir=str(tmp_path))
    with pytest.raises(ModelError, match="embedding is offloaded"):
        Target(model)


def test_max_memory_is_parsed_or_refused():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    assert parse_max_memory(None) is None
    with pytest.raises(UsageError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")
