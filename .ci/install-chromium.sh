#!/usr/bin/env bash
# Debian's Chromium for the dashboard browser test (tests/integration/test_dashboard_browser.py).
# Idempotent: nothing to do when a chromium binary is already on PATH. Needs root and apt.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: needs root and apt-get (Debian/Ubuntu); install chromium yourself" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium >/dev/null
