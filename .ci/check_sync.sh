#!/usr/bin/env bash
# Checks, in a scratch copy so the working tree is never touched, that
#   clean:  every notebook is already what `nbdev-clean` makes of it;
#   export: gpt2_demo/ is exactly what `nbdev-export` makes of nbs/;
#   readme: README.md is exactly what `make readme` renders from nbs/index.ipynb.
set -euo pipefail
mode=${1:?usage: check_sync.sh clean|export|readme}
top=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
(cd "$top" && tar --exclude=./.venv --exclude=./.git --exclude=./datasets --exclude=./model \
    --exclude=./log --exclude='*/__pycache__' -cf - .) | tar -xf - -C "$tmp"
cd "$tmp"
case $mode in
  clean)
    nbdev-clean >/dev/null
    if ! diff -rq "$top/nbs" "$tmp/nbs" >/dev/null; then
      echo "ERROR: these notebooks are not clean (nbdev-clean would change them):" >&2
      diff -rq "$top/nbs" "$tmp/nbs" | sed 's/^/  /' >&2
      echo "Run 'nbdev-clean' (or 'make clean-nbs') and commit the result." >&2
      exit 1
    fi
    echo "notebooks are clean." ;;
  export)
    # start from no generated module at all, so a module whose notebook is gone shows up as a difference
    find gpt2_demo -name '*.py' ! -name '__init__.py' -delete
    nbdev-export
    if ! diff -rq -x __pycache__ "$top/gpt2_demo" "$tmp/gpt2_demo" >/dev/null; then
      echo "ERROR: gpt2_demo/ differs from what nbdev-export makes of nbs/:" >&2
      diff -rq -x __pycache__ "$top/gpt2_demo" "$tmp/gpt2_demo" | sed 's/^/  /' >&2
      echo "Edit the notebooks (never gpt2_demo/*.py), run 'nbdev-export' (or 'make export'), and commit both." >&2
      exit 1
    fi
    echo "gpt2_demo/ matches nbs/." ;;
  readme)
    jupyter nbconvert --log-level=ERROR --to markdown --output-dir "$tmp/out" --output README nbs/index.ipynb
    if ! diff -q "$top/README.md" "$tmp/out/README.md" >/dev/null; then
      echo "ERROR: README.md differs from what nbs/index.ipynb renders to:" >&2
      diff "$top/README.md" "$tmp/out/README.md" | head -20 | sed 's/^/  /' >&2
      echo "Edit nbs/index.ipynb (not README.md), run 'make readme', and commit both." >&2
      exit 1
    fi
    echo "README.md matches nbs/index.ipynb." ;;
  *) echo "usage: check_sync.sh clean|export|readme" >&2; exit 2 ;;
esac
