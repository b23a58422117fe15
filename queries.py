"""What one query asks the annotator for, Algorithm 1's unit (units.py): a whole pool case (--query volume, the
paper) or a box of --query-vox voxels inside one pool case (--query patch: region-level active learning with
partial labels, after nnActive, Lüth et al., TMLR 2025). Tl is a list of units; a Box starts at a voxel of the
case's training grid (Cases.image(case), the body box with --crop body). A Volume is the special case "a box over
the whole case", and volume runs keep the paper's code paths: whole cases, whole labels.

- scores of a case, under a model: the floats of proxy_al.mc_scores (volume mode), and in patch mode the mean
  of each per-voxel map over every candidate box (regions.box_scores, a quarter box apart);
- `ranked`: {unit: score} of what may still be queried; `top`: the k best that overlap nothing taken;
- `draw`: the random queries (uniform in the body, or nnActive's foreground-favouring random);
- `volumes`: Tl (or the noisy labels Tn) as training volumes, partial labels IGNORE outside their boxes;
- `budget`: the voxels annotated so far and how many of them are foreground.
"""
import numpy as np

import regions
import units
from data import foreground_index
from losses import IGNORE
from strategies import MC_MEASURES


class Queries:
    """The units of one run: whole cases, or (`patch`, --query patch) boxes of `vox` voxels (the size asked for,
    clamped to each case's grid)."""

    def __init__(self, cfg, cases):
        self.patch, self.vox, self.cases = cfg.query == "patch", tuple(cfg.query_vox), cases
        self._shapes = {}

    def shape(self, cid):
        """The shape of a case's training grid, Cases.image(cid) (read once)."""
        if cid not in self._shapes:
            self._shapes[cid] = tuple(int(n) for n in self.cases.image_hu(cid).shape)
        return self._shapes[cid]

    def size(self, cid):
        """(3,) int64: the box of a query in `cid`, each side at most the case's."""
        return regions.clamp_box(self.vox, self.shape(cid))

    def box(self, unit):
        """(case, start, size) of a unit; a whole case is one box from 0 over its grid."""
        if unit.whole:
            return unit.case, np.zeros(3, np.int64), np.array(self.shape(unit.case))
        return unit.case, np.array(unit.start, np.int64), self.size(unit.case)

    def of(self, case):
        """The unit a whole case is (line 5 and lines 12-16 of a volume run, the all-data reference)."""
        return units.Volume(case)

    def unlabeled(self, labeled):
        """The pool cases with a unit not in `labeled`: cases not labeled whole (patch mode: every case, whose
        free boxes the scores find)."""
        return [c for c in self.cases.pool if self.of(c) not in labeled]

    def boxes(self, units):
        """{case: [(start, size)]} of `units`."""
        out = {}
        for u in units:
            cid, start, size = self.box(u)
            out.setdefault(cid, []).append((start, size))
        return out

    # --- scores

    def case_scores(self, cid, scores):
        """What the run keeps of a case's mc_scores (with return_maps in patch mode): the floats, and in patch
        mode "boxes": the candidate boxes' starts and the mean of each measure's map over them (JSON-ready)."""
        out = {m: scores[m] for m in MC_MEASURES}
        if self.patch:
            boxes = {}
            for m in MC_MEASURES:
                starts, boxes[m] = regions.box_scores(scores["maps"][m], self.size(cid))
                boxes[m] = boxes[m].tolist()
            out["boxes"] = {"starts": starts.tolist(), **boxes}
        return out

    def ranked(self, scores, measure, taken=(), lowest=False):
        """{unit: score} of every unit that may still be queried, from {case: case_scores}: a case not in
        `taken` (volume mode), or a candidate box overlapping no box taken (patch mode). lowest: negated (the
        most certain first)."""
        sign = -1.0 if lowest else 1.0
        if not self.patch:
            return {u: sign * s[measure] for u, s in ((self.of(c), s) for c, s in scores.items()) if u not in taken}
        held, out = self.boxes(taken), {}
        for cid, s in scores.items():
            starts, means = np.asarray(s["boxes"]["starts"], np.int64).reshape(-1, 3), np.asarray(s["boxes"][measure])
            free = np.ones(len(starts), bool)
            for start, size in held.get(cid, ()):
                free &= ~regions.overlapping(starts, self.size(cid), start, size)
            out.update({units.box(cid, st): sign * float(m) for st, m in zip(starts[free], means[free])})
        return out

    def top(self, scores, k, taken=()):
        """Lines 5, 13 and 16: the k units of highest score (stable on ties) not in `taken`; in patch mode
        greedily, each overlapping no box taken or chosen before it (regions.top_boxes across the pool)."""
        chosen, held = [], self.boxes(taken) if self.patch else {}
        for u in sorted((u for u in scores if u not in taken), key=lambda u: -scores[u]):
            if len(chosen) == k:
                break
            if self.patch:
                cid, start, size = self.box(u)
                if any(regions.overlapping(start, size, s, z)[0] for s, z in held.get(cid, ())):
                    continue
                held.setdefault(cid, []).append((start, size))
            chosen.append(u)
        return chosen

    # --- random queries

    def draw(self, k, rng, taken=(), areas=None, labels=None):
        """k random boxes (patch mode), {unit: score} in the order drawn (the first scores highest), none
        overlapping another or `taken`. Each is in a pool case drawn uniformly; its centre is uniform in the
        case's body (voxels above the window's low end: the body box's rule) when areas is None, else drawn
        by nnActive's foreground-favouring rule (regions.AREAS[areas]) on labels(cid): the annotation (an
        oracle) or the proxy's pseudo label (no annotation needed). A case with no room left is passed over."""
        held, chosen, cases = self.boxes(taken), [], list(self.cases.pool)
        while len(chosen) < k and cases:
            cid = cases[rng.integers(len(cases))]
            body = np.asarray(self.cases.image_hu(cid)) > self.cases.window_hu[0]
            label = np.zeros(self.shape(cid), np.uint8) if areas is None else np.asarray(labels(cid))
            starts = regions.random_boxes(label, self.vox, 1, rng, areas or (1.0, 0.0, 0.0),
                                          mask=body if body.any() else None, taken=held.get(cid, []))
            if not len(starts):
                cases.remove(cid)
                continue
            held.setdefault(cid, []).append((starts[0], self.size(cid)))
            chosen.append(units.box(cid, starts[0]))
        return {u: float(k - i) for i, u in enumerate(chosen)}

    # --- labels

    def volumes(self, labeled, labels=None):
        """Training volumes (image_hu, label, foreground index) of the units `labeled`, one per case in case order. A
        whole case: its annotation (Cases.labeled_volume), or labels[case] (a noisy label on image(case)). Boxes: the
        annotation (or labels[case]) inside them and IGNORE elsewhere, on image(case): a partial label, whose
        patches are centred on annotated voxels (data.foreground_index)."""
        out = []
        for cid, boxes in sorted(self.boxes(labeled).items()):
            if all(u.whole for u in labeled if u.case == cid):
                out.append(self.cases.labeled_volume(cid, None if labels is None else labels[cid]))
                continue
            known = self.cases.label(cid)[self.cases.box(cid)] if labels is None else labels[cid]
            label = regions.partial_label(np.asarray(known), boxes, IGNORE)
            out.append((self.cases.image_hu(cid), label, foreground_index(label)))
        return out

    def pool_voxels(self):
        """The pool's voxels on the training grids, the whole a run of boxes could annotate (results.csv's
        pct_labeled is the share annotated); None in volume mode, whose share counts cases."""
        return self.budget(map(self.of, self.cases.pool), foreground=False)[0] if self.patch else None

    def kept_scores(self, scores, acquired):
        """What a record keeps of an acquisition's {unit: score}: every unit's in volume mode (a case each),
        the acquired ones' in patch mode (there are thousands of candidate boxes)."""
        return {u: scores[u] for u in acquired} if self.patch else scores

    def budget(self, units, foreground=True):
        """(voxels annotated, foreground voxels among them) of `units` on the training grids (foreground 0
        without reading a label when `foreground` is False)."""
        voxels = fg = 0
        for cid, boxes in self.boxes(units).items():
            if not foreground:
                voxels += sum(int(np.prod(size)) for _, size in boxes)
                continue
            label = np.asarray(self.cases.label(cid)[self.cases.box(cid)])
            for start, size in boxes:
                inside = label[tuple(slice(a, a + b) for a, b in zip(start, size))]
                voxels, fg = voxels + inside.size, fg + int((inside > 0).sum())
        return voxels, fg
