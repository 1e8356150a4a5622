"""The ``medis3d`` command and ``python -m medis3d``.

Signals are turned into a clean stop before anything else is imported: the command line's own
imports (torch, MONAI) take seconds, and a Ctrl-C during them must end as cleanly as one later.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Console-script entry point: Ctrl-C and SIGTERM end the run cleanly (exit 130 / 143)."""
    from medis3d.signals import Interrupted, install

    install()
    try:
        from medis3d.cli import app

        app()
    except Interrupted as exc:
        print(f"medis3d: interrupted by {exc.signal_name}; nothing partial was left behind", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a path the system refuses (too long, a loop of links, ...) that no check caught first
        from medis3d.io.outputs import reason

        print(f"medis3d: error: {exc.filename or 'medis3d'}: {reason(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
