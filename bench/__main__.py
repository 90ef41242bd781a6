"""``gptserve-bench`` (or ``python -m bench``): the benchmarks' own command.

The benchmarks need the ``bench`` extra (``pip install 'gptserve[bench]'``), which
the server's image does not install. Without it this command says so, instead of
failing on an import.
"""

from __future__ import annotations

import importlib.util
import sys

# Third-party modules the benchmarks import that the runtime dependencies do not bring.
BENCH_EXTRA = ("httpx", "matplotlib", "tqdm")


def missing_modules() -> list[str]:
    return [name for name in BENCH_EXTRA if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    missing = missing_modules()
    if missing:
        print(
            f"gptserve-bench: {', '.join(missing)} not installed; the benchmarks need the "
            "bench extra: pip install 'gptserve[bench]'",
            file=sys.stderr,
        )
        return 2
    from bench.cli import main as run

    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
