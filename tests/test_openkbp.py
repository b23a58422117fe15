"""Tests for benchmarks/openkbp.py on a fake OpenKBP folder written here: 3 patients on 16^3 grids. CPU, seconds."""
import importlib.util
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("openkbp",
                                               Path(__file__).resolve().parents[1] / "benchmarks" / "openkbp.py")
openkbp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(openkbp)

GRID = (16, 16, 16)
# challenge order (axis 0 anterior -> posterior, axis 1 right -> left, axis 2 superior -> inferior)
MANDIBLE = (2, 8, 9)         # anterior, midline, below the brainstem
SPINE = (12, 8, 10)          # posterior
RIGHT_PAROTID = (7, 3, 8)
LEFT_PAROTID = (7, 12, 8)
BRAINSTEM = (9, 8, 2)        # superior
BODY = np.s_[2:13, 3:13, 2:11]


def flat(*points):
    return [int(np.ravel_multi_index(p, GRID)) for p in points]


def write_sparse(path, indices, values=None):
    """An OpenKBP sparse CSV: header ',data', then 'index,value' (a mask leaves the value empty)."""
    rows = [f"{i},{'' if values is None else f'{v:.1f}'}" for i, v in zip(indices, values or [None] * len(indices))]
    path.write_text(",data\n" + "\n".join(rows) + "\n")


def write_patient(folder, voxel_mm=(4.0, 4.0, 2.5), structures=("Mandible", "RightParotid", "LeftParotid")):
    """CT: a body of soft tissue (1040 stored: 40 HU) in BODY, mandible 1700 (700 HU), spine 1400, parotids
    1010; the rest absent (air)."""
    folder.mkdir(parents=True)
    np.savetxt(folder / "voxel_dimensions.csv", voxel_mm)
    points = {"Mandible": MANDIBLE, "SpinalCord": SPINE, "RightParotid": RIGHT_PAROTID, "LeftParotid": LEFT_PAROTID,
              "Brainstem": BRAINSTEM}
    stored = {"Mandible": 1700.0, "SpinalCord": 1400.0, "RightParotid": 1010.0, "LeftParotid": 1010.0,
              "Brainstem": 1040.0}
    ct = np.zeros(GRID)
    ct[BODY] = 1040.0
    for name, point in points.items():
        ct[point] = stored[name]
    write_sparse(folder / "ct.csv", np.flatnonzero(ct).tolist(), ct.ravel()[np.flatnonzero(ct)].tolist())
    for name in structures:
        write_sparse(folder / f"{name}.csv", flat(points[name]))


@pytest.fixture
def src(tmp_path):
    """pt_1 (train), pt_2 (train, no Mandible), pt_3 (validation, 2 x 2 x 3 mm voxels)."""
    root = tmp_path / "open-kbp"
    write_patient(root / "provided-data" / "train-pats" / "pt_1")
    write_patient(root / "provided-data" / "train-pats" / "pt_2", structures=("RightParotid", "LeftParotid"))
    write_patient(root / "provided-data" / "validation-pats" / "pt_3", voxel_mm=(2.0, 2.0, 3.0))
    return root


def convert(src, out, structures, **kw):
    lines = []
    done, skipped = openkbp.convert(src, out, openkbp.parse_structures(structures),
                                    ["train-pats", "validation-pats"], log=lines.append, grid_vox=GRID, **kw)
    return done, skipped, lines


def ras(point):
    """A challenge-order voxel index in the RAS-ordered output."""
    a, b, c = point
    return GRID[1] - 1 - b, GRID[0] - 1 - a, GRID[2] - 1 - c


def world(affine, index):
    return affine[:3, :3] @ np.array(index, float) + affine[:3, 3]


