#!/bin/sh
# Regenerate assets/demo-screenshot.png (the README's picture of vlprune-demo) with the real-browser test.
# Timings in the picture are this machine's: run it on an idle machine. Needs chromium + chromedriver
# (scripts/install-browser.sh).
set -eu
cd "$(dirname "$0")/.."
VLPRUNE_DEMO_SCREENSHOT="$PWD/assets/demo-screenshot.png" VLPRUNE_DEMO_REPEATS="${VLPRUNE_DEMO_REPEATS:-5}" \
    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_demo_browser.py
echo "wrote assets/demo-screenshot.png"
