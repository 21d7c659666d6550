#!/usr/bin/env bash
# Installs Debian's chromium (for the browser tests) when it is missing. Never downloads a browser of its own:
# Playwright drives this system chromium. Uses sudo only when not root.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium
command -v chromium
