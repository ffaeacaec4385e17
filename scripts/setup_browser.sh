#!/usr/bin/env bash
# The browser the demo's end-to-end test drives: Debian's Chromium (headless). Installed only when
# missing; needs apt (root). Without it the browser test fails and says how to install it.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
else
    echo "setup_browser: /usr/bin/chromium is missing and apt-get (as root) is not available" >&2
fi
