"""The paper as stated: patch centres drawn by its 1:1 rule, and the settings tables of docs/method.md
against the paper preset. Where the paper is silent the preset follows the first author's tutorial; each such
option set to the other value gives the behaviour without it, and the seed's strategies are paired."""
import itertools
import json
from pathlib import Path
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import al_loop
import data
import study
import tiny
from proxy_al import enable_mc_dropout, mc_scores, noisy_label, sliding_window
from train import PatchStream, Stage, StageClock, supervised_loss
from unet import UNet
import train


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
    draw = lambda: train.sample_patch(image, label, (1, 1, 1), fg_fraction, rng, WINDOW_HU, fg_index, **kw)[1]
    return np.array([draw()[0, 0, 0] for _ in range(N)])


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
            patch, _ = train.sample_patch(image, label, (1, 1, 1), fg, rng, (0, 6 * 5 * 4))
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
    assert {"semi_steps", "batch_size", "fg_draw"} <= {f for f, _, _ in rows}
    check_against_paper_preset(rows, "Not stated by the paper")


def test_beyond_the_paper_names_options_that_leave_the_paper_preset():
    """Each `--flag value` of the third table parses, and its value is not the paper preset's."""
    import re
    text = (Path(__file__).parents[1] / "docs" / "method.md").read_text(encoding="utf-8")
    section = text.split("### Beyond the paper")[1].split("\n## ")[0]
    flags = re.findall(r"`--([a-z-]+) ([^`]+)`", section)
    assert len(flags) >= 8, flags
    for flag, value in flags:
        field = flag.replace("-", "_")
        assert hasattr(al_loop.PAPER, field), f"docs/method.md, beyond the paper: --{flag} is no Config field"
        if value == "N":
            continue
        cfg = al_loop.parse_args(["--data", "MSD_Task03", f"--{flag}", value])[0]
        assert as_text(getattr(cfg, field)) != as_text(getattr(al_loop.PAPER, field)), f"--{flag} {value}"


TUTORIAL = "active_learning/liver_tumor_al/active_learning.py"
FROM_TUTORIAL = {"patches_per_case", "crop", "keep", "val_every", "variance_classes", "batch_size"}


def test_the_tutorials_settings_are_our_choices_and_name_the_file():
    text = (Path(__file__).parents[1] / "docs" / "method.md").read_text(encoding="utf-8")
    section = text.split("### Not stated by the paper")[1].split("\n### ")[0]
    rows = {f: line for line in section.splitlines() for f in FROM_TUTORIAL
            if line.startswith("| ") and f"`{f}`" in line}
    assert set(rows) == FROM_TUTORIAL, f"docs/method.md: no our-choice row for {FROM_TUTORIAL - set(rows)}"
    for field, line in rows.items():
        assert "first author's tutorial" in line, f"docs/method.md, {field}: the row should name its source"
    assert TUTORIAL in text
    assert "`head_init`" in text.split("### Stated by the paper")[1].split("\n### ")[0]


def test_the_demo_departs_only_with_a_reason():
    """The demo keeps one patch per case (minutes on a CPU); its comment says why."""
    source = (Path(__file__).parents[1] / "al_loop.py").read_text(encoding="utf-8")
    assert al_loop.DEMO.patches_per_case == 1 and "one patch per case" in source
    for field in ("crop", "keep", "variance_classes"):
        assert getattr(al_loop.DEMO, field) == getattr(al_loop.PAPER, field), field

# ----------------------------------------------------------------------------- MC variance


def tiny_net(classes=3, dropout=0.3, seed=0):
    torch.manual_seed(seed)
    return UNet(1, classes, (4, 8, 8, 8, 8), dropout)


def stored_passes(net, image, m, roi, seed):
    """The m MC passes mc_scores draws under torch seed `seed`: (m, C, X, Y, Z) float32 numpy."""
    torch.manual_seed(seed)
    enable_mc_dropout(net)
    passes = [sliding_window(net, image, roi, 0.25, 1)[0].numpy() for _ in range(m)]
    net.eval()
    return np.stack(passes)


