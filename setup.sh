#!/usr/bin/env bash
# Set up medis3d for development: torch (CPU build 2.13.0 unless a torch is already installed),
# then medis3d itself in editable mode with its test, DICOM and postprocessing extras, and Debian's Chromium and
# ChromeDriver for the report's browser test where they are missing (as root, with apt-get).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test,dicom,postprocessing]"
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq chromium chromium-driver >/dev/null \
            || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }
    else
        echo "note: the report's browser test needs chromium and chromedriver (apt-get install chromium chromium-driver); it is skipped without them"
    fi
fi
"$PY" -c "import medis3d, torch, monai; print(f'medis3d {medis3d.__version__} ready (torch {torch.__version__}, monai {monai.__version__})')"
