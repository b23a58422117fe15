"""The paper as stated: patch centres drawn by its 1:1 rule, and the settings table of docs/method.md
against the paper preset."""
from pathlib import Path

import numpy as np

import al_loop
import data

WINDOW_HU = (-21, 189)
N = 4000                     # draws per check; 4 binomial standard deviations as the tolerance


def two_class_label():
    """20^3 = 8000 voxels: class 1 (liver) 900 voxels, class 2 (tumour) 100, the rest background."""
    label = np.zeros((20, 20, 20), np.uint8)
    label[2:11, 2:12, 2:12] = 1          # 9 x 10 x 10
    label[14:18, 14:19, 14:19] = 2       # 4 x 5 x 5
    assert (label == 1).sum() == 900 and (label == 2).sum() == 100
    return label


def centre_labels(label, fg_fraction, seed=0, **kw):
    """The label at the centre of N patches of 1 voxel (a 1-voxel patch is its centre)."""
    rng = np.random.default_rng(seed)
    image = np.zeros(label.shape, np.float32)
    fg_index = data.foreground_index(label)
    return np.array([data.sample_patch(image, label, (1, 1, 1), fg_fraction, rng, WINDOW_HU, fg_index, **kw)[1][0, 0, 0]
                     for _ in range(N)])


def near(share, p):
    return abs(share - p) < 4 * np.sqrt(p * (1 - p) / N)


def test_foreground_centres_are_uniform_over_foreground_voxels():
    """The paper's 1:1 (as MONAI's RandCropByPosNegLabeld): tumour centres in proportion to tumour voxels."""
    got = centre_labels(two_class_label(), 1.0)
    assert (got > 0).all()
    assert near((got == 2).mean(), 0.1), f"tumour share {(got == 2).mean():.3f}, expected 100 / 1000"


def test_by_class_centres_balance_the_classes():
    """Beyond the paper: a present class first, uniformly, so the small tumour gets half the centres."""
    got = centre_labels(two_class_label(), 1.0, by_class=True)
    assert (got > 0).all()
    assert near((got == 2).mean(), 0.5), f"tumour share {(got == 2).mean():.3f}, expected 0.5"


def test_background_centres_land_on_background():
    label = two_class_label()
    assert (centre_labels(label, 0.0) == 0).all()
    assert near((centre_labels(label, 0.5) > 0).mean(), 0.5)


def test_no_fg_fraction_means_anywhere():
    """The proxy's random patches: the label is ignored, foreground gets its share of the volume (1000 / 8000)."""
    got = centre_labels(two_class_label(), None)
    assert near((got > 0).mean(), 1000 / 8000) and near((got == 2).mean(), 100 / 8000)


def test_a_label_without_foreground_or_background_gives_any_voxel():
    rng = np.random.default_rng(1)
    image = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)    # the voxel's flat index as its HU
    seen = set()
    for label, fg in ((np.zeros((6, 5, 4), np.uint8), 1.0), (np.ones((6, 5, 4), np.uint8), 0.0)):
        for _ in range(600):
            patch, _ = data.sample_patch(image, label, (1, 1, 1), fg, rng, (0, 6 * 5 * 4))
            seen.add(round(float(patch[0, 0, 0]) * 120))
    assert len(seen) == 6 * 5 * 4, "every voxel can be a centre"


def test_the_same_seed_gives_the_same_centres():
    label = two_class_label()
    assert np.array_equal(centre_labels(label, 0.5, seed=7), centre_labels(label, 0.5, seed=7))
    assert not np.array_equal(centre_labels(label, 0.5, seed=7), centre_labels(label, 0.5, seed=8))

# ----------------------------------------------------------------------------- docs/method.md against PAPER


def table_rows(heading):
    """(field, value, what) of each row that names a Config field, in the table under `### heading` of
    docs/method.md."""
    text = (Path(__file__).parents[1] / "docs" / "method.md").read_text(encoding="utf-8")
    assert f"### {heading}" in text, f"docs/method.md: no section '### {heading}'"
    section = text.split(f"### {heading}")[1].split("\n### ")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|")]
    header = rows[0]
    assert {"what", "field", "value"} <= set(header), \
        f"docs/method.md, {heading}: the table needs what, field and value columns, has {header}"
    f, v, w = header.index("field"), header.index("value"), header.index("what")
    return [(r[f].strip("`"), r[v].strip("`"), r[w]) for r in rows[2:] if r[f].strip("`")]


def as_text(value):
    """A value as the table writes it: tuples comma-joined (also "100,150"), numbers as floats."""
    if isinstance(value, str) and "," in value:
        value = value.split(",")
    if isinstance(value, (tuple, list)):
        return ",".join(as_text(x) for x in value)
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


def check_against_paper_preset(rows, heading):
    missing = [f for f, _, _ in rows if not hasattr(al_loop.PAPER, f)]
    assert not missing, (f"docs/method.md, {heading}: al_loop.Config has no field {', '.join(missing)} "
                         "(add it to Config, or correct the table)")
    for field, value, what in rows:
        got = getattr(al_loop.PAPER, field)
        assert as_text(got) == as_text(value), \
            f"docs/method.md, {heading}, {what}: {field} = {value}, but al_loop.PAPER holds {got!r}"


def test_the_stated_settings_match_the_paper_preset():
    rows = table_rows("Stated by the paper")
    assert len(rows) >= 19, f"only {len(rows)} rows of the stated table name a Config field"
    check_against_paper_preset(rows, "Stated by the paper")


def test_our_choices_match_the_paper_preset():
    rows = table_rows("Not stated by the paper: our choice, with its source")
    assert {"semi_steps", "batch_size"} <= {f for f, _, _ in rows}
    check_against_paper_preset(rows, "Not stated by the paper")
