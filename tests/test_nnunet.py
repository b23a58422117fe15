"""nnunet.py: which run and iteration an export takes, and the exported nnU-Net v2 dataset (layout, links,
dataset.json, uncompressed NIfTI converted, what is refused, the next commands printed). Tiny phantom, CPU."""
import json
import os
from pathlib import Path
import sys

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nnunet
import folders


# ---------------------------------------------------------------------------------------------- selection


def state(labeled, n_labeled):
    return {"labeled": labeled, "scores": {}, "iterations": [{"n_labeled": n, "acquired": []} for n in n_labeled]}


def test_selection_defaults_to_the_only_run_and_last_iteration():
    states = {"0": {"proxyrank": state(["a", "b", "c", "d", "e"], [2, 4])}}
    assert nnunet.selection(states) == ("proxyrank", 0, 2, ["a", "b", "c", "d"])
    assert nnunet.selection(states, iteration=1) == ("proxyrank", 0, 1, ["a", "b"])
    assert nnunet.selection(states, "proxyrank", 0, 2)[3] == ["a", "b", "c", "d"]


def test_selection_ambiguities_list_the_choices():
    states = {"0": {"random": state(["a", "b"], [2]), "proxyrank": state(["c", "d"], [2])},
              "1": {"random": state(["b", "a"], [2])}}
    with pytest.raises(ValueError, match=r"2 seeds \['0', '1'\]; choose one with --seed"):
        nnunet.selection(states)
    with pytest.raises(ValueError, match=r"2 strategies \['proxyrank', 'random'\]; choose one with --strategy"):
        nnunet.selection(states, seed=0)
    assert nnunet.selection(states, seed="1") == ("random", 1, 1, ["b", "a"])
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
    folder = nnunet.export_run(tmp_path / "run", folders.read_msd(msd), states, split, folders.read_task_info(msd)["labels"],
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
