#!/usr/bin/env bash
# Creates .venv with everything advtrain, its tests and its recipes need. Idempotent; safe to re-run.
#   bash scripts/setup.sh
# Environment: PYTHON (default: python3.11 if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch and torchvision first, pinned together; every later install is constrained to the same pins.
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" -c constraints.txt -e ".[test,eval,fast,corruptions]"
# torchattacks pins an old `requests`; it is only the reference attack in one cross-check test.
"${PIP[@]}" --no-deps "torchattacks==3.5.1"
.venv/bin/python -c "import torch, timm, open_clip, torchdata, submitit, advtrain; print('advtrain', advtrain.__version__, '| torch', torch.__version__, '| timm', timm.__version__)"
