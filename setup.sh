#!/usr/bin/env bash
# Installs what Duet needs on a Debian/Ubuntu machine: the Fashion-MNIST package, a JRE for the COCO caption
# scorers (METEOR, PTB tokenizer), chromium and its chromedriver for the serve page's browser test, then the
# pinned Python packages.
set -euo pipefail
cd "$(dirname "$0")"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
if command -v apt-get >/dev/null; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist default-jre-headless \
    chromium chromium-driver >/dev/null
fi
python3 -m pip install -q -r requirements.txt
