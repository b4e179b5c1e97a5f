"""Job entrypoint of the ``select`` stage: ``python -m jobs.select --recipe R [--shards SPEC]`` (see jobs/_main.py)."""

import sys

from jobs._main import main

if __name__ == "__main__":
    sys.exit(main("select"))
