"""The shapes a duplicate search produces: what the command prints, --json carries and the page shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gpl_cli.analysis.duplicates.calibrate import Calibration
    from gpl_cli.store.moves import Outcome


@dataclass
class Member:
    """One image of a group."""

    path: str
    row: int
    score: float  # its highest similarity to another member of its group (1.0 for exact copies)
    keep: bool = False  # the one kept under --keep (exactly one per group when a keep rule is given)
    exact: bool = False  # another member of its group has identical bytes
    other: bool = False  # with --against: a row of the second file (then `row` indexes that file)
    file: str | None = None  # where the image file is now; None when it is not found


@dataclass
class Group:
    members: list[Member]  # in row order (rows of the first file before those of the second)
    pairs: list[tuple[int, int, float]]  # (member index, member index, score): which image matched which
    exact: bool = False  # identical bytes (content hash), found before any vector is compared


@dataclass
class Threshold:
    value: float
    source: str  # in words, shown on stderr, in --json and on the page


@dataclass
class Duplicates:
    """What `find_duplicates` returns; the command prints it, the page shows it."""

    file: str
    key: str
    threshold: Threshold
    groups: list[Group]
    best: np.ndarray  # float32, each row's best score to another row (the histogram), NaN if no other
    # (past exact search's size, only a sample of rows is measured: NaN for the others; groups.BEST_SAMPLE)
    near_misses: list[tuple[str, str, float]]  # pairs just below the threshold (path, path, score), best first
    against: str | None = None  # the second file with --against (then pair b indexes it)
    calibration: Calibration | None = None  # the calibration the threshold came from, when one was used
    keep_rule: str | None = None  # the --keep rule the members' `keep` marks follow
    notes: list[str] = field(default_factory=list)  # what the search could not do, said once each
    moves: Outcome | None = None  # with --move-to: what was moved, and what was not and why
