#!/usr/bin/env bash
# Set up medis3d for development: torch (CPU build 2.13.0 unless a torch is already installed),
# then medis3d itself in editable mode with its test and DICOM extras.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test,dicom]"
"$PY" -c "import medis3d, torch, monai; print(f'medis3d {medis3d.__version__} ready (torch {torch.__version__}, monai {monai.__version__})')"
