#!/usr/bin/env bash
# Set up the environment, then run the unit tests and re-execute the notebooks (nbval): the smoke
# instances of notebooks/ in tests/notebooks/ (python -m repro.study --profile smoke --nbval).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${NORMGROWTH_VENV:-.venv}/bin/activate"
export TRANSFORMERS_VERBOSITY=error
python -m pytest --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg \
  --nbval-cell-timeout 1200 tests "$@"