@pytest.mark.parametrize("classes", [2, 3])
def test_variance_over_all_classes_is_the_plain_variance(classes):
    """--variance-classes all: the variance over the passes of every class's softmax, summed, mean over voxels."""
    net, image = tiny_net(classes), np.random.default_rng(1).random((20, 18, 33), dtype=np.float32)
    passes = stored_passes(net, image, 4, (16, 16, 32), seed=5)
    torch.manual_seed(5)
    got = mc_scores(net, image, 4, (16, 16, 32), variance_classes="all", return_map=True)
    want = passes.astype(np.float64).var(0).sum(0)
    np.testing.assert_allclose(got["variance_map"], want, rtol=1e-4, atol=1e-9)
    assert got["variance"] == pytest.approx(want.mean(), rel=1e-5)


@pytest.mark.parametrize("classes", [2, 3])
def test_foreground_variance_is_the_tutorials(classes):
    """--variance-classes foreground, as the tutorial computes it: softmax per pass, background channel
    dropped, values <= 0 set to 0.0005, variance over the passes, summed over classes, mean over voxels."""
    net, image = tiny_net(classes), np.random.default_rng(2).random((17, 21, 30), dtype=np.float32)
    vol = stored_passes(net, image, 3, (16, 16, 32), seed=7)[:, 1:]
    vol[vol <= 0] = 0.0005
    want = np.nanvar(vol.astype(np.float64), axis=0).sum(0)
    torch.manual_seed(7)
    got = mc_scores(net, image, 3, (16, 16, 32), return_map=True)
    np.testing.assert_allclose(got["variance_map"], want, rtol=1e-4, atol=1e-9)
    assert got["variance"] == pytest.approx(want.mean(), rel=1e-5) and got["variance"] > 0


