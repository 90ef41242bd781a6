#!/usr/bin/env bash
# System tools the test suite needs, installed idempotently and quietly on a fresh Debian
# machine as root. Called by .ci/run before `make test`.
# - promtool and the prometheus server (Debian's `prometheus` package) for the deployment
#   checks (tests/deploy); the Python tools (hadolint, check-jsonschema,
#   kubernetes-validate) are the project's `deploy-check` extra, which `make test` installs.
# - Chromium (Debian's `chromium` package) for the browser tests (tests/browser), which
#   Playwright (the `dev` extra) drives; Playwright's own browser download is never used.
set -euo pipefail

packages=()
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    packages+=(prometheus)
fi
if ! command -v chromium >/dev/null 2>&1; then
    packages+=(chromium)
fi

if [ "${#packages[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The prometheus package's service is never started here: the tests run their own server.
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
promtool --version >/dev/null
# Debian's launcher script may warn on stderr about /dev/shm; only the exit status matters.
chromium --version >/dev/null 2>&1 || { echo "chromium is installed but does not run" >&2; exit 1; }
