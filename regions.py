"""Query regions, not whole scans: the building blocks of patch-level active learning with partial labels
(nnActive, Lüth et al., TMLR 2025).

A box is a (start, size) pair of voxel triples: voxels start[i] <= v[i] < start[i] + size[i] on each axis.
- box_scores, top_boxes: the boxes of highest mean score (uncertainty) of a per-voxel map, never overlapping.
- label_centres, random_boxes: nnActive's foreground-aware random baselines, random-label and random-label2.
- partial_label: what the annotator returns for a set of boxes, IGNORE (losses.py) everywhere else.
- aubc: area under the Dice-against-annotated-voxels curve, one number per strategy.

This file ports on its own: it imports only numpy and scipy.
"""
import numpy as np
import scipy.ndimage as ndi

# ----------------------------------------------------------------------------- scoring boxes


def clamp_box(box, shape) -> np.ndarray:
    """The size of a box of `box` voxels inside a volume of `shape`: (3,) int64, each side at most the volume's."""
    box = np.broadcast_to(np.asarray(box, dtype=np.int64), (len(shape),))
    if (box < 1).any():
        raise ValueError(f"box {tuple(box.tolist())}: each side must be at least 1 voxel")
    return np.minimum(box, shape)


def box_starts(n: int, b: int, step: int) -> np.ndarray:
    """Starts of boxes of side b along an axis of n voxels, `step` apart; the last box ends at the edge."""
    starts = np.arange(0, n - b + 1, step)
    return starts if starts[-1] == n - b else np.append(starts, n - b)


def box_scores(score_map: np.ndarray, box, stride=None) -> tuple:
    """Mean of `score_map` over every candidate box, in O(voxels).

    score_map: (X, Y, Z) finite float, e.g. a per-voxel uncertainty. box: int or (3,) voxels, clamped to the
    volume. stride: int or (3,) voxels between box starts; default a quarter box per axis (ceil(b / 4), at
    least 1). Along each axis the last box ends at the volume's edge.
    Returns starts (N, 3) int64 (x slowest, z fastest) and means (N,) float64.
    """
    m = np.asarray(score_map, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"score_map must be (X, Y, Z), got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("score_map holds NaN or inf; a cumulative sum would spread it to every later box")
    size = clamp_box(box, m.shape)
    step = -(-size // 4) if stride is None else np.broadcast_to(np.asarray(stride, dtype=np.int64), (3,))
    if (step < 1).any():
        raise ValueError(f"stride {stride}: must be at least 1 voxel")
    axes = [box_starts(n, b, s) for n, b, s in zip(m.shape, size, step)]
    # A summed-area table (Crow, SIGGRAPH 1984) taken one axis at a time: the sum over [s, s + b) along an
    # axis is c[s + b] - c[s] of the cumulative sum c with a leading 0; after three axes, the box sums.
    sums = m
    for axis, (starts, b) in enumerate(zip(axes, size)):
        c = np.cumsum(sums, axis=axis)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis)), c], axis=axis)
        sums = np.take(c, starts + b, axis) - np.take(c, starts, axis)    # (nx, Y, Z), (nx, ny, Z), ...
    starts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return starts, sums.reshape(-1) / size.prod()


def overlapping(starts: np.ndarray, size, start, other_size) -> np.ndarray:
    """Which boxes (starts (N, 3), one size (3,)) share a voxel with the box (start, other_size): (N,) bool."""
    starts = np.asarray(starts).reshape(-1, 3)
    start, end = np.asarray(start), np.asarray(start) + np.asarray(other_size)
    return ((starts < end) & (start < starts + np.asarray(size))).all(1)


def top_boxes(starts: np.ndarray, means: np.ndarray, box, k: int, taken=()) -> np.ndarray:
    """Greedy: the box of highest mean first, then the next that overlaps no box chosen or taken.

    starts (N, 3), means (N,) from box_scores; box (3,) their size (the unclamped size chooses the same
    boxes: along an axis the box fills, every box starts at 0). taken: (start, size) pairs already
    annotated. Ties keep the order of `starts`; a NaN mean is never chosen.
    Returns the chosen starts (m, 3) int64, m <= k (fewer when no more fit).
    """
    starts, means = np.asarray(starts, dtype=np.int64).reshape(-1, 3), np.asarray(means, dtype=np.float64)
    free = np.isfinite(means)
    for start, size in taken:
        free &= ~overlapping(starts, box, start, size)
    chosen = []
    for i in np.argsort(-means, kind="stable"):
        if len(chosen) == k:
            break
        if free[i]:
            chosen.append(i)
            free &= ~overlapping(starts, box, starts[i], box)
    return starts[chosen]

