"""Job entrypoint of the ``judge_score`` stage: ``python -m jobs.judge_score --recipe R [--shards SPEC]`` (see jobs/_main.py)."""

import sys

from jobs._main import main

if __name__ == "__main__":
    sys.exit(main("judge_score"))
