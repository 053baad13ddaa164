#!/bin/sh
# Install headless Chromium and its chromedriver for the demo's browser test (tests/test_demo_browser.py),
# on Debian/Ubuntu, only when one of them is missing: running it again changes nothing.
set -eu
have() { command -v "$1" >/dev/null 2>&1; }
if { have chromium || have chromium-browser; } && have chromedriver; then
    echo "install-browser: chromium and chromedriver already installed"
    exit 0
fi
if ! have apt-get; then
    echo "install-browser: no apt-get here; install Chromium and a matching chromedriver yourself" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
chromium --version && chromedriver --version
