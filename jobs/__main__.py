"""The job entrypoint of every stage: ``python -m jobs <stage> --recipe R [options]`` (see jobs/_main.py).

One entrypoint for all stages: a stage is its module plus its line in ``libcurate/registry.py``; the Argo
templates run ``python -m jobs <stage>``.
"""

import sys

from jobs._main import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print("usage: python -m jobs <stage> --recipe R [--prefix P] [--stage-id ID] [--shards SPEC] ...",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
