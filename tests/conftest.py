"""Shared fixtures: the converted SmolLM2 directory and tiny random-weight Llama directories.

torch and transformers are imported lazily inside fixtures, so collecting the suite does not load
them (some tests check that `scheduler` stays torch-free).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

TINY_LLAMA_DEFAULTS = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF converted to an HF dir, in the default cache
    (`$TANDEM_CACHE_DIR` or ~/.cache/tandem/models), so later runs reuse it instantly."""
    from engine.weights import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory,
                    smollm2_dir: Path) -> Callable[..., Path]:
    """Factory: `make_tiny_model(**config_overrides) -> Path` of a tiny random HF Llama directory
    (seed 0) with SmolLM2's tokenizer files. Cached per session per set of overrides."""
    cache: dict[tuple, Path] = {}

    def make(**overrides) -> Path:
        key = tuple(sorted((k, repr(v)) for k, v in overrides.items()))
        if key in cache:
            return cache[key]
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.set_num_threads(1)
        cfg = LlamaConfig(**{**TINY_LLAMA_DEFAULTS, **overrides})
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        path = tmp_path_factory.mktemp("tiny_llama")
        model.save_pretrained(path, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2_dir / name, path / name)
        cache[key] = path
        return path

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(make_tiny_model: Callable[..., Path]) -> Path:
    """A tiny random Llama (2 layers, hidden 64, 4 heads, 2 KV heads) with SmolLM2's tokenizer."""
    return make_tiny_model()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`cuda` tests run only where torch sees a CUDA device (and FlashInfer where they use it)."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in cuda_items:
        item.add_marker(skip)