def test_values_labels_and_affine(src, tmp_path):
    out = tmp_path / "out"
    done, skipped, _ = convert(src, out, "Mandible,RightParotid+LeftParotid")
    assert done == ["pt_1", "pt_3"] and list(skipped) == ["pt_2"] and "Mandible.csv absent" in skipped["pt_2"]
    img = nib.load(out / "imagesTr" / "pt_1.nii.gz")
    hu = np.asarray(img.dataobj)
    assert hu.dtype == np.int16 and hu.shape == GRID
    assert hu[ras(MANDIBLE)] == 700 and hu[ras(SPINE)] == 400 and hu[ras(RIGHT_PAROTID)] == 10
    assert hu[ras(BRAINSTEM)] == 40 and (hu == -1000).sum() == hu.size - 11 * 10 * 9   # unstored voxels: air
    label = np.asarray(nib.load(out / "labelsTr" / "pt_1.nii.gz").dataobj)
    assert label.dtype == np.uint8 and label.sum() == 1 + 2 + 2
    assert label[ras(MANDIBLE)] == 1 and label[ras(RIGHT_PAROTID)] == label[ras(LEFT_PAROTID)] == 2
    # in world (RAS) coordinates: mandible anterior of the spine, right parotid right of the left, brainstem on top
    a = img.affine
    assert np.allclose(np.diag(a)[:3], [4.0, 4.0, 2.5])
    assert world(a, ras(MANDIBLE))[1] > world(a, ras(SPINE))[1]
    assert world(a, ras(RIGHT_PAROTID))[0] > world(a, ras(LEFT_PAROTID))[0]
    assert world(a, ras(BRAINSTEM))[2] > world(a, ras(MANDIBLE))[2]
    assert np.allclose(np.diag(nib.load(out / "imagesTr" / "pt_3.nii.gz").affine)[:3], [2.0, 2.0, 3.0])
    info = json.loads((out / "dataset.json").read_text())
    assert info["labels"] == {"0": "background", "1": "Mandible", "2": "RightParotid+LeftParotid"}
    assert [e["image"] for e in info["training"]] == ["./imagesTr/pt_1.nii.gz", "./imagesTr/pt_3.nii.gz"]


def test_rerun_skips_finished_cases(src, tmp_path):
    out = tmp_path / "out"
    convert(src, out, "Mandible")
    image = out / "imagesTr" / "pt_1.nii.gz"
    image.write_bytes(image.read_bytes())           # same content, new mtime_ns we can check against
    before = image.stat().st_mtime_ns
    (out / "imagesTr" / "pt_3.nii.gz").unlink()     # as if a run had stopped before pt_3's image
    done, _, lines = convert(src, out, "Mandible")
    assert done == ["pt_1", "pt_3"] and image.stat().st_mtime_ns == before
    assert "(1 new)" in lines[-1]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]   # no temporary file left behind


def test_other_structures_into_the_same_out_are_refused(src, tmp_path):
    out = tmp_path / "out"
    convert(src, out, "Mandible")
    with pytest.raises(SystemExit, match="written for labels"):
        convert(src, out, "RightParotid+LeftParotid")


def test_crop_keeps_world_positions(src, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    convert(src, full, "Mandible")
    convert(src, cut, "Mandible", crop_body=True)
    a, b = (nib.load(root / "imagesTr" / "pt_1.nii.gz") for root in (full, cut))
    assert np.prod(b.shape) < np.prod(a.shape)
    hu_b = np.asarray(b.dataobj)
    for point in (MANDIBLE, SPINE, BRAINSTEM):
        index_b = np.linalg.solve(b.affine[:3, :3], world(a.affine, ras(point)) - b.affine[:3, 3])
        assert np.allclose(index_b, np.round(index_b))
        assert hu_b[tuple(np.round(index_b).astype(int))] == np.asarray(a.dataobj)[ras(point)]


def test_not_openkbp_names_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="provided-data is missing"):
        convert(tmp_path, tmp_path / "out", "Mandible")
    (tmp_path / "provided-data" / "train-pats").mkdir(parents=True)
    with pytest.raises(SystemExit, match="validation-pats missing"):
        convert(tmp_path, tmp_path / "out", "Mandible")
    with pytest.raises(SystemExit, match="unknown \\['Jaw'\\]"):
        openkbp.parse_structures("Jaw")


