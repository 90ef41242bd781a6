"""The GPU roofline benchmark's Python part, run on the CPU with a tiny model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import gpu_bench
from model.gpt import GPT
from model.kv_cache import KVCache

REPO = Path(__file__).resolve().parents[2]


def test_quick_cpu_run_reports_every_figure_with_its_floor(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert gpu_bench.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    rows = {r["what"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {
        "copy bandwidth",
        "matmul rate",
        "decode batch 1",
        "decode batch 4",
        "prefill 32 tokens",
        "prefill 64 tokens",
    }
    for name, row in rows.items():
        assert row["measured"] > 0, name
        if name.startswith(("decode", "prefill")):
            assert row["floor"] > 0, name
    assert rows["decode batch 4"]["note"] == "engine decode path, eager"  # the engine's own step
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("prefill 64 tokens")  # the table is last


def test_prefill_flops_match_the_model_matmuls():
    model = GPT.random(gpu_bench.tiny_config())
    t = 48
    cache = KVCache.for_tokens(model.config, t)
    batch = gpu_bench.ForwardBatch.build([[1] * t], block_tables=[list(range(cache.num_blocks))])
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(batch, cache)
    attention = model.config.n_layer * 2 * t * t * model.config.q_size  # SDPA is not counted as mm
    assert gpu_bench.prefill_flops(model.config, t) - attention == counter.get_total_flops()


def test_direct_decode_fallback_runs_the_same_step():
    model = GPT.random(gpu_bench.tiny_config())
    with torch.inference_mode():
        run, how = gpu_bench.direct_decode(model, 3, 20)
        logits = run()
    assert isinstance(logits, torch.Tensor)
    assert how == "eager" and tuple(logits.shape) == (3, model.config.vocab_size)


def test_decode_floor_counts_weights_once_and_kv_per_sequence():
    model = GPT.random(gpu_bench.tiny_config())
    n_params = sum(p.numel() for p in model.parameters())
    assert gpu_bench.weight_bytes(model) == 4 * n_params
    # Tied embeddings: lm_head shares wte, so it is not counted twice.
    assert n_params < sum(p.numel() for p in model.state_dict().values())


def test_without_cuda_the_script_says_so_and_exits_cleanly():
    if torch.cuda.is_available():
        pytest.skip("this checks the no-GPU path")
    assert gpu_bench.main(["--device", "cuda"]) == 2
    if shutil.which("bash") is None:
        return
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "no CUDA device" in proc.stdout
