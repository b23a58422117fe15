"""What one query asks the annotator for, Algorithm 1's unit of Tl: a whole pool case (Volume: --query volume, the
paper) or a box of one (Box: --query patch, region-level active learning with partial labels, after nnActive, Lüth
et al., TMLR 2025). Code asks a unit what it is (`unit.case`, `unit.whole`), never a flag. Run files hold units as
text, and this module is the one place that writes and reads it: a case id, or "<case>@x,y,z" for a box.

A unit of another shape (2D slices, say) is a class here with `case`, `whole` and its text; Queries (queries.py)
sizes, scores and labels it, and the annotation writer (annotate.py) shows it.
"""
import re
from dataclasses import dataclass

BOX_TEXT = re.compile(r"(.+)@(\d+),(\d+),(\d+)")


@dataclass(frozen=True)
class Volume:
    """A whole pool case, the paper's unit."""
    case: str
    whole = True                    # labeled everywhere once acquired

    def __str__(self) -> str:
        return self.case


@dataclass(frozen=True)
class Box:
    """A box of a pool case: `start` (x, y, z), its first voxel on the case's training grid (Cases.image: resampled,
    cut to the body box); its size is the run's --query-vox, clamped to the case (Queries.size)."""
    case: str
    start: tuple
    whole = False                   # labeled inside the box only: a partial label

    def __str__(self) -> str:
        return f"{self.case}@{','.join(str(int(v)) for v in self.start)}"


def parse(text: str) -> Volume | Box:
    """A unit from its text in a run file: "<case>@x,y,z" is a Box, anything else a Volume."""
    m = BOX_TEXT.fullmatch(text)
    return Box(m.group(1), tuple(int(v) for v in m.groups()[1:])) if m else Volume(text)


def box(case: str, start) -> Box:
    """The Box of `case` starting at voxel `start` ((3,) ints of any type)."""
    return Box(case, tuple(int(v) for v in start))