def test_the_floor_applies_to_probabilities_at_or_below_zero():
    """A class whose softmax underflows to 0 in one pass counts as 0.0005 there (the tutorial's floor)."""
    class Fixed(nn.Module):                                  # logits: background huge in pass 1, then not
        def __init__(self):
            super().__init__()
            self.drop, self.calls, self.weight = nn.Dropout(0.5), 0, nn.Parameter(torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
            logits[:, 0] = 200.0 if self.calls == 1 else 0.0  # softmax of class 1: exactly 0, then 0.5
            return logits + 0 * self.drop(x) + self.weight
    image = np.zeros((8, 8, 8), np.float32)
    got = mc_scores(Fixed(), image, 2, (8, 8, 8), variance_classes="foreground")
    assert got["variance"] == pytest.approx(np.var([0.0005, 0.5]), rel=1e-6)
    got_all = mc_scores(Fixed(), image, 2, (8, 8, 8), variance_classes="all")
    assert got_all["variance"] == pytest.approx(2 * np.var([0.0, 0.5]), rel=1e-6)


def test_mc_scores_warns_without_dropout():
    class NoDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 1)

        def forward(self, x):
            return self.conv(x)
    with pytest.warns(UserWarning, match="no dropout layer with p > 0"):
        scores = mc_scores(NoDropout(), np.zeros((8, 8, 8), np.float32), 2, (8, 8, 8))
    assert scores["variance"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mc_scores(tiny_net(2), np.zeros((16, 16, 32), np.float32), 2, (16, 16, 32))


def test_noisy_label_refuses_logits():
    logits = np.stack([np.full((3, 3, 3), -2.0), np.full((3, 3, 3), 3.0)])
    with pytest.raises(ValueError, match="softmax probabilities"):
        noisy_label(logits)
    probs = torch.from_numpy(logits).softmax(0).numpy()
    assert noisy_label(probs, 0.9).all()

# ----------------------------------------------------------------------------- patches per case


def constant_volumes(n=3, shape=(12, 12, 12)):
    """Volumes whose HU is their index x 10 (so a patch tells its case), label: a foreground cube."""
    label = np.zeros(shape, np.uint8)
    label[3:9, 3:9, 3:9] = 1
    return [(np.full(shape, 10.0 * i, np.float32), label, data.foreground_index(label)) for i in range(n)]


def todays_stream(volumes, patch_vox, fg_fraction, window_hu, seed, n):
    """One patch per drawn case: a case, its patch, its augmentation, in this order from one generator."""
    rng = np.random.default_rng([seed, 0])
    out = []
    for _ in range(n):
        image_hu, label, fg_index = volumes[rng.integers(len(volumes))]
        patch, lab = train.sample_patch(image_hu, label, patch_vox, fg_fraction, rng, window_hu, fg_index=fg_index)
        out.append((train.augment_intensity(patch, rng), lab))
    return out


def test_one_patch_per_case_gives_the_plain_stream():
    volumes = constant_volumes()
    got = list(itertools.islice(iter(PatchStream(volumes, (8, 8, 8), 0.5, (0, 100), 3, patches_per_case=1)), 12))
    want = todays_stream(volumes, (8, 8, 8), 0.5, (0, 100), 3, 12)
    for (image, label), (w_image, w_label) in zip(got, want):
        assert np.array_equal(image[0].numpy(), w_image) and np.array_equal(label[0].numpy(), w_label)


def test_patches_per_case_come_in_groups_of_one_case():
    """4 patches in a row from each drawn case; a case tells itself by its label (all voxels of class i + 1)."""
    shape = (12, 12, 12)
    volumes = [(np.zeros(shape, np.float32), np.full(shape, i + 1, np.uint8)) for i in range(4)]
    volumes = [(image, label, data.foreground_index(label)) for image, label in volumes]
    got = list(itertools.islice(iter(PatchStream(volumes, (8, 8, 8), 0.5, (0, 100), 4, patches_per_case=4)), 40))
    case = [int(label.max()) for _, label in got]                   # padding is 0: the max is the case's class
    groups = [set(case[i:i + 4]) for i in range(0, 40, 4)]
    assert all(len(g) == 1 for g in groups), groups
    assert len(set(case)) > 1, "the groups come from several cases"


# ----------------------------------------------------------------------------- the body box


def body_case(shape=(30, 26, 22)):
    """Air (-1000 HU) around a body block of 20 HU, a liver of 1 inside it and one label voxel in the air."""
    image_hu = np.full(shape, -1000, np.int16)
    image_hu[5:25, 4:20, 3:18] = 20
    label = np.zeros(shape, np.uint8)
    label[10:15, 8:12, 6:9] = 1
    return image_hu, label


def test_body_box_is_the_box_above_the_windows_low_end():
    image_hu, label = body_case()
    box = data.body_box(image_hu, (-21, 189))
    assert box == (slice(5, 25), slice(4, 20), slice(3, 18))
    outside = np.ones(image_hu.shape, bool)
    outside[box] = False
    assert (image_hu[outside] <= -21).all()
    label[2, 2, 20] = 2                                    # foreground in the air extends the box
    assert data.body_box(image_hu, (-21, 189), label) == (slice(2, 25), slice(2, 20), slice(3, 21))
    assert data.body_box(np.full((4, 5, 6), -1000), (-21, 189)) == (slice(0, 4), slice(0, 5), slice(0, 6))


def test_uncrop_puts_the_box_back_with_zeros_outside():
    image_hu, _ = body_case()
    box = data.body_box(image_hu, (-21, 189))
    part = np.arange(np.prod(image_hu[box].shape), dtype=np.float32).reshape(image_hu[box].shape) + 1
    full = data.uncrop(part, box, image_hu.shape)
    assert full.shape == image_hu.shape and full.dtype == np.float32
    assert np.array_equal(full[box], part) and full.sum() == part.sum()


def test_dice_on_the_labeled_box_equals_the_full_grid_dice():
    """Validation on the crop: outside the box the label is background and the prediction counts as
    background, so every class's Dice is the full grid's."""
    from losses import dice_per_class
    image_hu, label = body_case()
    label[1, 1, 1] = 2                                      # a class only outside the body
    box = data.body_box(image_hu, (-21, 189), label)
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, image_hu[box].shape).astype(np.uint8)
    on_box = dice_per_class(pred, label[box], 3)
    on_grid = dice_per_class(data.uncrop(pred, box, label.shape), label, 3)
    np.testing.assert_allclose(on_box, on_grid)
    assert (label[box] > 0).sum() == (label > 0).sum(), "the label is never cut"


