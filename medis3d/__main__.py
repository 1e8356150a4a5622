"""``python -m medis3d``."""

from medis3d.cli import main

main()
