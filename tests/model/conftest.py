"""Tiny random Hugging Face models, saved as safetensors checkpoints, for parity tests.

Built once per session and cached by their settings: building and saving is
the slow part of these tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

VOCAB = 97
CONTEXT = 64


@dataclass
class HFCheckpoint:
    path: Path
    hf: Any  # the reference transformers model, in eval mode, float32

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Reference logits (T, vocab) of one sequence."""
        with torch.no_grad():
            return self.hf(torch.tensor([ids])).logits[0]


def build_hf(
    arch: str,
    n_head: int = 4,
    n_kv_head: int | None = None,
    tied: bool = False,
    bias: bool = False,
    n_layer: int = 2,
    n_embd: int = 32,
    seed: int = 0,
) -> PreTrainedModel:
    """A tiny HF model with every weight random (norms and biases too), so that a
    swapped, untransposed or missing tensor changes the logits."""
    torch.manual_seed(seed)
    common: dict[str, Any] = dict(attn_implementation="eager", bos_token_id=1, eos_token_id=2)
    model: Any
    cfg: Any
    if arch == "gpt2":
        cfg = GPT2Config(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            vocab_size=VOCAB,
            n_positions=CONTEXT,
            tie_word_embeddings=tied,
            **common,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            hidden_size=n_embd,
            intermediate_size=3 * n_embd,
            num_attention_heads=n_head,
            num_key_value_heads=n_kv_head or n_head,
            num_hidden_layers=n_layer,
            vocab_size=VOCAB,
            max_position_embeddings=CONTEXT,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
            rms_norm_eps=1e-5,
            tie_word_embeddings=tied,
            attention_bias=bias,
            mlp_bias=bias,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., HFCheckpoint]:
    """``hf_checkpoint(arch, **settings, shard=False)``: a saved tiny checkpoint and its HF model."""
    cache: dict[tuple, HFCheckpoint] = {}

    def make(arch: str, shard: bool = False, **settings: Any) -> HFCheckpoint:
        key = (arch, shard, tuple(sorted(settings.items())))
        if key not in cache:
            hf = build_hf(arch, **settings)
            path = tmp_path_factory.mktemp(f"hf-{arch}")
            hf.save_pretrained(path, max_shard_size="20KB" if shard else "1GB")
            cache[key] = HFCheckpoint(path, hf)
        return cache[key]

    return make