# ----------------------------------------------------------------------------- foreground-aware random boxes

# Probability of a centre drawn (anywhere, on a foreground class, on that class's boundary), from
# nnActive's nnactive/strategies/randomlabel.py (rng.choice of "all", "seg", "border": 1/3 each) and
# randomlabel2.py (4 x "all", "seg", "border" of 6). Its plots call them "Random 66% FG" and "Random 33% FG".
AREAS = {"random-label": (1 / 3, 1 / 3, 1 / 3), "random-label2": (4 / 6, 1 / 6, 1 / 6)}
SIX_NEIGHBOURS = ndi.generate_binary_structure(3, 1)   # the 3x3x3 cross, skimage's ball(1) as nnActive uses


def centre_pools(label: np.ndarray, mask: np.ndarray = None, background: int = 0) -> list:
    """Where centres may fall, per foreground class present: [(voxels, boundary)], flat indices (int64).

    label: (X, Y, Z) integer classes, the annotation (oracle) or a pseudo label (no annotation needed).
    mask: (X, Y, Z) bool body mask or None; only voxels inside it are kept. A class's boundary is its voxels
    with a 6-neighbour of another class: the class minus its erosion by the 6-neighbour cross, as nnActive
    (nnactive/query/get_locs.py, erosion by ball(1)). Departure: nnActive's erosion pads with 0, so a class
    voxel on the volume's edge is boundary there; here the edge is no other class (border_value=1).
    """
    label = np.asarray(label)
    inside = np.ones(label.shape, bool) if mask is None else np.asarray(mask, bool)
    pools = []
    for c in np.unique(label[inside]):
        if c == background:
            continue
        voxels = label == c
        edge = voxels & ~ndi.binary_erosion(voxels, SIX_NEIGHBOURS, border_value=1)
        pools.append((np.flatnonzero(voxels & inside), np.flatnonzero(edge & inside)))
    return pools


def draw_centre(shape, pools: list, areas, rng: np.random.Generator, anywhere: np.ndarray = None) -> np.ndarray:
    """One centre (3,) int64: anywhere, on a foreground class or on its boundary, with probabilities `areas`.

    pools from centre_pools; anywhere: flat indices of the body mask, or None for the whole volume. The
    class is drawn uniformly among those present, then a voxel uniformly within it (as nnActive). With no
    foreground the centre falls anywhere; a class without boundary voxels lends its voxels.
    """
    area = rng.choice(3, p=areas)
    if area == 0 or not pools:
        if anywhere is None:
            return rng.integers(0, shape)
        return np.array(np.unravel_index(anywhere[rng.integers(len(anywhere))], shape))
    voxels, boundary = pools[rng.integers(len(pools))]
    pool = boundary if area == 2 and len(boundary) else voxels
    return np.array(np.unravel_index(pool[rng.integers(len(pool))], shape))


def _centre_sampler(label, areas, mask, background):
    """A function rng -> centre (3,) for label_centres and random_boxes, the pools computed once."""
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be (X, Y, Z), got shape {label.shape}")
    p = np.asarray(AREAS[areas] if isinstance(areas, str) else areas, dtype=np.float64)
    if p.shape != (3,) or (p < 0).any() or not np.isclose(p.sum(), 1):
        raise ValueError(f"areas {areas}: name one of {', '.join(AREAS)} or give 3 probabilities summing to 1")
    anywhere = None
    if mask is not None:
        if np.shape(mask) != label.shape:
            raise ValueError(f"body mask shape {np.shape(mask)} differs from label shape {label.shape}")
        anywhere = np.flatnonzero(mask)
        if not len(anywhere):
            raise ValueError("the body mask is empty: no voxel to centre a box on")
    pools = centre_pools(label, mask, background)
    return lambda rng: draw_centre(label.shape, pools, p / p.sum(), rng, anywhere)


def label_centres(label: np.ndarray, n: int, rng: np.random.Generator, areas="random-label",
                  mask: np.ndarray = None, background: int = 0) -> np.ndarray:
    """n random centres (n, 3) int64 of nnActive's random-label or random-label2 (see AREAS).

    label: (X, Y, Z) integer classes (oracle or pseudo label); areas: a name of AREAS or 3 probabilities
    (anywhere, foreground, boundary); mask: (X, Y, Z) bool body mask or None.
    Departure from nnActive: "anywhere" is a centre uniform over the volume (or body mask), where nnActive
    draws a box start uniformly, which visits the edges less.
    """
    sample = _centre_sampler(label, areas, mask, background)
    return np.array([sample(rng) for _ in range(n)], dtype=np.int64).reshape(n, 3)


