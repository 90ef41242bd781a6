#!/usr/bin/env bash
# System tools the deployment checks (tests/deploy) need, installed idempotently and
# quietly on a fresh Debian machine as root. Called by .ci/run before `make test`.
# promtool and the prometheus server come from Debian's `prometheus` package; the
# Python tools (hadolint, check-jsonschema, kubernetes-validate) are the project's
# `deploy-check` extra, which `make test` installs into .venv.
set -euo pipefail

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The package's service is never started here: the tests run their own server.
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool --version >/dev/null
