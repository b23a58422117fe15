"""Region queries end to end (--query patch --query-vox): tiny phantom studies whose units of Tl are boxes. The
boxes a run labels, the budget it records and reports (budget.csv, AUBC in summary.md, the oracle marked), a run
whose pool labels differ only outside the acquired boxes giving the same results, volume mode (the default) as
before with the budget keys, and the refused requests. CPU, about 40 s (one patch run shared by the module)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

import al_loop
import data
import regions
import tiny
from cases import Cases
from tiny import unit_case, unit_start
from run_folder import RunFolder
from tiny import read_states
from tiny import K, own_scans, rows

VOX = (8, 8, 8)
PATCH = ("--query", "patch", "--query-vox", ",".join(map(str, VOX)))
STRATEGIES = ("rand", "rand_fg_oracle", "rand_fg_pseudo", "proxyrank", "proxyrank_var_semi")
LABEL_BLIND = ("rand", "proxyrank", "proxyrank_var_semi")     # never read a label before its box is acquired


def finished(root, out, *extra):
    """Run a tiny study to its end: its states and its Cases (the split, the training grids, the labels)."""
    argv = tiny.args(root, out, *extra)
    assert al_loop.main(argv) == 0
    cfg = al_loop.parse_args(argv)[0]
    return SimpleNamespace(out=Path(out), cfg=cfg, states=read_states(out)["0"], cases=Cases(cfg, RunFolder(out)))


@pytest.fixture(scope="module")
def patch_run(phantom, tmp_path_factory):
    return finished(phantom, tmp_path_factory.mktemp("patch") / "run", *PATCH, "--strategy", ",".join(STRATEGIES))


def size_of(cases, cid):
    return np.minimum(VOX, cases.image_hu(cid).shape)


def mask_of(cases, units, cid):
    """(X, Y, Z) int: how many of the boxes of `units` in case cid cover each voxel of its training grid."""
    count = np.zeros(cases.image_hu(cid).shape, int)
    for u in units:
        if unit_case(u) == cid:
            count[tuple(slice(a, a + b) for a, b in zip(unit_start(u), size_of(cases, cid)))] += 1
    return count


def budget_of(cases, units):
    """(voxels, foreground voxels) of boxes on the training grids, counted by hand."""
    voxels = foreground = 0
    for u in units:
        cid = unit_case(u)
        label = np.asarray(cases.label(cid))[cases.box(cid)]
        inside = label[tuple(slice(a, a + b) for a, b in zip(unit_start(u), size_of(cases, cid)))]
        voxels, foreground = voxels + int(np.prod(size_of(cases, cid))), foreground + int((inside > 0).sum())
    return voxels, foreground

# ----------------------------------------------------------------------------- a patch run


def test_patch_run_labels_only_disjoint_boxes_inside_pool_cases(patch_run):
    cases, states = patch_run.cases, patch_run.states
    assert set(states) == set(STRATEGIES)
    for name, st in states.items():
        labeled = st["labeled"]
        assert len(labeled) == len(set(labeled)) == 2 * K, name
        assert all(unit_start(u) is not None for u in labeled), name            # every unit is a box
        assert {unit_case(u) for u in labeled} <= set(cases.pool), name          # never a validation case
        for u in labeled:
            assert (unit_start(u) + size_of(cases, unit_case(u)) <= cases.image_hu(unit_case(u)).shape).all(), u
        for cid in {unit_case(u) for u in labeled}:
            assert mask_of(cases, labeled, cid).max() == 1, (name, cid)         # no voxel in two boxes
        acquired = [u for it in st["iterations"] for u in it.get("acquired", [])]
        assert labeled == st["initial"] + acquired and len(st["initial"]) == K, name
    assert states["proxyrank"]["initial"] == states["proxyrank_var_semi"]["initial"]    # one proxy ranking


def test_patch_run_budget_is_the_voxels_of_its_boxes_and_grows_by_k_boxes(patch_run):
    cases = patch_run.cases
    for name, st in patch_run.states.items():
        records = st["iterations"]
        assert [r["n_labeled"] for r in records] == [K, 2 * K], name
        for r in records:
            assert (r["voxels"], r["fg_voxels"]) == budget_of(cases, st["labeled"][:r["n_labeled"]]), name
            assert 0 <= r["fg_voxels"] <= r["voxels"]
        assert records[1]["voxels"] - records[0]["voxels"] == sum(
            int(np.prod(size_of(cases, unit_case(u)))) for u in records[0]["acquired"]) > 0, name
        assert len(records[0]["acquired"]) == K and set(records[0]["scores"]) == set(records[0]["acquired"])


def test_patch_run_semi_fine_tunes_on_boxes_clear_of_the_labeled_ones(patch_run):
    cases, st = patch_run.cases, patch_run.states["proxyrank_var_semi"]
    for r in st["iterations"]:
        certain, labeled = r["certain"], st["labeled"][:r["n_labeled"]]
        assert len(certain) == r["n_labeled"] and all(unit_start(u) is not None for u in certain)
        for cid in {unit_case(u) for u in certain + labeled}:
            assert mask_of(cases, certain + labeled, cid).max() == 1, (certain, labeled)


def test_patch_run_writes_budget_csv_and_aubc_and_marks_the_oracle(patch_run):
    out, states = patch_run.out, patch_run.states
    budget = rows(out / "budget.csv")
    assert list(budget[0]) == ["strategy", "seed", "iteration", "n_labeled", "voxels", "fg_voxels", "mean_dice"]
    got = {(r["strategy"], int(r["iteration"])): (int(r["n_labeled"]), int(r["voxels"]), int(r["fg_voxels"]))
           for r in budget}
    assert got == {(name, j): (rec["n_labeled"], rec["voxels"], rec["fg_voxels"])
                   for name, st in states.items() for j, rec in enumerate(st["iterations"], 1)}
    summary = (out / "summary.md").read_text()
    assert "## Budget" in summary and "AUBC" in summary
    table = summary.split("## Budget")[1].split("\n## ")[0]
    lo = max(st["iterations"][0]["voxels"] for st in states.values())
    hi = min(st["iterations"][-1]["voxels"] for st in states.values())
    for name, st in states.items():
        shown = f"{name} (oracle)" if name == "rand_fg_oracle" else name
        line = next(line for line in table.splitlines() if line.startswith(f"| {shown} |"))
        aubc = regions.aubc([r["voxels"] for r in st["iterations"]], [r["mean_dice"] for r in st["iterations"]],
                            lo, hi)
        assert float(line.split("|")[5].split("+-")[0]) == pytest.approx(aubc, abs=1e-4), line
    assert "rand_fg_pseudo (oracle)" not in summary and "| rand (oracle)" not in summary
    assert {r["strategy"] for r in rows(out / "results.csv")} == set(STRATEGIES)
    assert (out / "dice_curve.png").stat().st_size > 0


def test_patch_run_summary_marks_the_oracle_in_every_table(patch_run):
    """rand_fg_oracle reads labels no annotator has made: report.display_name marks it "(oracle)" in tables,
    Table 1 (the last iteration's Dice) included, where it would otherwise read as a label-blind baseline."""
    summary = (patch_run.out / "summary.md").read_text()
    unmarked = [line for line in summary.splitlines() if "rand_fg_oracle" in line
                and line.count("rand_fg_oracle") != line.count("rand_fg_oracle (oracle)")]
    assert not unmarked, unmarked

# ----------------------------------------------------------------------------- labels outside the boxes are never read


def rewrite_outside(root, cases, spacing_mm, units, margin=1):
    """Every pool label voxel of the native files more than `margin` voxels from the boxes of `units` (mapped
    from the training grid back to the file's grid) changes class ((c + 1) % 3); the validation labels stay."""
    for cid in cases.pool:
        mask = np.minimum(mask_of(cases, units, cid), 1).astype(np.uint8)
        native = data.to_native_grid(cases.uncrop(cid, mask), cases.files[cid]["image"], spacing_mm, nearest=True)
        keep = ndi.binary_dilation(native > 0, iterations=margin) if native.any() else native > 0
        path = root / "labelsTr" / Path(cases.files[cid]["label"]).name
        img = nib.load(str(path))
        label = np.asarray(img.dataobj)
        assert label.shape == keep.shape
        nib.save(nib.Nifti1Image(np.where(keep, label, (label + 1) % 3).astype(label.dtype), img.affine, img.header),
                 str(path))


def test_patch_results_do_not_depend_on_pool_labels_outside_the_acquired_boxes(patch_run, tmp_path):
    a = patch_run
    acquired = [u for name in LABEL_BLIND for u in a.states[name]["labeled"]]
    root = tiny.copy_data(a.cases.root, tmp_path)
    rewrite_outside(root, a.cases, a.cfg.spacing_mm, acquired)
    b = finished(root, tmp_path / "run", *PATCH, "--strategy", ",".join(LABEL_BLIND))
    changed = 0
    for cid in a.cases.pool + a.cases.val:       # the rewrite as the run sees it: same inside the boxes only
        before = np.asarray(a.cases.label(cid))[a.cases.box(cid)]
        after = np.asarray(b.cases.label(cid))[b.cases.box(cid)]
        inside = mask_of(a.cases, acquired, cid) > 0
        np.testing.assert_array_equal(before[inside], after[inside])
        changed += int((before != after).sum())
        if cid in a.cases.val:
            np.testing.assert_array_equal(before, after)
    assert changed > 1000
    assert {n: a.states[n] for n in LABEL_BLIND} == b.states
    for name in ("results.csv", "per_case_dice.csv", "budget.csv"):
        assert [r for r in rows(a.out / name) if r["strategy"] in LABEL_BLIND] == rows(b.out / name), name

# ----------------------------------------------------------------------------- volume mode, refused requests


def test_volume_mode_records_the_budget_of_whole_cases_and_reports_as_before(phantom, tmp_path):
    run = finished(phantom, tmp_path / "run", "--strategy", "rand")
    cases, st = run.cases, run.states["rand"]
    assert all(unit_start(u) is None and "@" not in u for u in st["labeled"])
    for r in st["iterations"]:
        ids = st["labeled"][:r["n_labeled"]]
        assert r["voxels"] == sum(int(np.prod(cases.image_hu(c).shape)) for c in ids)
        assert r["fg_voxels"] == sum(int((np.asarray(cases.label(c))[cases.box(c)] > 0).sum()) for c in ids) > 0
    with open(run.out / "results.csv") as f:
        assert f.readline().strip() == ("strategy,seed,iteration,n_labeled,pct_labeled,dice_liver,dice_tumour,"
                                        "mean_dice")
    summary = (run.out / "summary.md").read_text()
    assert "## Budget" not in summary and "AUBC" not in summary and "(oracle)" not in summary
    assert [int(r["voxels"]) for r in rows(run.out / "budget.csv")] == [r["voxels"] for r in st["iterations"]]
    first = json.loads((run.out / "state" / "seed0_rand.json").read_text())["iterations"][0]
    assert set(first["scores"]) == set(cases.pool) - set(st["labeled"][:K])     # every unlabeled case's score


@pytest.mark.parametrize("strategy", ["rand_fg_oracle", "rand,rand_fg_pseudo"])
def test_random_box_strategies_without_query_patch_are_refused_in_one_line(phantom, tmp_path, strategy):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"--strategy rand_fg_(oracle|pseudo): random boxes need --query patch") as err:
        al_loop.main(tiny.args(phantom, out, "--strategy", strategy))
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_rand_fg_oracle_is_refused_in_annotation_mode(phantom, tmp_path):
    root, out = own_scans(phantom, tmp_path), tmp_path / "run"
    with pytest.raises(SystemExit, match=r"rand_fg_oracle reads the labels of the boxes before they are queried.*"
                                         r"use rand_fg_pseudo or rand") as err:
        al_loop.main(tiny.args(root, out, *PATCH, "--strategy", "rand_fg_oracle"))
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_two_ranks_give_the_results_of_one_in_patch_mode(phantom, patch_run, tmp_path):
    """torchrun's two workers share the queue in patch mode too: the same boxes, Dice and reports."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
           str(Path(al_loop.__file__)), *tiny.args(phantom, out, *PATCH, "--strategy", ",".join(STRATEGIES))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert read_states(out)["0"] == patch_run.states
    for name in ("results.csv", "per_case_dice.csv", "budget.csv", "summary.md"):
        assert tiny.results_text(out / name) == tiny.results_text(patch_run.out / name), name


def test_a_patch_run_extended_by_an_iteration_ends_as_an_uninterrupted_one(phantom, patch_run, tmp_path):
    """Resume in patch mode: one iteration, then a rerun asking for two, acquires its boxes and trains as the
    run that went straight to two (the state keeps boxes; each strategy's results depend on it alone)."""
    out, some = tmp_path / "run", ("--strategy", "rand,proxyrank_var_semi")
    assert al_loop.main(tiny.args(phantom, out, *PATCH, *some, "--iterations", "1")) == 0
    assert al_loop.main(tiny.args(phantom, out, *PATCH, *some)) == 0
    states = read_states(out)["0"]
    assert states == {s: patch_run.states[s] for s in ("rand", "proxyrank_var_semi")}


def test_patch_run_reports_pct_labeled_as_the_share_of_the_pools_voxels(patch_run):
    """results.csv's pct_labeled counts voxels in a patch run, not boxes per case (which would pass 100 %)."""
    cases = patch_run.cases
    pool_voxels = sum(int(np.prod(cases.image_hu(c).shape)) for c in cases.pool)
    budget = {(r["strategy"], r["iteration"]): int(r["voxels"]) for r in rows(patch_run.out / "budget.csv")}
    for r in rows(patch_run.out / "results.csv"):
        assert float(r["pct_labeled"]) == round(100.0 * budget[r["strategy"], r["iteration"]] / pool_voxels, 2)
        assert float(r["pct_labeled"]) < 100 or r["strategy"] == "full"


def test_a_pool_without_room_for_k_more_boxes_gives_fewer_with_a_warning(phantom, tmp_path):
    """Boxes as large as the cases: each case holds one, so the second iteration finds 3 of the 5 asked."""
    with pytest.warns(UserWarning, match=r"only 3 of --k 5 boxes fit"):
        assert al_loop.main(tiny.args(phantom, tmp_path / "run", "--query", "patch", "--query-vox", "64,64,64",
                                      "--strategy", "rand", "--k", "5")) == 0
    labeled = read_states(tmp_path / "run")["0"]["rand"]["labeled"]
    assert len(labeled) == 8 and len({unit_case(u) for u in labeled}) == 8
