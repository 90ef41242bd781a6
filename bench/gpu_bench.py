"""GPU roofline check: the card's copy bandwidth and matmul rate, then gptserve's
decode and prefill speed beside the floors those two numbers imply.

Imports only torch, ``model`` and the engine's torch-only CUDA-graph module, so
that it runs on a bare PyTorch image (``PYTHONPATH=. python -m bench.gpu_bench``).
Decode goes through the engine's decode path (static buffers, graph replay per
batch size; the model with a graph captured here if that fails); prefill runs
one sequence eagerly. Floors:

- decode: (weight bytes + KV bytes read per step) / copy bandwidth;
- prefill: FLOPs / matmul rate.

``--device cpu --quick`` runs the same code on a tiny model, for tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from model.config import ModelConfig
from model.gpt import GPT
from model.kv_cache import ForwardBatch, KVCache
from model.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from torch import Tensor

    from service.engine.cuda_graphs import DecodeGraphs

log = logging.getLogger("bench.gpu_bench")


# The default model's shapes, for random weights when the GGUF cannot be read here.
def smollm2_135m_config() -> ModelConfig:
    return ModelConfig(
        arch="llama",
        vocab_size=49152,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        n_embd=576,
        intermediate_size=1536,
        max_seq_len=8192,
        rope_theta=100000.0,
        tie_embeddings=True,
    )


def tiny_config() -> ModelConfig:
    return ModelConfig(
        arch="llama",
        vocab_size=256,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        intermediate_size=128,
        max_seq_len=512,
        tie_embeddings=True,
    )


@dataclass
class Plan:
    copy_mib: int
    matmul_n: int
    decode_batches: tuple[int, ...]
    decode_context: int
    decode_steps: int
    prefill_lens: tuple[int, ...]

    @classmethod
    def full(cls) -> Plan:
        return cls(1024, 8192, (1, 8, 64, 256), 512, 100, (512, 2048))

    @classmethod
    def quick(cls) -> Plan:
        return cls(16, 256, (1, 4), 32, 5, (32, 64))


@dataclass
class Row:
    what: str
    measured: float
    floor: float | None  # best possible in the same unit, from the roofline
    unit: str
    note: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(
    fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2
) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    secs = seconds_per_call(lambda: dst.copy_(src), device, iters=20)
    return 2 * src.numel() / secs


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of an (n, n) x (n, n) ``torch.mm``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    secs = seconds_per_call(lambda: torch.mm(a, b), device, iters=10)
    return 2 * n**3 / secs


def load_model(quick: bool, dtype: torch.dtype, device: torch.device) -> tuple[GPT, str]:
    """The default model's weights when the loader works here, else random weights of its shapes."""
    if quick:
        return GPT.random(tiny_config(), dtype=dtype, device=device), "tiny random model"
    try:
        from model.loading import load_model as load  # needs gguf, which a bare image may lack

        return load(DEFAULT_MODEL, dtype=dtype, device=str(device)).model, "SmolLM2-135M weights"
    except Exception as exc:  # any failure here only changes the weights' values, not the speed
        log.warning(
            "default weights unavailable (%s: %s); using random weights", type(exc).__name__, exc
        )
    return GPT.random(
        smollm2_135m_config(), dtype=dtype, device=device
    ), "SmolLM2-135M shapes, random weights"


def weight_bytes(model: GPT) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once


