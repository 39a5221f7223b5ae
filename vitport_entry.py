"""The ``vitport`` command's entry point, outside the packages on purpose.

Importing ``vitport.cli`` loads numpy, rich and the converters before ``main()`` can install its
signal handlers; a Ctrl-C in that second would otherwise end in a Python traceback. Nothing has
been written by then, so it ends like any other interrupted run: one line, exit 130.
"""

import sys


def main() -> int:
    try:
        from vitport.cli import command_line
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: no output was written\n")
        return 130
    return command_line()


if __name__ == "__main__":
    sys.exit(main())
