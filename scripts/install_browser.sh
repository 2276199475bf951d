#!/usr/bin/env bash
# Installs Debian's chromium + chromium-driver for the real-browser tests (tests/test_browser_*.py).
# Idempotent: returns at once when /usr/bin/chromium exists. Playwright drives this browser through
# executable_path; it must never download its own (no internet here, and a second browser is waste).
set -euo pipefail
CHROMIUM=${TDM_CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[install_browser] $CHROMIUM is missing and this is not a root Debian/Ubuntu shell:" >&2
    echo "  install it yourself (apt-get install chromium chromium-driver) or set TDM_CHROMIUM" >&2
    exit 1
fi
echo "[install_browser] installing chromium + chromium-driver with apt-get (about 30 s)" >&2
export DEBIAN_FRONTEND=noninteractive
# a stale package list makes the install fail with 404s, so refresh it first
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
[ -x "$CHROMIUM" ] || { echo "[install_browser] apt-get finished but $CHROMIUM is still missing" >&2; exit 1; }
echo "[install_browser] ready: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")" >&2
