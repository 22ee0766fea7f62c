"""The folder of photos the benchmarks run on, chosen the same way by each of them.

The figures in bench/RESULTS.md were measured on labeled_photos (194 photos) in the shared data folder
beside the repository. A checkout without it runs on the 60 of them bundled for the tests: enough for
every benchmark to run, not for figures comparable with those.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "labeled_photos"))
BUNDLED = os.path.join(REPO, "tests", "data", "labeled_photos")


def find_photos(given: str | None, script: str) -> str:
    """`given` when it is a folder; without one, the shared photos, or else the bundled ones with a note on
    stderr. A `given` that is no folder ends the script with one line and exit status 2."""
    if given is not None:
        if not os.path.isdir(given):
            print(f"{script}: {given} is not a folder of images", file=sys.stderr)
            raise SystemExit(2)
        return given
    if os.path.isdir(SHARED):
        return SHARED
    print(f"{script}: note: no {SHARED}; running on the photos bundled in {os.path.relpath(BUNDLED, REPO)} "
          "(fewer: figures not comparable with bench/RESULTS.md)", file=sys.stderr)
    return BUNDLED