def decode_cache(model: GPT, batch: int, context: int, block_size: int = 16) -> KVCache:
    """Room for ``batch`` sequences of ``context`` tokens, each in whole blocks of its own."""
    blocks = batch * -(-context // block_size)
    return KVCache(model.config, blocks, block_size, dtype=model.dtype, device=model.device)


def decode_batch(model: GPT, cache: KVCache, batch: int, context: int) -> ForwardBatch:
    """One decode token per sequence at position ``context - 1``, each with its own blocks."""
    per_seq = -(-context // cache.block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    return ForwardBatch.build(
        [[1]] * batch,
        start_pos=[context - 1] * batch,
        block_tables=tables,
        block_size=cache.block_size,
        device=model.device,
    )


def graphed(
    step: Callable[[], torch.Tensor], device: torch.device
) -> tuple[Callable[[], object], str]:
    """Capture ``step`` in a CUDA graph (static inputs); eager on CPU or if capture fails."""
    if device.type != "cuda":
        return step, "eager"
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up kernels and allocator outside the graph
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph.replay, "CUDA graph"
    except Exception as exc:  # report eager numbers rather than none
        log.warning(
            "CUDA graph capture failed (%s: %s); timing eager decode", type(exc).__name__, exc
        )
        return step, "eager (graph capture failed)"


def eager_decode_graphs() -> type[DecodeGraphs]:
    """``DecodeGraphs`` that runs its padded static batches eagerly: nothing to capture."""
    from service.engine.cuda_graphs import DecodeGraphs

    class EagerDecodeGraphs(DecodeGraphs):
        def capture(self) -> None:
            self._pad_inputs()

        def _replay(self, b: int, w: int) -> Tensor:
            return self.model(self._batch(b, w), self.kv_cache)

    return EagerDecodeGraphs


def engine_decode(model: GPT, batch: int, context: int) -> tuple[Callable[[], object], str]:
    """The engine's own decode path (``DecodeGraphs``: static buffers, one host-to-device
    copy, graph replay) for ``batch`` sequences at position ``context - 1``."""
    from service.engine.cuda_graphs import DecodeGraphs  # torch-only, like this module

    per_seq = -(-context // 16)
    cache = KVCache(model.config, batch * per_seq + 1, 16, dtype=model.dtype, device=model.device)
    replay = model.device.type == "cuda"  # off the GPU: the same padded batch, run eagerly
    kind = DecodeGraphs if replay else eager_decode_graphs()
    graphs = kind(model, cache, [batch], per_seq, scratch_block=batch * per_seq)
    graphs.capture()
    tokens = [1] * context
    # Stand-ins for the scheduler's chunks: only .start and .seq.token_ids are read.
    chunks: Any = [
        SimpleNamespace(start=context - 1, seq=SimpleNamespace(token_ids=tokens))
    ] * batch
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    how = "engine CUDA graph" if replay else "engine decode path, eager"
    return partial(graphs.run, chunks, tables), how


def direct_decode(model: GPT, batch: int, context: int) -> tuple[Callable[[], object], str]:
    """Model + KVCache with a graph captured here: the fallback when the engine path fails."""
    cache = decode_cache(model, batch, context)
    fb = decode_batch(model, cache, batch, context)
    return graphed(partial(model, fb, cache), model.device)


@torch.inference_mode()
def decode_rows(model: GPT, plan: Plan, bandwidth: float) -> list[Row]:
    kv_per_token = KVCache.bytes_per_token(model.config, model.dtype)
    rows = []
    for b in plan.decode_batches:
        try:
            run, how = engine_decode(model, b, plan.decode_context)
        except Exception as exc:  # measure the model directly rather than not at all
            log.warning(
                "engine decode path unusable (%s: %s); timing the model directly",
                type(exc).__name__,
                exc,
            )
            run, how = direct_decode(model, b, plan.decode_context)
        secs = seconds_per_call(run, model.device, iters=plan.decode_steps)
        floor_secs = (weight_bytes(model) + b * plan.decode_context * kv_per_token) / bandwidth
        rows.append(Row(f"decode batch {b}", b / secs, b / floor_secs, "tok/s", how))
        del run
    return rows


def prefill_flops(config: ModelConfig, t: int) -> float:
    """Matmul FLOPs of a T-token causal prefill; the vocabulary projection only for the last token."""
    c, inner, layers = config.n_embd, config.intermediate_size, config.n_layer
    per_token = c * (config.q_size + 2 * config.kv_size) + config.q_size * c
    per_token += c * inner * (3 if config.gated_mlp else 2)
    attention = (
        2 * t * t * config.q_size
    )  # QK^T and AV over a causal half: 2 * (T^2 / 2) * 2 * q_size
    return 2 * layers * per_token * t + layers * attention + 2 * c * config.vocab_size


@torch.inference_mode()
def prefill_rows(model: GPT, plan: Plan, flop_rate: float) -> list[Row]:
    rows = []
    for t in plan.prefill_lens:
        cache = KVCache.for_tokens(model.config, t, dtype=model.dtype, device=model.device)
        batch = ForwardBatch.build(
            [[1] * t],
            block_tables=[list(range(cache.num_blocks))],
            block_size=cache.block_size,
            device=model.device,
        )
        secs = seconds_per_call(partial(model, batch, cache), model.device, iters=5)
        floor_secs = prefill_flops(model.config, t) / flop_rate
        rows.append(Row(f"prefill {t} tokens", t / secs, t / floor_secs, "tok/s", "eager"))
    return rows


def table(rows: list[Row]) -> str:
    lines = [f"{'what':<22}{'measured':>14}{'floor':>14}{'of floor':>10}  unit     note"]
    for r in rows:
        floor = f"{r.floor:>14.4g}" if r.floor else f"{'':>14}"
        frac = f"{r.measured / r.floor:>10.0%}" if r.floor else f"{'':>10}"
        lines.append(f"{r.what:<22}{r.measured:>14.4g}{floor}{frac}  {r.unit:<8} {r.note}")
    return "\n".join(lines)


def run(device: torch.device, plan: Plan, dtype: torch.dtype, quick: bool) -> tuple[list[Row], str]:
    bandwidth = copy_bandwidth(device, plan.copy_mib)
    flop_rate = matmul_rate(device, plan.matmul_n, dtype)
    model, source = load_model(quick, dtype, device)
    rows = [
        Row(
            "copy bandwidth", bandwidth / 1e9, None, "GB/s", f"{plan.copy_mib} MiB device-to-device"
        ),
        Row("matmul rate", flop_rate / 1e12, None, "TFLOP/s", f"{plan.matmul_n}^3 {dtype}"),
    ]
    rows += decode_rows(model, plan, bandwidth)
    rows += prefill_rows(model, plan, flop_rate)
    return rows, source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (tests, CPU)")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA"
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device is available to PyTorch; nothing measured.")
        return 2
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    plan = Plan.quick() if args.quick else Plan.full()
    rows, source = run(device, plan, dtype, args.quick)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\n{name}, torch {torch.__version__}, {dtype}, {source}, decode context {plan.decode_context}"
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "device": name,
                    "dtype": str(dtype),
                    "weights": source,
                    "rows": [asdict(r) for r in rows],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
