#!/usr/bin/env bash
# System packages the test suite needs beyond the virtualenv: Debian's Chromium, which the
# browser tests (tests/test_browser.py) drive through Python playwright. Never use
# `playwright install`: it downloads its own browser build, which needs the network.
set -euo pipefail

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium
fi
