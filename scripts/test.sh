#!/usr/bin/env bash
# Run the bevperc test suite on a fresh machine: sets up .venv (idempotent), then pytest.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k geometry -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# Tests use the CPU only, even where a GPU exists, so results match CI.
export CUDA_VISIBLE_DEVICES="${BEVPERC_TEST_CUDA:-}"
export MPLBACKEND=Agg
exec "$ROOT/.venv/bin/python" -m pytest -p no:cacheprovider "$@"
