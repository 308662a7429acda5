#!/usr/bin/env bash
# The README's robustness table: every kind of harm x seed x method on the embedded
# benchmark (configs/demo.py's schedule), then results mode over all of them.
#
#   bash benchmarks/robustness.sh [ROOT]        (ROOT defaults to /tmp/robust)
#
# Hours on a 2-core CPU (each method 4-7 minutes). Resumable: a method that finished is
# only evaluated again, one that was stopped resumes from its checkpoint, so after a stop
# the same command goes on. Narrow it with SEEDS="0 1", KINDS="none confusion" or
# METHODS="direct_joint metapix"; DRY_RUN=1 prints the commands without running them.
# Each ROOT/<kind>/seed_<s> is one compare workdir; direct_joint runs first there so the
# MetaPix variants start from its joint phase. target_only never reads the source, so it
# runs once per seed (under the first kind). The spatial kind runs at 4 px on half of the
# objects (spatial4), a sparser and wider error than its default.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-/tmp/robust}"
PYTHON="${PYTHON:-python3}"
SEEDS="${SEEDS:-0 1 2}"
KINDS="${KINDS:-confusion spatial4 noise appearance none}"
METHODS="${METHODS:-target_only direct_joint oracle_mask metapix metapix_w19 metapix_classnorm}"
FIRST_KIND="${KINDS%% *}"

harm_flags() {
  case "$1" in
    spatial4)
      echo "--config.data.synthetic_harm=spatial --config.data.synthetic_spatial_px=4" \
        "--config.data.synthetic_spatial_rate=0.5" ;;
    *) echo "--config.data.synthetic_harm=$1" ;;
  esac
}

# The methods of one workdir, as a Python tuple: no oracle where nothing is harmful,
# target_only under the first kind only.
methods_for() {
  local kind="$1" tuple="" m
  for m in $METHODS; do
    [[ "$m" == oracle_mask && "$kind" == none ]] && continue
    [[ "$m" == target_only && "$kind" != "$FIRST_KIND" ]] && continue
    tuple+="'$m',"
  done
  echo "($tuple)"
}

run() {  # Printed so that it can be pasted into a shell.
  printf '+'; printf ' %q' "$@"; echo
  [[ -n "${DRY_RUN:-}" ]] || "$@"
}

for seed in $SEEDS; do
  for kind in $KINDS; do
    # shellcheck disable=SC2046  # harm_flags gives several words on purpose.
    run "$PYTHON" main.py --config=configs/demo.py --workdir="$ROOT/$kind/seed_$seed" \
      --config.mode=compare --config.seed="$seed" \
      "--config.compare_methods=$(methods_for "$kind")" $(harm_flags "$kind")
  done
done
run "$PYTHON" main.py --config=configs/demo.py --workdir="$ROOT" --config.mode=results
