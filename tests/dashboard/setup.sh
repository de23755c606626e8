#!/usr/bin/env bash
# The dashboard's browser test needs Debian's chromium and its driver: installed once (as root,
# from Debian's packages), skipped when they are there already.
set -euo pipefail
if [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "tests/dashboard/setup.sh: run as root (apt-get install chromium chromium-driver)" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
