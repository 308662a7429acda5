#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that a GPU host without network needs on top
# of its jax, flax, optax, orbax, numpy, torch and tensorboard to run main.py and
# benchmarks/gpu_check.sh: the pinned versions of requirements.txt, for CPython 3.12 on
# x86-64 Linux by default (PYTHON_VERSION=3.11 for this project's development machines).
# Run it in the repository on a machine with network; benchmarks/gpu_check.sh installs the
# folder offline. --no-deps: each needed package is named here, so nothing else is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PY="${PYTHON_VERSION/./}"
# Pure Python (ml-collections, clu, cityscapesscripts, portpicker, cloudpickle) and compiled
# (grain, array-record, wrapt: one wheel per CPython version). cityscapesscripts goes in
# without its dependencies (matplotlib, ...): the project imports only its label table.
WHEELS=(
  ml-collections==1.1.0
  clu==0.0.12
  grain==0.2.18
  array-record==0.8.6
  cloudpickle==2.1.0
  portpicker==1.6.0
  wrapt==2.1.2
  cityscapesscripts==2.3.0
)
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYTHON_VERSION" --implementation cp --abi "cp$PY" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