def run_tiny(phantom, out, *extra):
    assert al_loop.main(tiny.args(phantom, out, *extra)) == 0
    return tiny.read_states(out)


def test_crop_none_gives_the_cached_volumes_and_body_crops_only_air(phantom, tmp_path):
    plain = study.open_study(al_loop.parse_args(tiny.args(phantom, tmp_path / "a", "--crop", "none"))[0])[0].cases
    body = study.open_study(al_loop.parse_args(tiny.args(phantom, tmp_path / "b"))[0])[0].cases
    for cid in list(plain.files)[:3]:
        full = data.cached_case(plain.files[cid], plain.cache, plain.spacing_mm, with_label=False)[0]
        assert np.array_equal(plain.image_hu(cid), full)
        assert np.array_equal(plain.image(cid), data.window(full, *plain.window_hu))
        box = body.box(cid)
        assert body.image_hu(cid).shape == full[box].shape and np.array_equal(body.image_hu(cid), full[box])
        outside = np.ones(full.shape, bool)
        outside[box] = False
        assert (np.asarray(full)[outside] <= body.window_hu[0]).all()
        image, label = body.labeled_case(cid)
        assert image.shape == label.shape and (label > 0).sum() == (np.asarray(body.label(cid)) > 0).sum()

# ----------------------------------------------------------------------------- the best validated model


class FakeStudy:
    """What al_loop.run_stage reads of a Study."""
    def __init__(self, keep, val_every):
        self.cfg = al_loop.dataclasses.replace(al_loop.PAPER, keep=keep, val_every=val_every, lr=1e-2)
        self.device, self.cases = torch.device("cpu"), type("Cases", (), {"val": ["v"]})()
        self.bar = lambda *a, **kw: type("Quiet", (), {"update": lambda *a, **kw: None})()
        self.clock = StageClock()


def toy_batches(seed=0):
    rng = np.random.default_rng(seed)
    while True:
        image = rng.random((2, 1, 16, 16, 32), dtype=np.float32)
        yield torch.from_numpy(image), torch.from_numpy((image > 0.5).astype(np.int64))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_keep_last_gives_the_last_steps_weights(monkeypatch):
    monkeypatch.setattr(study, "validate", lambda s, m: pytest.fail("--keep last validates nothing"))
    model = tiny_net(2, dropout=0.2)
    al_loop.run_stage(FakeStudy("last", 2), model, supervised_loss, toy_batches(), 6, 11, "t")
    reference = tiny_net(2, dropout=0.2)
    Stage(reference, supervised_loss, toy_batches(), 6, torch.device("cpu"), 1e-2, dropout_seed=11,
          progress=FakeStudy("last", 2).bar).run("t")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_keep_best_keeps_the_best_validated_weights(monkeypatch):
    """Validated after steps 2, 4, 6 (scripted Dice 0.3, 0.7, 0.5): the weights after step 4 are kept, and
    training is the same as without the checks (the last weights equal --keep last's)."""
    seen, dice = [], iter([0.3, 0.7, 0.5])
    monkeypatch.setattr(study, "validate", lambda s, m: seen.append(snapshot(m)) or {"mean_dice": next(dice)})
    model = tiny_net(2, dropout=0.2)
    stats = al_loop.run_stage(FakeStudy("best", 2), model, supervised_loss, toy_batches(), 6, 11, "t")
    assert len(seen) == 3 and stats["best_step"] == 4 and [s for s, _ in stats["validation"]] == [2, 4, 6]
    assert all(torch.equal(model.state_dict()[k], seen[1][k]) for k in seen[1])
    last = tiny_net(2, dropout=0.2)
    monkeypatch.setattr(study, "validate", lambda s, m: pytest.fail("--keep last validates nothing"))
    al_loop.run_stage(FakeStudy("last", 2), last, supervised_loss, toy_batches(), 6, 11, "t")
    assert all(torch.equal(last.state_dict()[k], seen[2][k]) for k in seen[2])


