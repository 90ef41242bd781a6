"""Load the model and tokenizer in a fresh process; print timings and peak RSS as JSON.

Run as a child (``python -m bench.loadcheck --model NAME``) so that the peak
resident memory is the loaded model's alone, not the benchmark's.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402  (timed: part of what a cold start pays)

from model.generate import generate  # noqa: E402
from model.loading import load_model  # noqa: E402
from model.registry import DEFAULT_MODEL  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=16, help="tokens to generate after loading")
    args = parser.parse_args(argv)
    imported = time.perf_counter()
    loaded = load_model(args.model, dtype=torch.float32, device="cpu")
    weights = time.perf_counter()
    tokenizer = Tokenizer.from_path(loaded.path)
    ready = time.perf_counter()
    ids = tokenizer.encode("The lighthouse keeper kept a ledger of every ship")
    out = list(generate(loaded.model, ids, args.tokens))
    done = time.perf_counter()
    # ru_maxrss is in KiB on Linux.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "import_s": imported - T0,
        "weights_s": weights - imported,
        "tokenizer_s": ready - weights,
        "ready_s": ready - imported,  # weights + tokenizer: the "ready to generate" figure
        "generate_s": done - ready,
        "generated": len(out),
        "maxrss_mib": peak,
        "params": loaded.model.num_params(),
    }
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
