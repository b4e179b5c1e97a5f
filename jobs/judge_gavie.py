"""Job entrypoint of the ``judge_gavie`` stage: ``python -m jobs.judge_gavie --recipe R [--shards SPEC]`` (see jobs/_main.py)."""

import sys

from jobs._main import main

if __name__ == "__main__":
    sys.exit(main("judge_gavie"))
