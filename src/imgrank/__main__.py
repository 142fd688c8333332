"""The ``imgrank`` command's entry point (also ``python -m imgrank``).

Importing the CLI takes a moment (typer, rich, the command modules); a Ctrl-C
in that moment must end the command with the same message and exit code as
one during its work, not with a traceback. So the console script starts here,
in a module that imports nothing heavy, and imports the CLI inside the guard.
"""

from __future__ import annotations

import sys

#: Exit code for Ctrl-C, as shells report SIGINT (also :data:`imgrank.cli.common.EXIT_INTERRUPTED`).
_EXIT_INTERRUPTED = 130


def main() -> None:
    """Console-script entry point."""
    try:
        from imgrank.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(_EXIT_INTERRUPTED) from None
    run()


if __name__ == "__main__":
    main()
