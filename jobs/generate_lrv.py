"""Job entrypoint of the ``generate_lrv`` stage: ``python -m jobs.generate_lrv --recipe R [--shards SPEC]`` (see jobs/_main.py)."""

import sys

from jobs._main import main

if __name__ == "__main__":
    sys.exit(main("generate_lrv"))