def test_mean_dice_is_monais_mean_over_cases_of_present_classes(monkeypatch):
    """DiceMetric(include_background=False, reduction="mean"): per case the mean of its present classes, then
    the mean over the cases that have one."""
    per_case = np.array([[0.8, np.nan], [0.6, 0.2], [np.nan, np.nan]])
    monkeypatch.setattr(study, "evaluate", lambda *a, **kw: per_case)
    cases = type("C", (), {"val": ["a", "b", "c"], "num_classes": 3, "labeled_case": lambda self, c: None})()
    fake = type("S", (), {"cases": cases, "cfg": al_loop.PAPER, "clock": StageClock()})()
    record = al_loop.validate(fake, None)
    assert record["mean_dice"] == pytest.approx((0.8 + 0.4) / 2)
    assert record["dice"] == pytest.approx([0.7, 0.2])

# ----------------------------------------------------------------------------- paired comparisons


def test_rand_and_rand_semi_are_paired(phantom, tmp_path):
    """Under one seed rand and rand_semi acquire the same cases at every iteration, and their Ms of
    iteration 1 (line 7: same initial weights, same cases, same patches and dropout masks) are the same."""
    out = tmp_path / "run"
    state = run_tiny(phantom, out, "--strategy", "rand,rand_semi", "--val-every", "1")["0"]
    assert state["rand"]["labeled"] == state["rand_semi"]["labeled"]
    for a, b in zip(state["rand"]["iterations"], state["rand_semi"]["iterations"]):
        assert a["n_labeled"] == b["n_labeled"] and a.get("acquired") == b.get("acquired")
    load = lambda name: torch.load(out / "checkpoints" / "seed0" / f"{name}.pt", weights_only=False)["model"]
    ms, ms_semi = load("rand/iter0_sup"), load("rand_semi/iter0_sup")
    assert all(torch.equal(ms[k], ms_semi[k]) for k in ms)


# ------------------------------------------------------------------------------------ the proxy's patches


class ProxyDrawn(Exception):
    """Raised in place of the proxy's training, once its arguments are seen."""


@pytest.mark.parametrize("extra, fg_fraction", [
    (("--preset", "paper"), None),                                             # the paper: random patches
    (("--preset", "paper", "--proxy-patches", "balanced", "--fg-fraction", "0.7"), 0.7),
    (("--preset", "demo"), 0.5)])                                             # the demo: balanced, as its comment says
def test_proxy_patch_draw_follows_the_preset(phantom, tmp_path, monkeypatch, extra, fg_fraction):
    seen = []

    def capture(model, volumes, val_cases, settings, *args):
        seen.append(settings)
        raise ProxyDrawn()

    monkeypatch.setattr(al_loop, "train_proxy", capture)
    with pytest.raises(ProxyDrawn):
        al_loop.main(tiny.args(phantom, tmp_path / "run", "--strategy", "proxyrank", *extra))
    assert len(seen) == 1 and seen[0].patches.fg_fraction == fg_fraction
    assert seen[0].patches.patch_vox == (16, 16, 16)                          # the tiny sizes still hold
    assert json.loads((tmp_path / "run" / "config.json").read_text())["preset"] == extra[1]
