"""Dice of this bundle against reference brain masks: runs the shared ../../scripts/evaluate_brain_t1.py
with --bundle set to this bundle.

Usage (from the bundle folder; SupervisedEvaluator needs pytorch-ignite):
    python scripts/evaluate.py IMAGE:MASK [IMAGE:MASK ...] [--json out.json]
"""

import runpy
import sys
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent.parent
sys.argv[1:1] = ["--bundle", str(BUNDLE)]
runpy.run_path(str(BUNDLE.parent / "scripts" / "evaluate_brain_t1.py"), run_name="__main__")
