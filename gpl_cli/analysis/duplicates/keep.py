"""Which image of a duplicate group to keep: one rule for every group, ties broken by the stored path.

- largest: the most pixels, then the most bytes (a half-size copy saved at high quality can outweigh its
  original on disk; its pixels cannot);
- smallest: the fewest pixels, then the fewest bytes;
- oldest / newest: the earliest / latest modification time;
- first: the earliest row of the file (the order the images were embedded in).

Bytes and times are the ones recorded when the file was embedded (the file's stats), so the choice does not
change when files are moved aside; only pixels are read from the images, from their headers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from gpl_cli.analysis.duplicates.model import Group, Member
from gpl_cli.errors import GplError

RULES = ("largest", "smallest", "oldest", "newest", "first")


@dataclass(frozen=True)
class Facts:
    pixels: int
    size: int  # bytes
    mtime_ns: int


def _pixels(path: str) -> int:
    from PIL import Image

    with Image.open(path) as im:  # reads the header only
        return im.size[0] * im.size[1]


def facts(path: str | None, stats: tuple[int, int], need_pixels: bool) -> Facts:
    """An image's facts: size and time as recorded when it was embedded (else as the file is now), pixels
    from its header. `path`: where the image is now, None when it is not found (OSError when needed)."""
    size, mtime = stats
    if size < 0 or mtime < 0:
        if path is None:
            raise FileNotFoundError("not found, and its size and time were not recorded")
        st = os.stat(path)
        size, mtime = st.st_size, st.st_mtime_ns
    if need_pixels and path is None:
        raise FileNotFoundError("not found")
    return Facts(_pixels(path) if need_pixels else 0, size, mtime)


def _order(rule: str) -> Callable[[Member, Facts], tuple]:
    """The sort key whose least element is the image to keep."""
    return {
        "largest": lambda m, f: (-f.pixels, -f.size, m.path),
        "smallest": lambda m, f: (f.pixels, f.size, m.path),
        "oldest": lambda m, f: (f.mtime_ns, m.path),
        "newest": lambda m, f: (-f.mtime_ns, m.path),
        "first": lambda m, f: (m.row, m.path),
    }[rule]


def mark_keep(groups: list[Group], rule: str, look: Callable[[Member, bool], Facts]) -> None:
    """Mark one member of each group as kept under `rule`; `look(member, need_pixels)` gives its facts (it
    raises OSError when the image cannot be read, which becomes one clear refusal)."""
    if rule not in RULES:
        raise GplError(f"unknown --keep rule {rule!r}; valid: {', '.join(RULES)}")
    need_pixels = rule in ("largest", "smallest")
    order = _order(rule)
    for group in groups:
        keys = []
        for m in group.members:
            try:
                f = look(m, need_pixels) if rule != "first" else Facts(0, 0, 0)
            except Exception as exc:  # any failure to read an image (PIL raises more than OSError)
                what = "size in pixels" if need_pixels else "size and time"
                raise GplError(f"--keep {rule} needs each image's {what}, and {m.path} cannot be read "
                               f"({getattr(exc, 'strerror', None) or exc}); --images DIR names the folder of "
                               "the images, --keep first needs none") from None
            keys.append(order(m, f))
        best = min(range(len(group.members)), key=keys.__getitem__)
        for i, m in enumerate(group.members):
            m.keep = i == best
