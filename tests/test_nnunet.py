"""nnunet.py: which run and iteration an export takes, and the exported nnU-Net v2 dataset (layout, links,
dataset.json, uncompressed NIfTI converted, what is refused, the next commands printed), and the partial labels
of a run of boxes (--query patch). Tiny phantom, CPU."""
import json
import os
from pathlib import Path
import shutil
import sys
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import annotate
import nnunet
import folders
from cases import Cases
from queries import Queries
from annotate import ASKED
from run_folder import RunFolder
from state import RunState


# ---------------------------------------------------------------------------------------------- selection


def state(labeled, n_labeled):
    return RunState.from_json({"labeled": labeled, "scores": {}, "iterations": [
        {"n_labeled": n, "dice": [], "mean_dice": 0.0, "per_case": {}, "acquired": []} for n in n_labeled]})


def selected(*args, **kwargs):
    """nnunet.selection with the units as their text."""
    strategy, seed, j, units = nnunet.selection(*args, **kwargs)
    return strategy, seed, j, [str(u) for u in units]


def test_selection_defaults_to_the_only_run_and_last_iteration():
    states = {"0": {"proxyrank": state(["a", "b", "c", "d", "e"], [2, 4])}}
    assert selected(states) == ("proxyrank", 0, 2, ["a", "b", "c", "d"])
    assert selected(states, iteration=1) == ("proxyrank", 0, 1, ["a", "b"])
    assert selected(states, "proxyrank", 0, 2)[3] == ["a", "b", "c", "d"]


def test_selection_ambiguities_list_the_choices():
    states = {"0": {"random": state(["a", "b"], [2]), "proxyrank": state(["c", "d"], [2])},
              "1": {"random": state(["b", "a"], [2])}}
    with pytest.raises(ValueError, match=r"2 seeds \['0', '1'\]; choose one with --seed"):
        nnunet.selection(states)
    with pytest.raises(ValueError, match=r"2 strategies \['proxyrank', 'random'\]; choose one with --strategy"):
        nnunet.selection(states, seed=0)
    assert selected(states, seed="1") == ("random", 1, 1, ["b", "a"])
    with pytest.raises(ValueError, match=r"--strategy bald: not in the run; its strategies are \['proxyrank', 'rand"):
        nnunet.selection(states, "bald", 0)
    with pytest.raises(ValueError, match=r"--seed 5: not in the run; its seeds are \['0', '1'\]"):
        nnunet.selection(states, "random", 5)
    with pytest.raises(ValueError, match=r"--iteration 3: .*finished iterations 1..1"):
        nnunet.selection(states, "random", 0, 3)
    with pytest.raises(ValueError, match="no finished iteration yet"):
        nnunet.selection({"0": {"random": state(["a"], [])}})


# ---------------------------------------------------------------------------------------------- export


def test_export_dataset_layout_links_and_json(msd, tmp_path):
    cases = folders.read_msd(msd)
    labels = folders.read_task_info(msd)["labels"]
    folder = nnunet.export_dataset(cases, ["phantom_3", "phantom_0"], ["phantom_5"], labels, 501, "Phantom",
                                   tmp_path)
    assert folder == tmp_path / "Dataset501_Phantom"
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "imagesTr", "labelsTr", "splits_final.json"]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        "phantom_0_0000.nii.gz", "phantom_3_0000.nii.gz", "phantom_5_0000.nii.gz"]
    assert os.path.samefile(folder / "imagesTr" / "phantom_3_0000.nii.gz", msd / "imagesTr" / "phantom_3.nii.gz")
    assert os.path.samefile(folder / "labelsTr" / "phantom_5.nii.gz", msd / "labelsTr" / "phantom_5.nii.gz")
    assert json.loads((folder / "dataset.json").read_text()) == {
        "name": "Phantom", "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": 3, "file_ending": ".nii.gz"}
    assert json.loads((folder / "splits_final.json").read_text()) == [
        {"train": ["phantom_3", "phantom_0"], "val": ["phantom_5"]}]
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset501_Phantom"]  # no temporary folder left
    # and it reads back as a data folder: the same cases, the same classes
    assert [c["id"] for c in folders.read_msd(folder)] == ["phantom_0", "phantom_3", "phantom_5"]
    assert folders.read_task_info(folder)["labels"] == labels