def box_around(centre, size, shape) -> np.ndarray:
    """Start (3,) int64 of the box of `size` (clamped) centred on `centre`, shifted inside the volume."""
    # As nnActive's _obtain_random_patch_from_locs (start = centre - size // 2, shifted inside), except that
    # its test lets an odd-sized box end one voxel past the edge; np.clip keeps every box inside.
    size = clamp_box(size, shape)
    return np.clip(np.asarray(centre) - size // 2, 0, np.asarray(shape) - size)


def random_boxes(label: np.ndarray, box, k: int, rng: np.random.Generator, areas="random-label",
                 mask: np.ndarray = None, taken=(), tries: int = 600, background: int = 0) -> np.ndarray:
    """k boxes of `box` voxels around random centres (label_centres), none overlapping another or `taken`.

    taken: (start, size) pairs already annotated. Each box gets up to `tries` centres (nnActive's
    trials_per_img default, 600); when none fits, the volume is full enough and the boxes so far are returned.
    Returns starts (m, 3) int64, m <= k; their size is clamp_box(box, label.shape).
    Departures from nnActive: one volume at a time (nnActive moves on to the next image), and a volume
    without foreground draws its centres anywhere instead of being skipped.
    """
    sample = _centre_sampler(label, areas, mask, background)
    size = clamp_box(box, np.shape(label))
    held = [(np.asarray(s), np.asarray(z)) for s, z in taken]
    chosen = []
    while len(chosen) < k:
        for _ in range(tries):
            start = box_around(sample(rng), size, np.shape(label))
            if not any(overlapping(start, size, s, z)[0] for s, z in held):
                break
        else:
            break
        chosen.append(start)
        held.append((start, size))
    return np.array(chosen, dtype=np.int64).reshape(-1, 3)

# ----------------------------------------------------------------------------- annotation and evaluation


def partial_label(label: np.ndarray, boxes, ignore: int) -> np.ndarray:
    """The label known only inside `boxes` ((start, size) pairs), `ignore` elsewhere: (X, Y, Z).

    ignore: the unannotated value the loss skips (losses.IGNORE); the dtype widens if it does not fit.
    """
    label = np.asarray(label)
    if (label == ignore).any():
        raise ValueError(f"the label already holds the ignore value {ignore}; pick another ignore value")
    out = np.full(label.shape, ignore, dtype=np.promote_types(label.dtype, np.min_scalar_type(ignore)))
    for start, size in boxes:
        start, size = np.asarray(start), np.asarray(size)
        if (start < 0).any() or (start >= label.shape).any() or (size < 1).any():
            raise ValueError(f"box start {start.tolist()} size {size.tolist()} lies outside {label.shape}")
        box = tuple(slice(a, a + b) for a, b in zip(start, size))
        out[box] = label[box]
    return out


def aubc(voxels, dice, lo: float = None, hi: float = None) -> float:
    """Area under the Dice-against-annotated-voxels curve over [lo, hi], divided by hi - lo: in [0, 1].

    voxels (n,) annotated voxels at each point, dice (n,) the Dice there; the trapezoid rule between points,
    linear interpolation at lo and hi (default: the first and last budget). A constant curve gives the
    constant. The area under the budget curve (AUBC) of Zhan et al., "A comparative survey: benchmarking
    for pool-based active learning" (IJCAI 2021), with annotated voxels as the budget.
    """
    x, y = np.asarray(voxels, dtype=np.float64), np.asarray(dice, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"voxels {x.shape} and dice {y.shape}: need two 1-D arrays of the same length >= 2")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if (np.diff(x) <= 0).any() or not np.isfinite(y).all():
        raise ValueError("voxels must be distinct and every dice finite")
    lo, hi = x[0] if lo is None else lo, x[-1] if hi is None else hi
    if not x[0] <= lo < hi <= x[-1]:
        raise ValueError(f"budget range [{lo}, {hi}] must lie within the curve's [{x[0]}, {x[-1]}], lo < hi")
    grid = np.concatenate([[lo], x[(x > lo) & (x < hi)], [hi]])
    values = np.interp(grid, x, y)
    return float(((values[1:] + values[:-1]) / 2 * np.diff(grid)).sum() / (hi - lo))
