"""A decoder-only transformer (GPT-2 and Llama families) over a ragged batch.

Notation: T = new tokens in the batch (all sequences concatenated),
B = sequences, H = n_head, KV = n_kv_head, hd = head_dim, C = n_embd,
L = keys in a sequence's context.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.kv_cache import ForwardBatch, KVCache


class WeightsError(ValueError):
    """A state dict that does not fit the model: names the offending key."""


class Norm(nn.Module):
    """LayerNorm (gpt2) or RMSNorm (llama), computed like the reference."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.rms = config.rmsnorm
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(config.n_embd))

    def forward(self, x: Tensor) -> Tensor:
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotate-half RoPE (the Hugging Face Llama convention). x: (T, heads, hd).

    ``sin_signed`` is sin with its first half negated, so that rotate_half(x) * sin
    is x.roll(hd / 2) * sin_signed: three kernels instead of seven.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


@dataclass
class StepInputs:
    """What every layer needs and is the same for all of them: computed once per forward."""

    rope: tuple[Tensor, Tensor] | None  # (cos, sin_signed), each (T, 1, hd)
    decode_mask: Tensor | None  # (B, 1, 1, L): key j is inside sequence b's context


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        # q, k and v in one matmul: one kernel launch instead of three.
        self.qkv = nn.Linear(
            config.n_embd, self.q_size + 2 * self.kv_size, bias=bool(config.attn_bias)
        )
        self.proj = nn.Linear(self.q_size, config.n_embd, bias=bool(config.attn_bias))
        self.scale = 1.0 / math.sqrt(self.head_dim)

    # The type: ignores below: a batch has slot_mapping and block_tables exactly when a
    # KV cache is given (ForwardBatch.build), and the decode mask only then; the types
    # of ForwardBatch and StepInputs cannot say so.
    def forward(
        self,
        x: Tensor,
        batch: ForwardBatch,
        kv_cache: KVCache | None,
        layer: int,
        step: StepInputs,
    ) -> Tensor:
        t = x.shape[0]
        qkv = self.qkv(x)
        heads = self.n_head + self.n_kv_head
        qk = qkv[:, : self.q_size + self.kv_size].view(t, heads, self.head_dim)  # (T, H+KV, hd)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.n_kv_head, self.head_dim)
        if step.rope is not None:
            qk = apply_rope(qk, *step.rope)  # queries and keys rotated in one pass
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)  # (T, H, hd), (T, KV, hd)
        if kv_cache is not None:
            kv_cache.write(layer, k, v, batch.slot_mapping)  # type: ignore[arg-type]
        if step.decode_mask is not None:
            y = self._decode(q, batch, kv_cache, layer, step.decode_mask)  # type: ignore[arg-type]
        else:
            y = self._per_sequence(q, k, v, batch, kv_cache, layer)
        return self.proj(y.reshape(t, self.q_size))

    def _decode(
        self, q: Tensor, batch: ForwardBatch, kv_cache: KVCache, layer: int, mask: Tensor
    ) -> Tensor:
        """One new token per sequence: one batched call over the gathered blocks."""
        k, v = kv_cache.gather(layer, batch.block_tables)  # type: ignore[arg-type]  # (B, L, KV, hd)
        y = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # (B, H, 1, hd)
            k.transpose(1, 2),  # (B, KV, L, hd)
            v.transpose(1, 2),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.n_head != self.n_kv_head,
        )  # (B, H, 1, hd)
        return y.squeeze(2)

    def _per_sequence(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        batch: ForwardBatch,
        kv_cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        """Prefill chunks (and any mixed batch): one attention call per sequence."""
        out = torch.empty_like(q)
        row = 0
        for i, (qlen, start) in enumerate(zip(batch.query_lens, batch.start_pos, strict=True)):
            qi = q[row : row + qlen].transpose(0, 1).unsqueeze(0)  # (1, H, qlen, hd)
            mask = None
            if start == 0:
                # Nothing cached before this chunk: attend to the fresh keys, causally.
                ki, vi = k[row : row + qlen], v[row : row + qlen]
            elif kv_cache is None:
                raise ValueError("a sequence that starts past position 0 needs a KV cache")
            else:
                ctx = start + qlen
                kc, vc = kv_cache.gather(layer, batch.block_tables[i : i + 1])  # type: ignore[index]
                ki, vi = kc[0, :ctx], vc[0, :ctx]  # (ctx, KV, hd)
                qpos = torch.arange(start, ctx, device=q.device)
                mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]  # (qlen, ctx)
            yi = F.scaled_dot_product_attention(
                qi,
                ki.transpose(0, 1).unsqueeze(0),  # (1, KV, L, hd)
                vi.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.scale,
                enable_gqa=self.n_head != self.n_kv_head,
            )  # (1, H, qlen, hd)
            out[row : row + qlen] = yi[0].transpose(0, 1)
            row += qlen
        return out


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inner = config.intermediate_size
        self.gated = config.gated_mlp
        self.activation = config.activation
        # SwiGLU: gate and up projections fused into one matmul, gate first.
        self.fc = nn.Linear(
            config.n_embd, 2 * inner if self.gated else inner, bias=bool(config.mlp_bias)
        )
        self.proj = nn.Linear(inner, config.n_embd, bias=bool(config.mlp_bias))

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"
        return self.proj(F.gelu(h, approximate=approximate))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = Norm(config)
        self.attn = Attention(config)
        self.mlp_norm = Norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        batch: ForwardBatch,
        kv_cache: KVCache | None,
        layer: int,
        step: StepInputs,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), batch, kv_cache, layer, step)
        return x + self.mlp(self.mlp_norm(x))