def test_export_converts_uncompressed_nifti_keeping_voxels_and_affine(msd, tmp_path):
    case = folders.read_msd(msd)[2]
    source = nib.load(case["image"])
    nii = tmp_path / "src" / "phantom_2.nii"
    nii.parent.mkdir()
    nib.save(source, nii)
    cases = {"phantom_2": {"image": str(nii), "label": case["label"]}}
    folder = nnunet.export_dataset(cases, ["phantom_2"], [], {0: "bg", 1: "liver"}, 7, "One", tmp_path / "raw")
    out = nib.load(folder / "imagesTr" / "phantom_2_0000.nii.gz")
    assert out.get_data_dtype() == source.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(out.dataobj), np.asarray(source.dataobj))
    assert np.array_equal(out.affine, source.affine)
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "liver": 1}


def test_export_refuses_overwrite_and_bad_ids(msd, tmp_path, monkeypatch):
    cases, labels = folders.read_msd(msd), {0: "background", 1: "liver", 2: "tumour"}
    folder = nnunet.export_dataset(cases, ["phantom_0"], ["phantom_1"], labels, 501, "Phantom", tmp_path)
    with pytest.raises(FileExistsError, match=r"Dataset501_Phantom: exists already.*--overwrite"):
        nnunet.export_dataset(cases, ["phantom_2"], ["phantom_1"], labels, 501, "Phantom", tmp_path)
    nnunet.export_dataset(cases, ["phantom_2"], ["phantom_1"], labels, 501, "Phantom", tmp_path, overwrite=True)
    assert json.loads((folder / "splits_final.json").read_text())[0]["train"] == ["phantom_2"]
    assert not (folder / "imagesTr" / "phantom_0_0000.nii.gz").exists()
    with pytest.raises(FileExistsError, match=r"dataset id 501 is taken by .*Dataset501_Phantom"):
        nnunet.export_dataset(cases, ["phantom_2"], [], labels, 501, "Other", tmp_path)
    for bad in (0, 1000, "5a"):
        with pytest.raises(ValueError, match=f"--export-nnunet {bad}: an nnU-Net dataset id is a number 1..999"):
            nnunet.export_dataset(cases, ["phantom_2"], [], labels, bad, "X", tmp_path)
    with pytest.raises(ValueError, match=r"set \$nnUNet_raw"):
        nnunet.export_dataset(cases, ["phantom_2"], [], labels, 9, "X")
    with pytest.raises(ValueError, match=r"\['phantom_1'\] are in both"):
        nnunet.export_dataset(cases, ["phantom_1"], ["phantom_1"], labels, 9, "X", tmp_path)
    unlabeled = {c["id"]: {**c, "label": None} for c in cases}
    with pytest.raises(ValueError, match=r"\['phantom_1'\] have no label file yet"):
        nnunet.export_dataset(unlabeled, ["phantom_1"], [], labels, 9, "X", tmp_path)


