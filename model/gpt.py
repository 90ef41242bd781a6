"""A decoder-only transformer (GPT-2, Llama and the families in ``model.config``) over
a ragged batch.

Notation: T = new tokens in the batch (all sequences concatenated),
B = sequences, H = n_head, KV = n_kv_head, hd = head_dim, C = n_embd,
L = keys in a sequence's context.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig, RopeScaling
from model.kernels import (
    MAX_GROUP,
    MAX_HEAD_DIM,
    DecodePlan,
    DecodeTensors,
    Kernels,
    QLayerC,
    qweight_struct,
    supports_attention,
    supports_cache,
)
from model.kernels import load as load_kernels
from model.kv_cache import ForwardBatch, KVCache
from model.quant import Kind, QuantEmbedding, QuantizedWeight, QuantLinear, quantize

# RoPE positions tabled when a model is built; more are added when a longer
# sequence (or the engine's context) needs them, never from the claimed context.
ROPE_POSITIONS_AT_LOAD = 4096


class WeightsError(ValueError):
    """A state dict that does not fit the model: names the offending key."""


class Norm(nn.Module):
    """LayerNorm (gpt2) or RMSNorm (the others), computed like the reference.

    Gemma's ``(1 + w)`` RMSNorm is this one with the 1 folded into ``weight`` at load.
    """

    def __init__(self, config: ModelConfig, dim: int = 0) -> None:
        super().__init__()
        dim = dim or config.n_embd
        self.rms = config.rmsnorm
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(dim))

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
class DecodeInputs:
    """Addressing of the batched decode path: its rows' block tables and context lengths."""

    tables: Tensor  # (n_decode, W) block tables, trimmed to the decodes' own contexts
    context_lens: Tensor  # (n_decode,)
    mask: Tensor | None  # (n_decode, 1, 1, W * block_size) key j inside the context; None: kernel


@dataclass
class WindowInputs:
    """Addressing of the decodes on sliding-window layers: only the blocks that hold a
    key inside the window are read (the others are skipped)."""

    tables: Tensor  # (n_decode, Wb) the window's blocks of each row
    mask: Tensor  # (n_decode, 1, 1, Wb * block_size) key inside the window and the context