def snapshot(root):
    """{path: bytes} of every file under root: what a refused run must leave as it was."""
    return {p: p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("text", ["", ",data\n", ",data"])
def test_empty_ct_csv_is_left_out_without_numpy_warning(src, tmp_path, capfd, text):
    (src / "provided-data" / "train-pats" / "pt_1" / "ct.csv").write_text(text)
    (src / "provided-data" / "validation-pats" / "pt_3" / "voxel_dimensions.csv").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # numpy's "input contained no data" would end the run here
        done, skipped, _ = convert(src, tmp_path / "out", "Mandible")
    assert done == [] and "ct.csv holds no voxels" in skipped["pt_1"]
    assert "voxel_dimensions.csv unreadable" in skipped["pt_3"]
    assert "loadtxt" not in "".join(capfd.readouterr())


def test_ct_storing_nothing_at_the_structure_is_left_out(src, tmp_path):
    """A ct.csv with a few voxels away from the mandible: the mandible would lie in air."""
    write_sparse(src / "provided-data" / "train-pats" / "pt_1" / "ct.csv", flat((14, 14, 14)), [1040.0])
    done, skipped, _ = convert(src, tmp_path / "out", "Mandible")
    assert done == ["pt_3"] and "ct.csv stores no CT value at 100% of Mandible.csv's voxels" in skipped["pt_1"]


def cut_mid_value(path):
    """Cut a file as an interrupted copy does: mid-way, two characters into a line."""
    text = path.read_text()
    path.write_text(text[:text.index("\n", len(text) // 2) + 3])


def swap_two_lines(path):
    lines = path.read_text().splitlines(keepends=True)
    lines[5], lines[6] = lines[6], lines[5]
    path.write_text("".join(lines))


@pytest.mark.parametrize("damage, reason", [(cut_mid_value, "ct.csv cut off: it ends in "),
                                            (swap_two_lines, "does not follow")])
def test_damaged_ct_csv_is_left_out_naming_the_file(src, tmp_path, damage, reason):
    damage(src / "provided-data" / "train-pats" / "pt_1" / "ct.csv")
    done, skipped, _ = convert(src, tmp_path / "out", "Mandible")
    assert done == ["pt_3"] and reason in skipped["pt_1"] and "copy it again" in skipped["pt_1"]


def test_rerun_converts_again_a_case_whose_source_changed(src, tmp_path):
    out, ct = tmp_path / "out", src / "provided-data" / "train-pats" / "pt_1" / "ct.csv"
    good = ct.read_text()
    cut_mid_value(ct)
    convert(src, out, "Mandible")              # the first run meets a copy that was cut off
    ct.write_text(good)                        # the user repairs the source
    pt_3 = (out / "imagesTr" / "pt_3.nii.gz").stat().st_mtime_ns
    done, skipped, lines = convert(src, out, "Mandible")
    assert done == ["pt_1", "pt_3"] and list(skipped) == ["pt_2"] and "(1 new)" in lines[-1]
    assert (out / "imagesTr" / "pt_3.nii.gz").stat().st_mtime_ns == pt_3       # its source did not change
    ct.write_text(good.replace("1700.0", "1800.0"))                             # an edit of the same size
    convert(src, out, "Mandible")
    assert np.asarray(nib.load(out / "imagesTr" / "pt_1.nii.gz").dataobj)[ras(MANDIBLE)] == 800
    cut_mid_value(ct)                          # damaged again: the earlier conversion goes with the patient
    done, skipped, _ = convert(src, out, "Mandible")
    assert done == ["pt_3"] and not (out / "imagesTr" / "pt_1.nii.gz").exists()
    manifest = json.loads((out / openkbp.MANIFEST).read_text())
    assert list(manifest["cases"]) == ["pt_3"] and manifest["cases"]["pt_3"]["source"] == "validation-pats/pt_3"


def test_users_folder_as_out_is_refused_untouched(src, tmp_path):
    out = tmp_path / "mine"
    (out / "imagesTr").mkdir(parents=True)
    (out / "dataset.json").write_text(json.dumps({"name": "MyTask", "labels": {"0": "background", "1": "Mandible"},
                                                  "training": [{"image": "./imagesTr/mycase.nii.gz"}]}))
    (out / "notes.txt").write_text("my notes")
    (out / "imagesTr" / "mycase.nii.gz").write_bytes(b"mine")
    (out / "imagesTr" / "pt_1.nii.gz").write_bytes(b"mine too")
    before = snapshot(out)
    with pytest.raises(SystemExit, match=f"OUT {out}: holds 3 .*dataset.json, imagesTr/, notes.txt.*Choose a new OUT"):
        convert(src, out, "Mandible")
    assert snapshot(out) == before


def test_older_converters_out_is_adopted_and_converted_again(src, tmp_path):
    out = tmp_path / "out"
    convert(src, out, "Mandible")
    (out / openkbp.MANIFEST).unlink()          # as the converter left it before it wrote a manifest
    done, _, lines = convert(src, out, "Mandible")
    assert done == ["pt_1", "pt_3"] and "(2 new)" in lines[-1] and (out / openkbp.MANIFEST).is_file()
    (out / openkbp.MANIFEST).unlink()
    (out / "notes.txt").write_text("a user's file: no longer the converter's folder alone")
    with pytest.raises(SystemExit, match="notes.txt"):
        convert(src, out, "Mandible")


@pytest.mark.parametrize("first, then", [(False, True), (True, False)])
def test_rerun_with_other_crop_body_is_refused(src, tmp_path, first, then):
    out = tmp_path / "out"
    convert(src, out, "Mandible", crop_body=first)
    (out / "imagesTr" / "pt_3.nii.gz").unlink()      # a partial output
    before = snapshot(out)
    was, asks = ("with" if first else "without"), ("with" if then else "without")
    with pytest.raises(SystemExit, match=f"--crop-body: OUT was converted {was} --crop-body, this run is {asks} "
                                         f"--crop-body.*Rerun {was} --crop-body, or choose a new OUT"):
        convert(src, out, "Mandible", crop_body=then)
    assert snapshot(out) == before


def test_missing_split_names_the_splits_found_and_the_option(src, tmp_path):
    with pytest.raises(SystemExit, match="holds the splits train-pats, validation-pats; choose the splits to "
                                         "convert with --splits NAME\\[,NAME\\], e.g. --splits "
                                         "train-pats,validation-pats"):
        openkbp.convert(src, tmp_path / "out", [("Mandible",)], ["train-pats", "test-pats"], grid_vox=GRID)


def test_progress_lines_at_a_sensible_rate(src, tmp_path, monkeypatch):
    """No patient has a Brainstem: every one is left out, and only the last line is due (3 patients, 1 s)."""
    _, skipped, lines = convert(src, tmp_path / "a", "Brainstem")
    assert len(skipped) == 3 and len(lines) == 1 and lines[0].startswith("[3/3] 0 converted")
    assert "elapsed 0:00, ETA 0:00" in lines[0]
    monkeypatch.setattr(openkbp, "PROGRESS_EVERY", 2)
    assert [line[:5] for line in convert(src, tmp_path / "b", "Brainstem")[2]] == ["[2/3]", "[3/3]"]
    monkeypatch.setattr(openkbp, "PROGRESS_S", 0.0)
    assert len(convert(src, tmp_path / "c", "Brainstem")[2]) == 3


def test_real_preset_runs_the_documented_comparison():
    import al_loop
    cfg = al_loop.parse_args(["--preset", "real", "--data", "OpenKBP_Mandible", "--hu-band", "300,3000"])[0]
    assert cfg.strategy == "rand,var,proxyrank,proxyrank_var,proxyrank_var_semi,full" and cfg.seeds == (0, 1, 2)
    assert cfg.n_val == 8 and cfg.n_test == 16 and cfg.k == 4 and cfg.iterations == 3 and cfg.hu_band == "300,3000"
