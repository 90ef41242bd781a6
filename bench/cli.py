"""``gptserve-bench``: sweep any OpenAI-compatible ``/v1/completions`` server.

``gptserve-bench [flags]`` runs a concurrency sweep (or, with ``--request-rate``,
open-loop Poisson/gamma arrivals) against ``--base-url``, prints a table and
optionally writes a results JSON and plots. ``--launch`` starts gptserve itself
as a child process first. ``gptserve-bench suite`` runs the CPU suite
(``make bench``).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import httpx

from bench import plots
from bench.environment import header, write_json
from bench.metrics import SLO
from bench.prompts import Codec, build_prompts
from bench.server_bench import ServerProcess
from bench.sweep import SweepPoint, SweepSpec, requests_at, run_sweep
from model.registry import DEFAULT_MODEL, resolve_model

log = logging.getLogger("bench.cli")


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def parse_slo(items: list[str]) -> SLO | None:
    """``ttft:500 tpot:100 e2el:20000`` (milliseconds) as vLLM's ``--goodput`` takes them."""
    if not items:
        return None
    slo = SLO()
    for item in items:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        setattr(slo, f"{name}_ms", float(value))
    return slo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gptserve-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--launch", action="store_true", help="start gptserve with --model first")
    p.add_argument(
        "--model", help="model name sent in requests (default: the server's first in /v1/models)"
    )
    p.add_argument(
        "--tokenizer",
        default=DEFAULT_MODEL,
        help="tokenizer for exact prompt lengths: a model name or path",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--concurrency",
        type=floats,
        default=None,
        help="closed-loop levels (default 1,2,4,8,16,32)",
    )
    mode.add_argument(
        "--request-rate", type=floats, default=None, help="open-loop rates in requests/s"
    )
    p.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson"
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="client-side cap in rate mode")
    p.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="requests per level (default: 2 x concurrency, min 4; 40 per rate)",
    )
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens")
    p.add_argument(
        "--output-len", type=int, default=128, help="new tokens (max_tokens with ignore_eos)"
    )
    p.add_argument(
        "--goodput",
        nargs="*",
        default=[],
        metavar="METRIC:MS",
        help="SLOs: ttft:MS tpot:MS e2el:MS",
    )
    p.add_argument("--api-key", default=None, help="bearer token, if the server wants one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="requests sent and discarded first")
    p.add_argument("--out", type=Path, help="write the results JSON here")
    p.add_argument("--plots", type=Path, help="write PNG plots into this folder")
    p.add_argument("--plot-prefix", default="sweep", help="file name prefix of the plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def served_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=headers, timeout=10).json()
    return str(data["data"][0]["id"])


def load_tokenizer(name_or_path: str) -> Codec:
    from model.tokenizer import Tokenizer

    return Tokenizer.from_path(resolve_model(name_or_path))


def print_table(points: list[SweepPoint]) -> None:
    unit = "conc" if points and points[0].mode == "concurrency" else "req/s"
    print(
        f"{unit:>6} {'ok':>4} {'fail':>4} {'out tok/s':>10} {'req/s':>7} {'TTFT p50':>9} {'p99':>8} "
        f"{'TPOT p50':>9} {'ITL p50':>8} {'p99':>8} {'goodput':>8}"
    )
    for p in points:
        s = p.summary
        good = "" if s.goodput is None else f"{s.goodput:.2f}"
        print(
            f"{p.level:>6g} {s.completed:>4} {s.failed:>4} {s.output_throughput:>10.1f} {s.request_throughput:>7.2f} "
            f"{s.ttft_ms.median:>9.1f} {s.ttft_ms.percentiles['p99']:>8.1f} {s.tpot_ms.median:>9.1f} "
            f"{s.itl_ms.median:>8.1f} {s.itl_ms.percentiles['p99']:>8.1f} {good:>8}"
        )
        for err in s.errors:
            print(f"       error: {err}")


def sweep_spec(args: argparse.Namespace, base_url: str, model: str) -> SweepSpec:
    rate_mode = args.request_rate is not None
    levels = args.request_rate if rate_mode else (args.concurrency or [1, 2, 4, 8, 16, 32])
    if any(v <= 0 for v in levels):
        raise ValueError(f"levels must be positive, got {levels}")
    spec = SweepSpec(
        base_url=base_url,
        model=model,
        prompts=[],  # built below, once the sweep's size is known
        output_len=args.output_len,
        mode="rate" if rate_mode else "concurrency",
        levels=levels,
        requests_per_level=args.num_prompts or (40 if rate_mode else None),
        max_concurrency=args.max_concurrency,
        burstiness=args.burstiness,
        slo=args.slo,
        api_key=args.api_key,
        seed=args.seed,
        progress=not args.no_progress,
        warmup=args.warmup,
    )
    # One prompt per request: a repeated prompt would be served from the prefix cache.
    pool = sum(requests_at(spec, level) for level in levels) + args.warmup
    tokenizer = load_tokenizer(args.tokenizer)
    spec.prompts = build_prompts(tokenizer, args.input_len, count=pool, seed=args.seed)
    return spec


def run(args: argparse.Namespace, argv: list[str]) -> int:
    server = ServerProcess(args.model or DEFAULT_MODEL) if args.launch else None
    try:
        if server is not None:
            ready = server.start()
            log.info("gptserve ready after %.2f s on %s", ready, server.base_url)
        base_url = server.base_url if server is not None else args.base_url
        model = args.model or served_model(base_url, args.api_key)
        spec = sweep_spec(args, base_url, model)
        points = run_sweep(spec)
    finally:
        if server is not None:
            server.stop()
    print_table(points)
    if args.out:
        results = {
            **header(["gptserve-bench", *argv]),
            "base_url": base_url,
            "model": model,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "points": [p.to_dict() for p in points],
        }
        write_json(args.out, results)
        print(f"results: {args.out}")
    if args.plots:
        title = f"{model} at {base_url}"
        for path in plots.sweep_plots(points, args.plots, args.plot_prefix, title):
            print(f"plot: {path}")
    failed = sum(p.summary.failed for p in points)
    return 1 if failed and all(p.summary.completed == 0 for p in points) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["suite"]:
        from bench import suite

        return suite.main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (0 < args.burstiness < math.inf) or (
        args.max_concurrency is not None and args.max_concurrency <= 0
    ):
        parser.error("--burstiness and --max-concurrency must be positive")
    try:
        args.slo = parse_slo(args.goodput)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return run(args, argv)
    except httpx.HTTPError as exc:
        print(f"gptserve-bench: cannot reach the server: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
