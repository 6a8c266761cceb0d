#!/usr/bin/env bash
# The wheels the one-shot GPU proof carries (bench/wheels.txt), downloaded for the lent machine
# (CPython 3.12, manylinux x86_64) into wheels/ (git-ignored), bitsandbytes slimmed to the
# libraries that machine loads, so the whole working tree stays under the 64 MiB carry.
#   bash bench/gpu_wheels.sh            # WHEELS=<folder> for another folder
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-$ROOT/wheels}"
PYTHON="${PYTHON:-python3}"

mkdir -p "$WHEELS"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    -r "$ROOT/bench/wheels.txt" -d "$WHEELS"
for wheel in "$WHEELS"/bitsandbytes-*.whl; do
    "$PYTHON" "$ROOT/bench/slim_wheel.py" "$wheel"
done
echo "wheels: $(find "$WHEELS" -name '*.whl' | wc -l) files, $(du -sh "$WHEELS" | cut -f1) in $WHEELS"