@dataclass
class StepInputs:
    """What every layer needs and is the same for all of them: computed once per forward.

    A batch is split in two: its leading single-token sequences (decodes; the
    scheduler puts them first) go through one batched attention call over their
    blocks, the rest (prefill chunks) through one call each.
    """

    rope: tuple[Tensor, Tensor] | None  # (cos, sin_signed), each (T, 1, hd); None when fused
    fused: Kernels | None  # the CPU kernels, when they run the whole block (Llama, float32)
    rope_tables: tuple[Tensor, Tensor] | None  # (cos, sin_signed) by position, when fused
    n_decode: int  # leading sequences (= rows) that take the batched decode path
    decode: DecodeInputs | None  # set when n_decode > 0
    rope_local: tuple[Tensor, Tensor] | None = None  # (cos, sin_signed) of sliding layers
    window: WindowInputs | None = None  # decodes on sliding layers, when the model has them


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        # q, k and v in one matmul: one kernel launch instead of three.
        self.qkv = nn.Linear(
            config.n_embd, self.q_size + 2 * self.kv_size, bias=bool(config.attn_bias)
        )
        self.proj = nn.Linear(self.q_size, config.n_embd, bias=bool(config.attn_out_bias))
        self.scale = config.attn_scale
        self.window = config.layer_window(layer)  # 0: the whole context
        # Sliding layers with their own RoPE base take the step's local tables.
        self.local_rope = config.layer_rope_theta(layer) != config.rope_theta or (
            not config.layer_rope_scaled(layer) and config.rope_scaling is not None
        )
        self.q_norm = Norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = Norm(config, config.head_dim) if config.qk_norm else None

    def forward(
        self,
        x: Tensor,
        batch: ForwardBatch,
        kv_cache: KVCache | None,
        layer: int,
        step: StepInputs,
        residual: Tensor | None = None,
    ) -> Tensor:
        """Attention output, or with ``residual`` that tensor with the output added in place."""
        t = x.shape[0]
        qkv = self.qkv(x)  # (T, (H + 2 KV) hd)
        if step.fused is not None:
            q, k, v = self._rope_store_fused(step.fused, qkv, batch, kv_cache, layer, step)
        else:
            q, k, v = self._rope_store(qkv, batch, kv_cache, layer, step)
        d = step.n_decode
        if step.decode is None or kv_cache is None:
            y = self._per_sequence(q, k, v, batch, kv_cache, layer, 0)
        elif d == t:
            y = self._decode(q, kv_cache, layer, step)
        else:
            y = torch.cat(
                (
                    self._decode(q[:d], kv_cache, layer, step),
                    self._per_sequence(q[d:], k[d:], v[d:], batch, kv_cache, layer, d),
                )
            )
        return _linear(self.proj, y.reshape(t, self.q_size), residual)

    def _rope_store(
        self,
        qkv: Tensor,
        batch: ForwardBatch,
        kv_cache: KVCache | None,
        layer: int,
        step: StepInputs,
    ) -> tuple[Tensor, Tensor, Tensor]:
        t = qkv.shape[0]
        heads = self.n_head + self.n_kv_head
        qk = qkv[:, : self.q_size + self.kv_size].view(t, heads, self.head_dim)  # (T, H+KV, hd)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.n_kv_head, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # per head, before RoPE
            q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        rope = step.rope_local if self.local_rope else step.rope
        if rope is not None:
            qk = apply_rope(qk, *rope)  # queries and keys rotated in one pass
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)  # (T, H, hd), (T, KV, hd)
        if kv_cache is not None:
            kv_cache.write(layer, k, v, batch.cache_addressing()[0])
        return q, k, v

    def _rope_store_fused(
        self,
        kernels: Kernels,
        qkv: Tensor,
        batch: ForwardBatch,
        kv_cache: KVCache | None,
        layer: int,
        step: StepInputs,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The same in one kernel call: rotate q and k in place, store k and v."""
        t = qkv.shape[0]
        if kv_cache is None:
            kernels.rope_store(qkv, self.n_head, self.n_kv_head, self.head_dim,
                               batch.positions, step.rope_tables, None)  # fmt: skip
        else:
            cache = (batch.cache_addressing()[0], kv_cache.k[layer], kv_cache.v[layer])
            kernels.rope_store(qkv, self.n_head, self.n_kv_head, self.head_dim,
                               batch.positions, step.rope_tables, cache)  # fmt: skip
        q = qkv[:, : self.q_size].view(t, self.n_head, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(t, self.n_kv_head, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.n_kv_head, self.head_dim)
        return q, k, v

    def _decode(self, q: Tensor, kv_cache: KVCache, layer: int, step: StepInputs) -> Tensor:
        """One new token per sequence: one batched call over the gathered blocks
        (on the CPU, a kernel that reads the blocks in place). Sliding-window
        layers read only the blocks of their window."""
        dec = step.decode
        if dec is None:
            raise ValueError("the decode path needs its inputs")
        if self.window:
            if step.window is None:
                raise ValueError("a sliding-window layer needs the step's window inputs")
            tables, mask = step.window.tables, step.window.mask
        else:
            kernels = load_kernels()
            if kernels is not None and supports_attention(q, kv_cache.k):
                return kernels.decode_attention(
                    q, kv_cache.k[layer], kv_cache.v[layer], dec.tables, dec.context_lens,
                    self.scale,
                )  # fmt: skip
            if dec.mask is None:
                raise ValueError("the decode path needs a key mask without the attention kernel")
            tables, mask = dec.tables, dec.mask
        k, v = kv_cache.gather(layer, tables)  # (B, L, KV, hd)
        y = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # (B, H, 1, hd)
            k.to(q.dtype).transpose(1, 2),  # (B, KV, L, hd)
            v.to(q.dtype).transpose(1, 2),
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
        first: int,
    ) -> Tensor:
        """Prefill chunks of sequences ``first``.. (rows from 0 in q, k, v): one call each."""
        out = torch.empty_like(q)
        row = 0
        for i in range(first, len(batch.query_lens)):
            qlen, start = batch.query_lens[i], batch.start_pos[i]
            qi = q[row : row + qlen].transpose(0, 1).unsqueeze(0)  # (1, H, qlen, hd)
            mask = None
            ctx = start + qlen
            if start == 0:
                # Nothing cached before this chunk: attend to the fresh keys, causally.
                ki, vi = k[row : row + qlen], v[row : row + qlen]
            elif kv_cache is None:
                raise ValueError("a sequence that starts past position 0 needs a KV cache")
            else:
                kc, vc = kv_cache.gather(layer, batch.cache_addressing()[1][i : i + 1])
                ki, vi = kc[0, :ctx].to(q.dtype), vc[0, :ctx].to(q.dtype)  # (ctx, KV, hd)
            if start > 0 or (self.window and ctx > self.window):
                qpos = torch.arange(start, ctx, device=q.device)[:, None]
                kpos = torch.arange(ctx - ki.shape[0], ctx, device=q.device)[None, :]
                mask = kpos <= qpos  # (qlen, keys)
                if self.window:
                    mask &= kpos > qpos - self.window
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
    """GELU MLP (gpt2), or gated: SwiGLU (silu) or GeGLU (Gemma's tanh GELU)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inner = config.intermediate_size
        self.gated = config.gated_mlp
        self.activation = config.activation
        # Gate and up projections fused into one matmul, gate first.
        self.fc = nn.Linear(
            config.n_embd, 2 * inner if self.gated else inner, bias=bool(config.mlp_bias)
        )
        self.proj = nn.Linear(inner, config.n_embd, bias=bool(config.mlp_bias))

    def forward(
        self, x: Tensor, residual: Tensor | None = None, fused: Kernels | None = None
    ) -> Tensor:
        """MLP output, or with ``residual`` that tensor with the output added in place."""
        h = self.fc(x)
        if self.gated:
            if fused is not None and self.activation == "silu":
                a = fused.silu_mul(h)
            else:
                gate, up = h.chunk(2, dim=-1)
                a = (F.silu(gate) if self.activation == "silu" else self._gelu(gate)) * up
        else:
            a = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return _linear(self.proj, a, residual)

    def _gelu(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh" if self.activation == "gelu_tanh" else "none")


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.attn_norm = Norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = Norm(config)
        self.mlp = MLP(config)
        # Gemma 3: the outputs of attention and MLP normalised before the residual add.
        self.post_attn_norm = Norm(config) if config.sandwich_norms else None
        self.post_mlp_norm = Norm(config) if config.sandwich_norms else None

    def forward(
        self,
        x: Tensor,
        batch: ForwardBatch,
        kv_cache: KVCache | None,
        layer: int,
        step: StepInputs,
    ) -> Tensor:
        if step.fused is not None:  # a few kernel calls; residual adds fused into matmuls
            k = step.fused
            h = k.rms_norm(x, self.attn_norm.weight, self.attn_norm.eps)
            x = self.attn(h, batch, kv_cache, layer, step, residual=x)
            h = k.rms_norm(x, self.mlp_norm.weight, self.mlp_norm.eps)
            return self.mlp(h, residual=x, fused=k)
        if self.post_attn_norm is not None and self.post_mlp_norm is not None:
            x = x + self.post_attn_norm(self.attn(self.attn_norm(x), batch, kv_cache, layer, step))
            return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        x = x + self.attn(self.attn_norm(x), batch, kv_cache, layer, step)
        return x + self.mlp(self.mlp_norm(x))


def _linear(layer: nn.Module, x: Tensor, residual: Tensor | None) -> Tensor:
    """``layer(x)``, or ``residual`` with it added in place (fused into quantized matmuls)."""
    if residual is None:
        out: Tensor = layer(x)
        return out
    if isinstance(layer, QuantLinear):
        return layer(x, residual)
    return residual.add_(layer(x))


def _embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding without random init: weights are always assigned after construction,
    and normal_() on the meta device pays lazy imports at start-up (docs/benchmarks.md)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class GPT(nn.Module):
    rope_cos: Tensor | None
    rope_sin: Tensor | None
    rope_local: tuple[Tensor, Tensor] | None  # (cos, sin_signed) of sliding layers' own base
    wte: nn.Embedding | QuantEmbedding
    lm_head: nn.Linear | QuantLinear

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = _embedding(config.vocab_size, config.n_embd)
        self.wpe = (
            _embedding(config.max_seq_len, config.n_embd) if config.learned_positions else None
        )
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = Norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.rope_cos = self.rope_sin = None
        self.rope_local = None
        self._plan: DecodePlan | Literal[False] | None = None  # see _decode_plan

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_state_dict(
        cls,
        config: ModelConfig,
        state_dict: Mapping[str, Tensor | QuantizedWeight],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quantize_to: Kind | None = None,
    ) -> GPT:
        """Build on the meta device and assign the given tensors: no init, no copy twice.

        Every expected key must be present with its exact shape and no key may be
        left over; the error names the key. With tied embeddings ``lm_head.weight``
        may be omitted (it is ``wte.weight``). A ``QuantizedWeight`` for a linear
        layer (or the embeddings) keeps that layer quantized (``QuantLinear``);
        ``quantize_to`` quantizes the float weights of the linear layers too (the
        embeddings and output layer to ``q8`` whatever the kind).
        """
        with torch.device("meta"):
            model = cls(config)
        expected = dict(model.named_parameters())  # tied weights appear once, as wte.weight
        extra = sorted(set(state_dict) - set(expected) - {"lm_head.weight"})
        if extra:
            raise WeightsError(f"unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all)")
        if not config.tie_embeddings and "lm_head.weight" not in state_dict:
            raise WeightsError("missing tensor 'lm_head.weight' (embeddings are not tied)")
        for name, param in expected.items():
            if name not in state_dict:
                raise WeightsError(f"missing tensor {name!r}")
            value = state_dict[name]
            if tuple(value.shape) != tuple(param.shape):
                raise WeightsError(
                    f"tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}"
                )
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            quantizable = attr == "weight" and (isinstance(module, nn.Linear) or owner == "wte")
            if quantizable:
                value = _maybe_quantize(value, quantize_to, name, owner == "wte")
            elif isinstance(value, QuantizedWeight):
                value = value.dequantize()  # e.g. GPT-2's position table: kept float
            if isinstance(value, QuantizedWeight):
                model._install_quantized(owner, value.to(device))
                continue
            new = nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)
            setattr(module, attr, new)
        if config.tie_embeddings:
            if isinstance(model.wte, QuantEmbedding):
                model.lm_head = model.wte.as_linear()
            else:
                model.lm_head.weight = model.wte.weight
        model._init_rope(torch.device(device))
        return model.eval()

    def _install_quantized(self, owner: str, weight: QuantizedWeight) -> None:
        """Put a quantized layer where ``owner`` (a Linear or the embedding) was."""
        if owner == "wte":
            self.wte = QuantEmbedding(weight)
            return
        parent, _, attr = owner.rpartition(".")
        module = self.get_submodule(owner)
        bias = getattr(module, "bias", None)
        # A bias already assigned (it precedes nothing: weights come first) is kept.
        layer = QuantLinear(weight, None if bias is None or bias.is_meta else bias)
        setattr(self.get_submodule(parent) if parent else self, attr, layer)

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
        self.reserve_positions(min(self.config.max_seq_len, ROPE_POSITIONS_AT_LOAD), device)

    def reserve_positions(self, n: int, device: torch.device | None = None) -> None:
        """Size the RoPE tables for positions [0, n) (at most the model's context).

        The tables follow the context in use, not the one the file claims: a file
        may claim millions of positions, and tables for them would take gigabytes.
        The engine reserves its context once, before serving (and before any CUDA
        graph captures the tables); ``forward`` grows them for longer sequences.
        """
        config = self.config
        if config.learned_positions:
            return
        n = min(n, config.max_seq_len)
        if self.rope_cos is not None and self.rope_cos.shape[0] >= n:
            return
        device = self.device if device is None else device
        self.rope_cos, self.rope_sin = self._rope_tables(config.rope_theta, True, device, n)
        local = [i for i in range(config.n_layer) if cast(Block, self.layers[i]).attn.local_rope]
        if local:
            i = local[0]
            self.rope_local = self._rope_tables(
                config.layer_rope_theta(i), config.layer_rope_scaled(i), device, n
            )

    def _rope_tables(
        self, theta: float, scaled: bool, device: torch.device, n: int
    ) -> tuple[Tensor, Tensor]:
        """(cos, sin_signed), each (n, hd), for base ``theta``."""
        config = self.config
        inv_freq, attention_factor = rope_inv_freq(
            config.head_dim, theta, config.rope_scaling if scaled else None, device
        )
        pos = torch.arange(n, device=device).float()
        freqs = torch.outer(pos, inv_freq)  # (n, hd / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, hd)
        half = config.head_dim // 2
        sin = emb.sin() * attention_factor
        sin[:, :half] = -sin[:, :half]  # see apply_rope
        return (emb.cos() * attention_factor).to(self.dtype), sin.to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (quantized layers compute in it too)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def num_params(self) -> int:
        quantized = {id(m.qs): m.in_features * m.out_features for m in self.quantized_layers()}
        return sum(p.numel() for p in self.parameters()) + sum(quantized.values())

    def quantized_layers(self) -> list[QuantLinear]:
        layers = [m for m in self.modules() if isinstance(m, QuantLinear)]
        if isinstance(self.wte, QuantEmbedding):
            layers.append(self.wte.as_linear())
        return layers

    # -- forward ----------------------------------------------------------------------

    def step_inputs(self, batch: ForwardBatch, kv_cache: KVCache | None) -> StepInputs:
        fused = self._fused_kernels(kv_cache)
        rope = rope_tables = rope_local = None
        if self.rope_cos is not None and self.rope_sin is not None:
            if fused is not None:
                rope_tables = (self.rope_cos, self.rope_sin)
            else:
                rope = (
                    self.rope_cos[batch.positions][:, None, :],  # (T, 1, hd)
                    self.rope_sin[batch.positions][:, None, :],
                )
        if self.rope_local is not None:
            cos, sin = self.rope_local
            rope_local = (cos[batch.positions][:, None, :], sin[batch.positions][:, None, :])
        n_decode = batch.num_leading_decodes
        if kv_cache is None or n_decode == 0:
            return StepInputs(rope, fused, rope_tables, 0, None, rope_local)
        tables = batch.cache_addressing()[1]
        if n_decode < len(batch.query_lens):
            # Mixed step: the decodes read only as many blocks as their longest context.
            bs = kv_cache.block_size
            width = max(-(-(s + 1) // bs) for s in batch.start_pos[:n_decode])
            tables = tables[:n_decode, :width].contiguous()
        # Decode reads whole blocks; keys past a sequence's length are masked out.
        ctx = batch.context_lens[:n_decode]
        mask = None
        if fused is None:
            keys = torch.arange(tables.shape[1] * kv_cache.block_size, device=tables.device)
            mask = (keys[None, :] < ctx[:, None])[:, None, None, :]  # (B, 1, 1, L)
        window = None
        if self.config.sliding_window:
            window = _window_inputs(tables, ctx, kv_cache.block_size, self.config.sliding_window)
        decode = DecodeInputs(tables, ctx, mask)
        return StepInputs(rope, fused, rope_tables, n_decode, decode, rope_local, window)

    def _decode_plan(self) -> DecodePlan | None:
        """The blocks' weights for the C decode step, when every linear layer of every
        block is quantized and bias-free (built once; None otherwise)."""
        if self._plan is False:
            return None
        if self._plan is None:
            self._plan = build_decode_plan(self) or False
        return self._plan or None

    def uses_cpu_kernels(self) -> bool:
        """Whether the CPU kernels run this model's blocks (else PyTorch does)."""
        return self._fused_kernels(None) is not None

    def _fused_kernels(self, kv_cache: KVCache | None) -> Kernels | None:
        """The CPU kernels when they can run every block of this model (the Llama block,
        with q/k/v biases allowed; float32 activations, a cache they read); None
        otherwise: PyTorch runs the blocks (every family, sliding windows included)."""
        config = self.config
        if (
            self.device.type != "cpu"
            or self.dtype != torch.float32
            or not llama_block(config)
            or config.head_dim > MAX_HEAD_DIM
            or config.n_head // config.n_kv_head > MAX_GROUP
            or (kv_cache is not None and not supports_cache(kv_cache.k))
        ):
            return None
        return load_kernels()

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
        if self.rope_cos is not None and end > self.rope_cos.shape[0]:
            self.reserve_positions(max(end, 2 * self.rope_cos.shape[0]))
        step = self.step_inputs(batch, kv_cache)
        plan = self._decode_plan() if step.fused is not None else None
        if (
            plan is not None
            and plan.embed is not None
            and plan.final_norm is not None
            and step.fused is not None
            and kv_cache is not None
            and step.decode is not None
            and step.rope_tables is not None
            and step.n_decode == batch.input_ids.shape[0]
            and plan.head is not None
            and not return_hidden
            and batch.logits_indices.shape[0] == step.n_decode
        ):
            # A pure decode step on the CPU, each row giving logits: embedding, blocks,
            # final norm and output layer in one kernel call.
            tensors = _decode_tensors(batch, kv_cache, step.rope_tables, step.decode)
            return step.fused.decode_step(plan, batch.input_ids, tensors)
        x = self.wte(batch.input_ids)  # (T, C)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        if self.wpe is not None:
            x = x + self.wpe(batch.positions)
        kernels, dec, rope = step.fused, step.decode, step.rope_tables
        if (
            kernels is not None
            and plan is not None
            and kv_cache is not None
            and dec is not None
            and rope is not None
            and step.n_decode == x.shape[0]
        ):
            # A pure decode step on the CPU: every block in one kernel call.
            kernels.decode_layers(plan, x, _decode_tensors(batch, kv_cache, rope, dec))
        else:
            for i, block in enumerate(self.layers):
                x = block(x, batch, kv_cache, i, step)
        x = self.norm(x)
        if return_hidden:
            return x
        # Only the positions asked for go through the (large) vocabulary projection.
        return self.lm_head(x[batch.logits_indices])  # (N, vocab)


def _decode_tensors(
    batch: ForwardBatch, kv_cache: KVCache, rope: tuple[Tensor, Tensor], dec: DecodeInputs
) -> DecodeTensors:
    """The step's tensors as the C decode step reads them."""
    slots = batch.cache_addressing()[0]
    return DecodeTensors(
        batch.positions, rope, slots, kv_cache.k, kv_cache.v, dec.tables, dec.context_lens
    )


def _maybe_quantize(
    value: Tensor | QuantizedWeight, kind: Kind | None, name: str, embedding: bool
) -> Tensor | QuantizedWeight:
    """``value`` quantized to ``kind`` when asked and possible (K a multiple of 32)."""
    if kind is None or isinstance(value, QuantizedWeight) or value.shape[-1] % 32:
        return value
    if embedding or name == "lm_head.weight":
        kind = "q8"  # the vocabulary ends keep 8 bits, as llama.cpp's mixes do
    return quantize(value, kind)


def llama_block(config: ModelConfig) -> bool:
    """Whether every block is the plain Llama block the CPU kernels implement: RMSNorm,
    SwiGLU, full causal attention, one RoPE table, no q/k norms or extra norms."""
    return (
        config.rmsnorm
        and config.gated_mlp
        and config.activation == "silu"
        and not config.learned_positions
        and not config.qk_norm
        and not config.sandwich_norms
        and config.embed_scale == 1.0
        and not config.has_sliding_window
        and config.rope_local_theta in (0.0, config.rope_theta)
        and config.attn_scale == 1.0 / math.sqrt(config.head_dim)
    )


def rope_inv_freq(
    head_dim: int, theta: float, scaling: RopeScaling | None, device: torch.device
) -> tuple[Tensor, float]:
    """RoPE inverse frequencies (head_dim / 2,) and the factor on cos/sin (yarn), following
    the formulas of Hugging Face's ``modeling_rope_utils`` for each scaling type."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq, 1.0
    factor = scaling.factor
    if scaling.kind == "linear":
        return inv_freq / factor, 1.0
    if scaling.kind == "factors":
        factors = torch.tensor(scaling.freq_factors, dtype=torch.float32, device=device)
        return inv_freq / factors, 1.0
    original = scaling.original_max_seq_len
    if scaling.kind == "llama3":
        low_wavelen = original / scaling.low_freq_factor
        high_wavelen = original / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: interpolate low frequencies, extrapolate high ones, a linear ramp between.
    attention = scaling.attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = float(max(math.floor(correction_dim(scaling.beta_fast)), 0))
    high = float(min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1))
    if low == high:
        high += 0.001
    ramp = (torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)
    extrapolation = 1 - ramp.clamp(0, 1)
    interpolated = inv_freq / factor
    return interpolated * (1 - extrapolation) + inv_freq * extrapolation, attention


def _window_inputs(tables: Tensor, ctx: Tensor, block_size: int, window: int) -> WindowInputs:
    """The blocks of each decode row that hold keys in its window, and the key mask.

    A row's query is at position ctx - 1 and sees keys ctx - window .. ctx - 1:
    at most ceil((window - 1) / block_size) + 1 blocks from the one holding ctx - window.
    """
    width = min(tables.shape[1], -(-(window - 1) // block_size) + 1)
    first = (ctx - window).clamp(min=0) // block_size  # (B,)
    cols = first[:, None] + torch.arange(width, device=tables.device)[None, :]  # (B, Wb)
    inside = cols < tables.shape[1]
    wtables = tables.gather(1, cols.clamp(max=tables.shape[1] - 1))
    offsets = torch.arange(block_size, device=tables.device)
    kpos = (cols[:, :, None] * block_size + offsets).reshape(len(ctx), -1)  # (B, Wb * bs)
    valid = (kpos < ctx[:, None]) & (kpos >= (ctx - window)[:, None])
    valid &= inside.repeat_interleave(block_size, dim=1)
    return WindowInputs(wtables.contiguous(), valid[:, None, None, :])


def build_decode_plan(model: GPT) -> DecodePlan | None:
    """``DecodePlan`` of a Llama-block model (``llama_block``) whose block linears are all
    quantized and bias-free."""
    config = model.config
    if not llama_block(config):
        return None
    keep: list[Tensor] = []
    layers = []
    for block in cast(list[Block], list(model.layers)):
        linears = [block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj]
        if not all(isinstance(m, QuantLinear) and m.bias is None for m in linears):
            return None
        weights = [cast(QuantLinear, m).weight_q for m in linears]
        keep += [t for w in weights for t in (w.qs, w.d, w.m) if t is not None]
        keep += [block.attn_norm.weight, block.mlp_norm.weight]
        structs = [qweight_struct(w) for w in weights]
        layers.append(
            QLayerC(*structs, block.attn_norm.weight.data_ptr(), block.mlp_norm.weight.data_ptr())
        )
    # The embedding and the output layer join the step when they are quantized and
    # plain: no embedding scale or learned positions, no output bias.
    embed = head = None
    if (
        isinstance(model.wte, QuantEmbedding)
        and model.wpe is None
        and config.embed_scale == 1.0
        and model.wte.weight_q.shape[1] == config.n_embd
    ):
        tables = [model.wte.weight_q]
        embed = qweight_struct(model.wte.weight_q)
        if isinstance(model.lm_head, QuantLinear) and model.lm_head.bias is None:
            tables.append(model.lm_head.weight_q)
            head = qweight_struct(model.lm_head.weight_q)
        keep += [t for w in tables for t in (w.qs, w.d, w.m) if t is not None]
    keep.append(model.norm.weight)
    return DecodePlan(
        layers=(QLayerC * len(layers))(*layers),
        keep=keep,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_kv_head=config.n_kv_head,
        head_dim=config.head_dim,
        inner=config.intermediate_size,
        eps=config.norm_eps,
        scale=1.0 / math.sqrt(config.head_dim),
        embed=embed,
        final_norm=model.norm.weight if config.rmsnorm else None,
        head=head,
    )
