"""Hugging Face checkpoint loading: logits parity with transformers, and every bad file refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ConfigError
from model.kv_cache import ForwardBatch
from model.loading import LoadedModel, ModelFileError, load_hf_dir, load_model

IDS = [3, 17, 42, 8, 96, 0, 55, 23, 23, 71, 5, 64, 30, 88, 12, 1, 9, 77, 40, 2]
TOL: dict[str, Any] = dict(rtol=1e-4, atol=1e-4)


def all_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    batch = ForwardBatch.build([ids], logits_rows=[list(range(len(ids)))])
    with torch.no_grad():
        return model(batch)


CASES = [
    ("gpt2", dict(tied=True)),
    ("gpt2", dict(tied=False)),
    ("llama", dict(n_kv_head=1)),
    ("llama", dict(n_kv_head=2, tied=True)),
    ("llama", dict(n_kv_head=4)),
    ("llama", dict(n_kv_head=2, bias=True)),
]


@pytest.mark.parametrize(("arch", "settings"), CASES, ids=lambda c: str(c))
def test_logits_match_transformers(hf_checkpoint, arch, settings):
    ckpt = hf_checkpoint(arch, **settings)
    loaded = load_model(str(ckpt.path))
    assert isinstance(loaded, LoadedModel)
    assert loaded.config.arch == arch
    assert loaded.config.tie_embeddings == settings.get("tied", arch == "gpt2")
    assert loaded.model.dtype == torch.float32
    torch.testing.assert_close(all_logits(loaded.model, IDS), ckpt.logits(IDS), **TOL)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sharded_checkpoint_loads_the_same(hf_checkpoint, arch):
    ckpt = hf_checkpoint(arch, shard=True, n_kv_head=2 if arch == "llama" else None)
    shards = list(ckpt.path.glob("*.safetensors"))
    assert len(shards) > 2 and (ckpt.path / "model.safetensors.index.json").exists()
    model, _ = load_hf_dir(ckpt.path)
    torch.testing.assert_close(all_logits(model, IDS), ckpt.logits(IDS), **TOL)


def test_bfloat16_load(hf_checkpoint):
    ckpt = hf_checkpoint("llama", n_kv_head=2)
    loaded = load_model(str(ckpt.path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    logits = all_logits(loaded.model, IDS).float()
    torch.testing.assert_close(logits, ckpt.logits(IDS), rtol=0.05, atol=0.15)


# -- variants of the file layout ------------------------------------------------------


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a single-file checkpoint, passing its tensors through ``edit(dict)``."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    save_file(edit(dict(tensors)), dst / "model.safetensors")
    return dst


def test_gpt2_names_without_prefix_and_old_buffers(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("gpt2", tied=True)

    def strip(t):
        out = {k.removeprefix("transformer."): v for k, v in t.items()}
        out["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))  # old exports' causal mask
        out["h.1.attn.masked_bias"] = torch.tensor(-1e4)
        return out

    model, _ = load_hf_dir(rewrite(ckpt.path, tmp_path / "ckpt", strip))
    torch.testing.assert_close(all_logits(model, IDS), ckpt.logits(IDS), **TOL)


def test_tied_head_stored_anyway_is_accepted(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("llama", n_kv_head=2, tied=True)

    def add_head(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        return t

    model, _ = load_hf_dir(rewrite(ckpt.path, tmp_path / "ckpt", add_head))
    torch.testing.assert_close(all_logits(model, IDS), ckpt.logits(IDS), **TOL)


# -- malformed checkpoints ------------------------------------------------------------

Q = "model.layers.1.self_attn.q_proj.weight"


def drop(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


def add(name):
    return lambda t: {**t, name: torch.zeros(3)}


def reshape(name):
    return lambda t: {**t, name: t[name][:-1].clone()}


@pytest.mark.parametrize(
    ("edit", "key", "words"),
    [
        (drop(Q), Q, "missing"),
        (drop("lm_head.weight"), "lm_head.weight", "missing"),
        (
            add("model.layers.0.self_attn.extra.weight"),
            "model.layers.0.self_attn.extra.weight",
            "unexpected",
        ),
        (reshape(Q), Q, "shape"),
        (reshape("model.norm.weight"), "model.norm.weight", "shape"),
    ],
    ids=["missing", "missing-head", "extra", "wrong-shape", "wrong-shape-1d"],
)
def test_bad_tensors_are_named(hf_checkpoint, tmp_path, edit, key, words):
    ckpt = hf_checkpoint("llama", n_kv_head=2)
    path = rewrite(ckpt.path, tmp_path / "ckpt", edit)
    with pytest.raises(ModelFileError, match=words) as err:
        load_hf_dir(path)
    assert err.value.key == key
    assert key in str(err.value)


def test_gpt2_conv1d_shape_is_checked_transposed(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("gpt2", tied=True)
    name = "transformer.h.0.attn.c_attn.weight"
    path = rewrite(ckpt.path, tmp_path / "ckpt", lambda t: {**t, name: t[name].t().contiguous()})
    with pytest.raises(ModelFileError, match="shape") as err:
        load_hf_dir(path)
    assert err.value.key == name


def test_pickle_only_directory_is_refused_unread(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("llama", n_kv_head=2)
    (tmp_path / "config.json").write_text((ckpt.path / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ModelFileError, match="safetensors"):
        load_hf_dir(tmp_path)


def test_missing_shard_is_named(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("llama", shard=True, n_kv_head=2)
    path = tmp_path / "ckpt"
    shutil.copytree(ckpt.path, path)
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelFileError, match="missing") as err:
        load_hf_dir(path)
    assert err.value.key == victim.name


def test_corrupt_safetensors_file(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("llama", n_kv_head=2)
    shutil.copy(ckpt.path / "config.json", tmp_path / "config.json")
    data = (ckpt.path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError) as err:
        load_hf_dir(tmp_path)
    assert err.value.path.name == "model.safetensors"


def edit_config(ckpt, tmp_path, **changes) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(ckpt.path, path)
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_config_missing_key(hf_checkpoint, tmp_path):
    path = edit_config(hf_checkpoint("llama", n_kv_head=2), tmp_path, hidden_size=None)
    with pytest.raises(ModelFileError) as err:
        load_hf_dir(path)
    assert err.value.key == "hidden_size"


@pytest.mark.parametrize(
    "changes",
    [
        dict(num_key_value_heads=3),
        dict(model_type="mamba"),
        dict(hidden_act="relu"),
        dict(num_hidden_layers=0),
    ],
    ids=["kv-heads", "model-type", "activation", "layers"],
)
def test_bad_config_is_a_config_error(hf_checkpoint, tmp_path, changes):
    path = edit_config(hf_checkpoint("llama", n_kv_head=2), tmp_path, **changes)
    with pytest.raises(ConfigError) as err:
        load_hf_dir(path)
    assert isinstance(err.value, ModelFileError)  # and it names the file
    assert "config.json" in str(err.value)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(ModelFileError, match="config.json"):
        load_hf_dir(tmp_path)
