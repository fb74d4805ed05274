"""Run `brainrank` error cases in one process, each with its own real stderr (file descriptor 2
redirected to a file, so that Prefect's console handler is captured too).

Usage: ``python tests/_error_paths.py CASES.json RESULTS.json`` where CASES.json maps a case
name to its argv; RESULTS.json gets, per case, the exit code and the stderr text.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def _run(argv: list[str]) -> tuple[int, str]:
    from flows.cli import main

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2), os.dup(1)
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        os.dup2(err.fileno(), 2)
        os.dup2(out.fileno(), 1)
        try:
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse errors
                code = exc.code
            except BaseException as exc:  # an escaped exception: report it as Python would
                import traceback

                traceback.print_exc()
                code = f"raised {type(exc).__name__}"
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 2)
            os.dup2(saved[1], 1)
            for fd in saved:
                os.close(fd)
        err.seek(0)
        return code, err.read().decode(errors="replace")


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    results = {name: dict(zip(("code", "stderr"), _run(argv))) for name, argv in cases.items()}
    with open(sys.argv[2], "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
