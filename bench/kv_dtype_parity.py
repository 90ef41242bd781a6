"""What a compact KV cache does to the default model's greedy output.

``python -m bench.kv_dtype_parity [--tokens N] [--transformers] [--json PATH]`` decodes
greedily from 40 chat prompts with the cache in float32 (the exact default), float16
and bfloat16, and prints a markdown table:

- how many sequences come out token-identical to float32's (and, with
  ``--transformers``, to transformers reading the same GGUF: slow, ~5 minutes);
- how far the logits move along float32's sequences (max over the vocabulary, per
  position);
- how close each position came to a different greedy token: the change of the gap
  between float32's top two logits, as a share of that gap (1.0 is a flip).

The last figure is what decides whether a cache dtype can be the default of a server
that promises transformers' greedy tokens: no flip in a sample does not make the
flip rate zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from bench.environment import header

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain photosynthesis to a child.", "List three uses of copper.",
    "How do I reverse a list in Python?", "What causes rain?",
    "Give me a recipe for pancakes.", "Who wrote Hamlet?",
    "Translate 'good morning' into Spanish.", "What is 17 times 23?",
    "Describe a cat in two sentences.", "Why is the sky blue?",
    "Summarize the plot of Cinderella.", "What is a prime number?", "Name five planets.",
    "How does a bicycle work?", "Write a short poem about autumn leaves.",
    "What is machine learning?", "Tell me a joke about computers.",
    "How many legs does a spider have?", "What is the boiling point of water?",
    "Explain what a database index is.", "Suggest a name for a bakery.",
    "What is the difference between weather and climate?",
    "Write a limerick about a dog.", "How do vaccines work?",
    "What is the tallest mountain on Earth?", "Describe the water cycle.",
    "What are the primary colors?", "Give three tips for better sleep.",
    "What does HTTP stand for?", "Explain gravity simply.",
    "Write a two-line story about a robot.", "What is the largest ocean?",
    "How do you make tea?", "What is an atom?",
    "Why do leaves change color in autumn?", "What is the speed of light?",
    "Write a thank-you note to a teacher.", "What is the Pythagorean theorem?",
]  # fmt: skip
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _steps(
    loaded: Any,
    prompt: list[int],
    dtype: torch.dtype,
    n: int,
    eos: frozenset[int],
    follow: list[int] | None,
) -> tuple[list[int], torch.Tensor]:
    """Logits of each decode position: greedy when ``follow`` is None, else along it."""
    from model.generate import decode_one_token, prefill
    from model.kv_cache import KVCache

    total = len(prompt) + n + 1
    kv = KVCache.for_tokens(loaded.config, total, block_size=16, dtype=dtype)
    table = list(range(kv.num_blocks))
    tokens: list[int] = []
    rows = []
    logits = prefill(loaded.model, kv, prompt, total)
    while len(tokens) < n:
        rows.append(logits)
        tok = int(logits.argmax()) if follow is None else follow[len(tokens)]
        tokens.append(tok)
        if tok in eos or (follow is not None and len(tokens) == len(follow)):
            break
        logits = decode_one_token(loaded.model, kv, tok, len(prompt) + len(tokens) - 1, table)
    return tokens, torch.stack(rows)


@torch.inference_mode()
def measure(new_tokens: int, with_transformers: bool) -> dict[str, Any]:
    from model.loading import load_model
    from model.registry import DEFAULT_MODEL
    from model.tokenizer import Tokenizer

    loaded = load_model(DEFAULT_MODEL)
    tok = Tokenizer.from_path(loaded.path)
    prompts = [tok.encode_chat([{"role": "user", "content": q}])[1] for q in QUESTIONS]
    eos = frozenset(tok.eos_token_ids)
    exact = [_steps(loaded, p, torch.float32, new_tokens, eos, None) for p in prompts]
    results: dict[str, Any] = {"prompts": len(prompts), "new_tokens": new_tokens, "dtypes": {}}
    reference = [t for t, _ in exact]
    if with_transformers:
        from bench.offline import hf_greedy_ids, hf_load

        hf, _ = hf_load(loaded.path)
        reference = [_cut_at_eos(hf_greedy_ids(hf, p, new_tokens), eos) for p in prompts]
    for name, dtype in DTYPES.items():
        greedy = exact if dtype == torch.float32 else None
        same_f32 = same_ref = 0
        moves: list[torch.Tensor] = []
        closeness: list[torch.Tensor] = []
        for i, p in enumerate(prompts):
            tokens_f32, logits_f32 = exact[i]
            tokens = greedy[i][0] if greedy else _steps(loaded, p, dtype, new_tokens, eos, None)[0]
            same_f32 += tokens == tokens_f32
            same_ref += tokens == reference[i]
            if dtype == torch.float32:
                continue
            _, logits = _steps(loaded, p, dtype, new_tokens, eos, tokens_f32)
            moves.append((logits - logits_f32).abs().amax(1))
            top = logits_f32.topk(2, dim=1).indices
            a, b = logits_f32.gather(1, top), logits.gather(1, top)
            gap = a[:, 0] - a[:, 1]
            closeness.append(((a[:, 0] - a[:, 1]) - (b[:, 0] - b[:, 1])).abs() / gap)
        row: dict[str, Any] = {"same_as_float32": same_f32}
        if with_transformers:
            row["same_as_transformers"] = same_ref
        if moves:
            move, close = torch.cat(moves), torch.cat(closeness)
            row.update(
                positions=move.numel(),
                logit_move_median=float(move.median()),
                logit_move_max=float(move.max()),
                closeness_max=float(close.max()),
                positions_over_half=int((close > 0.5).sum()),
            )
        results["dtypes"][name] = row
    return results


def _cut_at_eos(ids: list[int], eos: frozenset[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def table(results: dict[str, Any]) -> str:
    n = results["prompts"]
    hf = any("same_as_transformers" in r for r in results["dtypes"].values())
    head = "| KV cache | same as float32 |" + (" same as transformers |" if hf else "")
    head += " logit move, median / max | closest to a flip (share of the top-2 gap) | positions past half |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, r in results["dtypes"].items():
        cells = [name, f"{r['same_as_float32']} of {n}"]
        if hf:
            cells.append(f"{r['same_as_transformers']} of {n}")
        if "positions" in r:
            cells += [
                f"{r['logit_move_median']:.1e} / {r['logit_move_max']:.1e}",
                f"{r['closeness_max']:.2f}",
                f"{r['positions_over_half']} of {r['positions']}",
            ]
        else:
            cells += ["0 (the reference)", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--transformers", action="store_true", help="also compare to transformers")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    results = measure(args.tokens, args.transformers)
    results["environment"] = header(["python", "-m", "bench.kv_dtype_parity", *sys.argv[1:]])
    sys.stdout.write(table(results) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
