"""Train this bundle: runs the shared recipe ../../scripts/train_brain_t1.py with --bundle set to this bundle.

The recipe needs the medis3d source checkout (the shared script lives in its bundles/scripts/);
see docs/README.md for the commands that made models/model.pt.
"""

import runpy
import sys
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent.parent
sys.argv[1:1] = ["--bundle", str(BUNDLE)]
runpy.run_path(str(BUNDLE.parent / "scripts" / "train_brain_t1.py"), run_name="__main__")
