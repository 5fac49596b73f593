#!/usr/bin/env bash
# Download, on the development machine, the wheels that the GPU machine's image lacks (it has torch,
# transformers, lightning, peft; not bitsandbytes or jsonargparse) into .whl/, for the device tool's
# `carry`. The image runs Python 3.12 on x86-64; nothing can be fetched there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
for spec in bitsandbytes==0.50.2 jsonargparse==4.53.0 docstring-parser typeshed-client; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$spec"
done
ls -la .whl
