#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install bevperc into it.
# Idempotent: a stamp file records the hash of what was installed; a second run with the
# same requirements does nothing but print where the environment is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BEVPERC_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.bevperc-installed"
want="$(cat "$ROOT/requirements.txt" "$ROOT/setup.cfg" "$ROOT/pyproject.toml" 2>/dev/null | sha256sum | cut -d' ' -f1)"

# open3d links libusb at import time; install the Debian package when we can.
if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian package libusb-1.0-0 (needed by open3d)"
    (apt-get install -y -q libusb-1.0-0 >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libusb-1.0-0 >/dev/null; })
  else
    echo "[setup] WARNING: libusb-1.0-0 missing and apt-get unavailable; open3d features will be skipped" >&2
  fi
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup] environment up to date: $VENV"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "[setup] installing requirements (first run downloads torch+torchvision, ~5.5 GB, a few minutes)"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt"
"$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
"$VENV/bin/python" -m ipykernel install --prefix "$VENV" --name python3 >/dev/null
echo "$want" > "$STAMP"
echo "[setup] done: $VENV"
