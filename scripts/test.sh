#!/usr/bin/env bash
# Set up the environment, then run the unit tests and re-execute the notebooks (nbval): the smoke
# instances of notebooks/ in tests/notebooks/ (python -m repro.study --profile smoke --nbval).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${NORMGROWTH_VENV:-.venv}/bin/activate"
# the reference implementation the editor tests compare against (tests/easyeditor_ref.py): EasyEdit's
# wheel, for the tests only and without its dependencies (it pins torch 2.0 and transformers 4.30;
# the tests import only the editor modules, which need neither pin)
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('easyeditor') is None)" \
  || python -m pip install -q --no-deps easyeditor==0.0.1.dev0
export TRANSFORMERS_VERBOSITY=error
python -m pytest --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg \
  --nbval-cell-timeout 1200 tests "$@"
