"""The `gptserve` command: serve, generate, info (the benchmarks are `gptserve-bench`)."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import TYPE_CHECKING

from model.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from torch import Tensor


def _cmd_generate(args: argparse.Namespace) -> int:
    from model.generate import generate
    from model.loading import load_model
    from model.sampling import SamplingBatch, SamplingRow, sample
    from model.tokenizer import Tokenizer

    loaded = load_model(args.model, device=args.device)
    tokenizer = Tokenizer.from_path(loaded.path)
    prompt = args.prompt
    if args.chat:
        prompt, ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    else:
        ids = tokenizer.encode(prompt)
    seed = args.seed if args.seed is not None else time.time_ns() % (2**31)
    step = 0

    def pick(logits: Tensor) -> int:
        nonlocal step
        row = SamplingRow(temperature=args.temperature, seed=seed, step=step)
        step += 1
        batch = SamplingBatch.build([row], loaded.config.vocab_size, logits.device)
        return int(sample(logits[None, :], batch).token_ids[0])

    detok = tokenizer.detokenizer()
    stop_ids = frozenset() if args.ignore_eos else tokenizer.eos_token_ids
    # Greedy needs no sampler: the loop's own argmax is the same choice.
    chooser = pick if args.temperature > 0 else None
    for token in generate(loaded.model, ids, args.max_tokens, pick=chooser, stop_ids=stop_ids):
        if token in stop_ids:
            break
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from model.families import describe
    from model.loading import load_model

    start = time.perf_counter()
    loaded = load_model(args.model, device=args.device)
    info = {
        "name": loaded.name,
        "path": str(loaded.path),
        "parameters": loaded.model.num_params(),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "device": str(loaded.model.device),
        "load_seconds": round(time.perf_counter() - start, 3),
        "config": loaded.config.to_dict(),
        **describe(loaded.config),
        # the CPU kernels run the plain Llama block; other families run PyTorch blocks
        "cpu_kernels": loaded.model.uses_cpu_kernels(),
    }
    print(json.dumps(info, indent=2))
    return 0


def _cmd_tokenizer_export(args: argparse.Namespace) -> int:
    from model.registry import resolve_model
    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(resolve_model(args.model))
    files = tokenizer.save_pretrained(args.dir)
    print("\n".join(str(f) for f in files))
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="registry name, HF directory or .gguf file"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # serve owns its flags; hand it the rest of the command line.
    if argv and argv[0] == "serve":
        # No garbage collection until the model has loaded (the server's runtime turns it
        # back on then): the imports ahead make ~10^5 objects that live as long as the
        # process, and full passes over them while they are being made cost ~0.1 s.
        gc.disable()
        try:
            from service.api.server import main as serve_main

            return serve_main(argv[1:])
        finally:
            gc.enable()

    parser = argparse.ArgumentParser(prog="gptserve", description="GPT inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve a model over HTTP (see `gptserve serve --help`)")
    gen = sub.add_parser("generate", help="stream a completion to stdout")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_cmd_generate)
    info = sub.add_parser("info", help="print a model's config, parameter count and dtype")
    _add_model_args(info)
    info.set_defaults(func=_cmd_info)
    tok = sub.add_parser("tokenizer", help="the model's tokenizer for clients")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    export = tok_sub.add_parser(
        "export", help="write a Hugging Face tokenizer directory (same ids as the server)"
    )
    export.add_argument("dir", help="directory to write (created if missing)")
    export.add_argument(
        "--model", default=DEFAULT_MODEL, help="registry name, HF directory or .gguf file"
    )
    export.set_defaults(func=_cmd_tokenizer_export)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError) as e:
        # Model files, names and configs: the message says what to fix; no traceback.
        print(f"gptserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
