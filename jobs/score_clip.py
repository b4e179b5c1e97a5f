"""Job entrypoint of the ``score_clip`` stage: ``python -m jobs.score_clip --recipe R [--shards SPEC]`` (see jobs/_main.py)."""

import sys

from jobs._main import main

if __name__ == "__main__":
    sys.exit(main("score_clip"))