def _embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding without random init: weights are always assigned after construction,
    and normal_() on the meta device pays lazy imports at start-up (docs/benchmarks.md)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class GPT(nn.Module):
    rope_cos: Tensor | None
    rope_sin: Tensor | None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = _embedding(config.vocab_size, config.n_embd)
        self.wpe = (
            _embedding(config.max_seq_len, config.n_embd) if config.learned_positions else None
        )
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = Norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.rope_cos = self.rope_sin = None

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_state_dict(
        cls,
        config: ModelConfig,
        state_dict: Mapping[str, Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> GPT:
        """Build on the meta device and assign the given tensors: no init, no copy twice.

        Every expected key must be present with its exact shape and no key may be
        left over; the error names the key. With tied embeddings ``lm_head.weight``
        may be omitted (it is ``wte.weight``).
        """
        with torch.device("meta"):
            model = cls(config)
        expected = dict(model.named_parameters())  # tied weights appear once, as wte.weight
        extra = sorted(set(state_dict) - set(expected) - {"lm_head.weight"})
        if extra:
            raise WeightsError(f"unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all)")
        for name, param in expected.items():
            if name not in state_dict:
                raise WeightsError(f"missing tensor {name!r}")
            tensor = state_dict[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise WeightsError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            owner, _, attr = name.rpartition(".")
            new = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
            setattr(model.get_submodule(owner), attr, new)
        if config.tie_embeddings:
            model.lm_head.weight = model.wte.weight
        elif "lm_head.weight" not in state_dict:
            raise WeightsError("missing tensor 'lm_head.weight' (embeddings are not tied)")
        model._init_rope(torch.device(device))
        return model.eval()

    @classmethod
    def random(
        cls,
        config: ModelConfig,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> GPT:
        """A randomly initialised model, for tests and benchmarks of the machinery."""
        gen = torch.Generator().manual_seed(seed)
        state = {}
        for name, shape in cls.param_shapes(config).items():
            if name.endswith("norm.weight"):
                state[name] = torch.ones(shape)
            elif name.endswith("bias"):
                state[name] = torch.randn(shape, generator=gen) * 0.02
            else:
                state[name] = torch.randn(shape, generator=gen) * 0.05
        return cls.from_state_dict(config, state, dtype=dtype, device=device)

    @classmethod
    def param_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes (a tied ``lm_head`` is ``wte`` and not listed)."""
        with torch.device("meta"):
            return {name: tuple(p.shape) for name, p in cls(config).named_parameters()}

    def _init_rope(self, device: torch.device) -> None:
        if self.config.learned_positions:
            return
        hd = self.config.head_dim
        inv_freq = 1.0 / (
            self.config.rope_theta
            ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd)
        )
        pos = torch.arange(self.config.max_seq_len, device=device).float()
        freqs = torch.outer(pos, inv_freq)  # (max_seq_len, hd / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, hd)
        dtype = self.wte.weight.dtype
        half = hd // 2
        sin = emb.sin()
        sin[:, :half] = -sin[:, :half]  # see apply_rope
        self.rope_cos = emb.cos().to(dtype)
        self.rope_sin = sin.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward ----------------------------------------------------------------------

    def _step_inputs(self, batch: ForwardBatch, kv_cache: KVCache | None) -> StepInputs:
        rope = None
        if self.rope_cos is not None and self.rope_sin is not None:
            rope = (
                self.rope_cos[batch.positions][:, None, :],  # (T, 1, hd)
                self.rope_sin[batch.positions][:, None, :],
            )
        mask = None
        if kv_cache is not None and batch.block_tables is not None and batch.is_decode:
            # Decode reads whole blocks; keys past a sequence's length are masked out.
            n_keys = batch.block_tables.shape[1] * kv_cache.block_size
            keys = torch.arange(n_keys, device=batch.context_lens.device)
            mask = (keys[None, :] < batch.context_lens[:, None])[:, None, None, :]  # (B, 1, 1, L)
        return StepInputs(rope, mask)

    def forward(
        self,
        batch: ForwardBatch,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits (N, vocab) for ``batch.logits_indices``, or with ``return_hidden``
        the final normalised hidden states of every new token (T, C).

        With a cache, keys and values of the new tokens are written to their slots
        and attention reads each sequence's context through its block table.
        Without one, every sequence must start at position 0.
        """
        end = max(s + q for s, q in zip(batch.start_pos, batch.query_lens, strict=True))
        if end > self.config.max_seq_len:
            raise ValueError(
                f"position {end - 1} is past the context of {self.config.max_seq_len} tokens"
            )
        x = self.wte(batch.input_ids)  # (T, C)
        if self.wpe is not None:
            x = x + self.wpe(batch.positions)
        step = self._step_inputs(batch, kv_cache)
        for i, block in enumerate(self.layers):
            x = block(x, batch, kv_cache, i, step)
        x = self.norm(x)
        if return_hidden:
            return x
        # Only the positions asked for go through the (large) vocabulary projection.
        return self.lm_head(x[batch.logits_indices])  # (N, vocab)
