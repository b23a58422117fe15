"""Annotation mode with boxes (--query patch): to_annotate.csv lists boxes on each scan's own grid (an LPS-stored
phantom), a mask per case marks them, and a label file is read only inside the boxes asked for. CPU, tiny
phantoms."""
import warnings

import nibabel as nib
import numpy as np

import al_loop
import tiny
from tiny import ijk_ranges, own_scans, to_annotate

PATCH = ("--query", "patch", "--query-vox", "8,8,8", "--strategy", "proxyrank_var_semi")   # every line of Algorithm 1


def annotate_until_done(phantom, root, out, deliver, rounds=6):
    """Run, deliver what to_annotate.csv asks for, rerun, until nothing is asked. Returns the warnings seen."""
    seen = []
    for _ in range(rounds):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert al_loop.main(tiny.args(root, out, *PATCH)) == 0
        seen += [str(w.message) for w in caught]
        if not (out / "to_annotate.csv").exists():
            return seen
        rows = to_annotate(out)
        for row in rows:
            mask = nib.load(row["boxes_mask"])
            where = np.asarray(mask.dataobj) == int(row["box"])
            box = ijk_ranges(row["voxels_ijk"])
            assert where[box].all() and where.sum() == where[box].size       # the mask marks exactly that box
            first = [s.start for s in box]
            assert mask.affine[0, 0] < 0 and mask.affine[1, 1] < 0           # stored LPS, as the scan
            world = (mask.affine @ [*first, 1])[:3]
            assert np.allclose(world, [float(v) for v in row["first_voxel_mm"].split(",")], atol=0.06)
            truth = nib.load(phantom / "labelsTr" / f"{row['case']}.nii.gz")
            assert np.allclose(truth.affine, mask.affine)                   # on the scan's own grid
        for case in dict.fromkeys(row["case"] for row in rows):
            deliver(case, [ijk_ranges(r["voxels_ijk"]) for r in rows if r["case"] == case], root)
        (out / "to_annotate.csv").unlink()
    raise AssertionError(f"still asking after {rounds} rounds")


def test_box_labels_round_trip_on_an_lps_scan_and_only_the_boxes_are_read(phantom, tmp_path):
    def whole(case, boxes, root):            # the annotator saves the whole true label
        truth = nib.load(phantom / "labelsTr" / f"{case}.nii.gz")
        nib.save(truth, root / "labelsTr" / f"{case}.nii.gz")

    def boxes_only(case, boxes, root):       # only inside the boxes asked for, and a stray stroke far outside
        truth = nib.load(phantom / "labelsTr" / f"{case}.nii.gz")
        path = root / "labelsTr" / f"{case}.nii.gz"
        label = np.asarray(nib.load(path).dataobj).copy() if path.exists() else np.zeros(truth.shape, np.uint8)
        inside = np.zeros(truth.shape, bool)
        for box in boxes:
            label[box] = np.asarray(truth.dataobj)[box]
            inside[box] = True
        stray = np.argwhere(~inside)[0]
        label[tuple(stray)] = 1
        nib.save(nib.Nifti1Image(label.astype(np.uint8), truth.affine, truth.header), path)

    runs = []
    for name, deliver in (("whole", whole), ("boxes", boxes_only)):
        root = own_scans(phantom, tmp_path / name, labeled=4)
        out = tmp_path / name / "run"
        seen = annotate_until_done(phantom, root, out, deliver)
        assert any("outside the" in m and "box(es) asked for" in m and "ignored" in m for m in seen)
        runs.append(out)
    states = [tiny.states_of(out) for out in runs]
    assert states[0] == states[1]             # same boxes, same Dice: labels outside the boxes were never read
    units = states[0]["proxyrank_var_semi"]["labeled"]
    assert sum("@" in u for u in units) == 6  # 3 rounds of k = 2 boxes
    for name in ("results.csv", "per_case_dice.csv", "budget.csv"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes()
