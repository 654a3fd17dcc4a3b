"""`python -m stream` and the `agestream` script: the CLI, quiet if Ctrl-C comes while the
modules it needs are still importing (before it can handle signals itself)."""

import os
import sys

EXIT_INTERRUPTED = 130


def main() -> int:
    try:
        from stream.cli import main as cli_main

        code = cli_main()
    except KeyboardInterrupt:
        print("agestream: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:
        # CPython ends by SIGINT (status -2) once a KeyboardInterrupt has escaped code that an
        # extension module ran, even when it was handled later; every output is closed by
        # now, so end here with the documented status.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
