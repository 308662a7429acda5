#!/usr/bin/env bash
# The device check (benchmarks/gpu_check.py): `bash benchmarks/gpu_check.sh --out=DIR`
# [--smoke]. If the Python here lacks a module the project needs and a .whl/ folder from
# benchmarks/gpu_wheels.sh is in the repository, installs those wheels offline into a
# temporary folder (nothing in site-packages changes) and puts it on PYTHONPATH first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
NEEDED="import ml_collections, clu, grain, array_record, cityscapesscripts, cloudpickle, wrapt"
if ! "$PYTHON" -c "$NEEDED" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/metapix_wheels.XXXXXX")"
  trap 'rm -rf "$SITE"' EXIT
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
    --no-compile --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "[gpu_check] installed $(ls .whl | wc -l) wheels from .whl/ into $SITE"
fi
"$PYTHON" benchmarks/gpu_check.py "$@"