def test_export_run_uses_the_env_folders_and_prints_the_next_commands(msd, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    states = {"0": {"proxyrank": state(["phantom_4", "phantom_0", "phantom_2"], [2, 3])}}
    split = {"pool": ["phantom_0", "phantom_2", "phantom_3", "phantom_4"], "val": ["phantom_1", "phantom_5"]}
    lines = []
    labels = folders.read_task_info(msd)["labels"]
    folder = nnunet.export_run(tmp_path / "run", folders.read_msd(msd), states, split, labels,
                               502, "Phantom", iteration=1, log=lines.append)
    assert folder == tmp_path / "raw" / "Dataset502_Phantom"
    expected = [{"train": ["phantom_4", "phantom_0"], "val": ["phantom_1", "phantom_5"]}]
    assert json.loads((tmp_path / "pre" / "Dataset502_Phantom" / "splits_final.json").read_text()) == expected
    assert json.loads((folder / "dataset.json").read_text())["proxy_al"] == {
        "run": str((tmp_path / "run").resolve()), "strategy": "proxyrank", "seed": 0, "iteration": 1}
    assert "2 training + 2 validation cases (proxyrank, seed 0, iteration 1)" in lines[0]
    assert lines[1].startswith("training cases: phantom_4, phantom_0 (trained on at iteration 1")
    assert str(tmp_path / "pre" / "Dataset502_Phantom" / "splits_final.json") in lines[-2]
    assert lines[-1].endswith("nnUNetv2_train 502 3d_fullres 0")
    with pytest.raises(ValueError, match=r"split.json: cases \['phantom_4'\] of the run state are not in its pool"):
        nnunet.export_run(tmp_path / "run", folders.read_msd(msd), states, {"pool": ["phantom_0"], "val": []},
                          {0: "background", 1: "liver"}, 503, "P", iteration=1, log=lines.append)


# ---------------------------------------------------------------------------------------------- boxes


POOL, VAL = ["phantom_0", "phantom_2", "phantom_3", "phantom_4"], ["phantom_1", "phantom_5"]


def patch_queries(root, run, given=()):
    """Queries of a --query patch run of 4^3 boxes on the 6 msd phantoms at 5 mm, cut to the body box (case
    phantom_2's training grid is 8 x 5 x 13 voxels), its split written to run/split.json."""
    run.mkdir()
    (run / "split.json").write_text(json.dumps({"pool": POOL, "val": VAL}))
    cfg = SimpleNamespace(data=str(root), data_root="data", phantom_cases=0, spacing_mm=(5.0, 5.0, 5.0), crop="body",
                          window_hu=(), cache_dir=str(run.parent / "cache"), n_val=2, n_test=0, query="patch",
                          query_vox=(4, 4, 4))
    return Queries(cfg, Cases(cfg, RunFolder(run)))


def test_export_run_of_boxes_writes_partial_labels_on_each_label_files_grid(msd, tmp_path):
    """A case with boxes: its label inside them, the ignore label 3 outside, on the label file's own grid (here
    stored in another axis order than its image); a case also labeled whole, and the validation cases, linked."""
    root = tmp_path / "data"
    shutil.copytree(msd, root)
    label_path = root / "labelsTr" / "phantom_2.nii.gz"
    source = nib.load(label_path)
    label = np.asarray(source.dataobj)                                       # read before the file is replaced
    flipped = source.as_reoriented([[0, -1], [1, -1], [2, 1]])              # the same voxels in the world, RAS order
    nib.save(nib.Nifti1Image(np.asarray(flipped.dataobj).astype(np.int16), flipped.affine), label_path)
    queries = patch_queries(root, tmp_path / "run")
    units = ["phantom_2@0,0,0", "phantom_0", "phantom_2@4,1,6", "phantom_0@0,0,0"]
    states = {"0": {"rand": state(units, [4])}}
    folder = nnunet.export_run(tmp_path / "run", folders.read_msd(root), states, {"pool": POOL, "val": VAL},
                               folders.read_task_info(root)["labels"], 510, "Phantom", tmp_path / "raw",
                               log=lambda line: None, queries=queries)
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {
        "background": 0, "liver": 1, "tumour": 2, "ignore": 3}
    assert json.loads((folder / "splits_final.json").read_text()) == [{"train": ["phantom_2", "phantom_0"], "val": VAL}]
    for cid in ["phantom_0"] + VAL:
        assert os.path.samefile(folder / "labelsTr" / f"{cid}.nii.gz", root / "labelsTr" / f"{cid}.nii.gz")
    got = nib.load(folder / "labelsTr" / "phantom_2.nii.gz")
    assert got.get_data_dtype() == np.uint8 and np.array_equal(got.affine, flipped.affine)
    inside = annotate.box_mask(queries.cases, "phantom_2", [((0, 0, 0), (4, 4, 4)), ((4, 1, 6), (4, 4, 4))]) > 0
    assert 0 < inside.sum() < inside.size                                        # on the image's grid and order
    expected = np.where(inside, label, 3)
    np.testing.assert_array_equal(np.asarray(got.dataobj)[::-1, ::-1], expected)


def test_export_of_an_annotation_run_of_boxes_takes_the_boxes_the_run_confirmed(msd, tmp_path):
    """After an annotation run with boxes, a box acquired after the last iteration is exported once the run has
    confirmed it labeled (to_annotate/asked.json), as its case's label file also holds the boxes labeled before."""
    root = tmp_path / "data"
    shutil.copytree(msd, root)
    info = json.loads((root / "dataset.json").read_text())
    for entry in info["training"]:                                       # phantom_4 awaits a label: annotation mode
        if "phantom_4." in entry["label"]:
            (root / entry.pop("label")).unlink()
    (root / "dataset.json").write_text(json.dumps(info))
    queries = patch_queries(root, tmp_path / "run")
    assert queries.cases.annotation
    units = ["phantom_0", "phantom_2@0,0,0", "phantom_3@0,0,0", "phantom_2@4,1,6", "phantom_4@0,0,0"]
    states = {"0": {"rand": state(units, [2])}}
    (tmp_path / "run" / ASKED).parent.mkdir()
    (tmp_path / "run" / ASKED).write_text(json.dumps({"boxes": {
        "phantom_2@0,0,0": {"done": True}, "phantom_3@0,0,0": {"done": False}, "phantom_2@4,1,6": {"done": True}}}))
    lines = []
    export = lambda number, **kw: nnunet.export_run(
        tmp_path / "run", folders.read_msd(root), states, {"pool": POOL, "val": VAL},
        folders.read_task_info(root)["labels"], number, "Phantom", tmp_path / "raw", log=lines.append,
        queries=queries, **kw)
    folder = export(511)
    assert json.loads((folder / "splits_final.json").read_text())[0]["train"] == ["phantom_0", "phantom_2"]
    assert json.loads((folder / "dataset.json").read_text())["proxy_al"]["labeled_after_iteration"] == [
        "phantom_2@4,1,6"]
    got = np.asarray(nib.load(folder / "labelsTr" / "phantom_2.nii.gz").dataobj)
    inside = annotate.box_mask(queries.cases, "phantom_2", [((0, 0, 0), (4, 4, 4)), ((4, 1, 6), (4, 4, 4))]) > 0
    assert (got[~inside] == 3).all() and (got[inside] < 3).all()
    assert any(line.startswith("not exported: phantom_3@0,0,0, phantom_4@0,0,0 (acquired after iteration 1, not "
                               "confirmed labeled") and "rerun the run's command" in line for line in lines)
    assert json.loads((export(512, iteration=1) / "splits_final.json").read_text())[0]["train"] == [
        "phantom_0", "phantom_2"]


def test_export_of_boxes_refuses_a_label_with_values_beyond_the_classes(msd, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(msd, root)
    label_path = root / "labelsTr" / "phantom_3.nii.gz"
    source = nib.load(label_path)
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj) * 4, source.affine), label_path)
    states = {"0": {"rand": state(["phantom_3@0,0,0"], [1])}}
    with pytest.raises(ValueError, match=r"phantom_3.nii.gz: label values span 0..8; a label holds the class numbers "
                                         r"0..2 of dataset.json"):
        nnunet.export_run(tmp_path / "run", folders.read_msd(root), states, {"pool": POOL, "val": VAL},
                          folders.read_task_info(root)["labels"], 513, "Phantom", tmp_path / "raw",
                          log=lambda line: None, queries=patch_queries(root, tmp_path / "run"))
    assert [p.name for p in (tmp_path / "raw").iterdir()] == []                  # no dataset, no temporary folder
