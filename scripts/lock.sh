#!/usr/bin/env bash
# Refresh the locks that scripts/bootstrap.sh installs from (requirements/*.lock), with uv.
#
#   scripts/lock.sh                     # re-resolve after editing pyproject.toml; keeps every pin it can
#   scripts/lock.sh --upgrade           # newest releases that pyproject.toml's ranges allow
#   scripts/lock.sh --upgrade-package pyarrow
#
# pyproject.toml keeps ranges (for installing biocurate into an environment of your own);
# the locks pin the whole tree, for every platform (--universal), with the sha256 of every
# file, so a fresh machine resolves nothing and installs only files it has verified.
# torch/torchvision are held as a pair (requirements/constraints.txt). Commit the locks with
# the change that needed them; bootstrap reinstalls when one changes.
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-.venv/bin/uv}"
[ -x "$UV" ] || UV="$(command -v uv)" || { echo "lock: no uv (run scripts/bootstrap.sh, or pip install uv)"; exit 1; }
common=(--universal --python-version 3.11 --generate-hashes --quiet --custom-compile-command "scripts/lock.sh")
"$UV" pip compile pyproject.toml --extra test -c requirements/constraints.txt "${common[@]}" "$@" \
  -o requirements/test.lock
# Installed with --no-deps (their metadata pins old releases): their own files only.
"$UV" pip compile requirements/data.in --no-deps "${common[@]}" "$@" -o requirements/data.lock
"$UV" pip compile requirements/uv.in --no-deps "${common[@]}" "$@" -o requirements/uv.lock
echo "lock: $(grep -c '^[a-zA-Z0-9]' requirements/test.lock) packages in requirements/test.lock," \
  "$(grep -c '^[a-zA-Z0-9]' requirements/data.lock) in requirements/data.lock; commit them"
