"""Tests for nnU-Net v2 interchange: folders.read_msd on nnU-Net raw folders and nnunet.py's export, on a tiny
phantom. The last two tests run nnU-Net's own dataset checker and MSD converter when nnunetv2 is installed."""
import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import al_loop  # noqa: E402
import data  # noqa: E402
import nnunet  # noqa: E402
import tiny  # noqa: E402
from phantom import make_phantom_dataset  # noqa: E402
import folders

NNUNET_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    """6 phantom cases of 12 x 10 x 8 voxels, MSD layout, in a folder named as MSD names its tasks."""
    root = tmp_path_factory.mktemp("msd") / "Task09_Phantom"
    return make_phantom_dataset(root, 6, seed=1, shape_vox=(12, 10, 8), spacing_mm=(6.0, 6.0, 8.0))


@pytest.fixture(autouse=True)
def no_nnunet_env(monkeypatch):
    """Each test sets the nnU-Net folders it wants; none leaks in from the shell."""
    for name in NNUNET_ENV:
        monkeypatch.delenv(name, raising=False)


def nnunet_copy(msd_root, dest, labelled=None, **json_changes):
    """nnU-Net raw copy of an MSD folder: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz (only for
    `labelled` ids, default all), dataset.json with labels name -> int, changed by json_changes."""
    info = json.loads((msd_root / "dataset.json").read_text())
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    for case in folders.read_msd(msd_root):
        shutil.copy(case["image"], dest / "imagesTr" / f"{case['id']}_0000.nii.gz")
        if labelled is None or case["id"] in labelled:
            shutil.copy(case["label"], dest / "labelsTr" / f"{case['id']}.nii.gz")
    nn = {"name": info["name"], "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
          "labels": {name: int(k) for k, name in info["labels"].items()}, "numTraining": info["numTraining"]}
    (dest / "dataset.json").write_text(json.dumps({**nn, **json_changes}))
    return dest


# ---------------------------------------------------------------------------------------------- reading


def test_nnunet_raw_reads_like_the_msd_folder(msd, tmp_path):
    root = nnunet_copy(msd, tmp_path / "Dataset009_Phantom")
    cases, reference = folders.read_msd(root), folders.read_msd(msd)
    assert [c["id"] for c in cases] == [c["id"] for c in reference] == [f"phantom_{i}" for i in range(6)]
    assert all(c["image"].endswith(f"{c['id']}_0000.nii.gz") for c in cases)
    for c, r in zip(cases, reference):
        assert Path(c["label"]).read_bytes() == Path(r["label"]).read_bytes()
    assert folders.read_task_info(root) == folders.read_task_info(msd) == {
        "name": "Phantom", "labels": {0: "background", 1: "liver", 2: "tumour"}, "num_classes": 3}


def test_partly_labeled_nnunet_folder_pools_the_rest_and_finds_new_labels(msd, tmp_path):
    root = nnunet_copy(msd, tmp_path / "raw", labelled={"phantom_0", "phantom_3"})
    cases = folders.read_msd(root)
    assert [c["id"] for c in cases if c["label"]] == ["phantom_0", "phantom_3"]
    assert len(cases) == 6
    shutil.copy(msd / "labelsTr" / "phantom_5.nii.gz", root / "labelsTr" / "phantom_5.nii.gz")  # annotated later
    assert folders.read_msd(root)[5]["label"] == str(root / "labelsTr" / "phantom_5.nii.gz")


@pytest.mark.parametrize("change, match", [
    ({"channel_names": {"0": "CT", "1": "PET"}}, "'channel_names'.*single-channel"),
    ({"file_ending": ".mha"}, "'file_ending' is '.mha'.*NIfTI only"),
    ({"file_ending": ".png"}, "'file_ending' is '.png'")])
def test_nnunet_folder_refuses_what_it_cannot_read(msd, tmp_path, change, match):
    root = nnunet_copy(msd, tmp_path / "raw", **change)
    for reader in (folders.read_msd, folders.read_task_info):
        with pytest.raises(ValueError, match=match) as err:
            reader(root)
        assert str(root / "dataset.json") in str(err.value)


@pytest.mark.parametrize("change, match", [
    ({"regions_class_order": [1, 2]}, "region-based labels.*regions_class_order"),
    ({"labels": {"background": 0, "liver": [1, 2], "tumour": 2}},
     r"region-based labels \('regions_class_order' or labels \['liver'\]"),
    ({"labels": {"background": 0, "liver": 1, "tumour": 2, "ignore": 3}}, "'ignore' label")])
def test_nnunet_labels_refuse_regions_and_ignore(msd, tmp_path, change, match):
    root = nnunet_copy(msd, tmp_path / "raw", **change)
    with pytest.raises(ValueError, match=match) as err:
        folders.read_task_info(root)
    assert str(root / "dataset.json") in str(err.value)


def test_channel_named_images_without_json_pair_with_case_labels(msd, tmp_path):
    root = nnunet_copy(msd, tmp_path / "raw", labelled={"phantom_1"})
    (root / "dataset.json").unlink()
    cases = folders.read_msd(root)
    assert [c["id"] for c in cases] == [f"phantom_{i}" for i in range(6)]  # ids do not wait for a label
    assert [c["id"] for c in cases if c["label"]] == ["phantom_1"]
    assert cases[1]["label"] == str(root / "labelsTr" / "phantom_1.nii.gz")


def test_label_pairing_with_no_image_is_warned(msd, tmp_path):
    root = tmp_path / "msd"
    shutil.copytree(msd, root)
    shutil.copy(root / "labelsTr" / "phantom_0.nii.gz", root / "labelsTr" / "ghost_7.nii.gz")
    with pytest.warns(UserWarning, match=r"1 label file pairs with no image.*ghost_7.nii.gz.*rename or remove"):
        cases = folders.read_msd(root)
    assert all(c["label"] for c in cases)
    raw = nnunet_copy(msd, tmp_path / "raw")
    shutil.copy(raw / "labelsTr" / "phantom_0.nii.gz", raw / "labelsTr" / "phantom_0_0000.nii.gz")
    with pytest.warns(UserWarning, match="phantom_0_0000.nii.gz"):
        folders.read_msd(raw)


def test_label_with_the_wrong_ending_is_told_the_file_ending_and_the_name_expected(msd, tmp_path):
    """A label saved as .nii.gz in an nnU-Net folder whose file_ending is .nii is warned about naming
    'file_ending' and the name expected (labelsTr/<case>.nii); doing what the warning says pairs it."""
    root = nnunet_copy(msd, tmp_path / "raw", labelled={"phantom_0", "phantom_1"}, file_ending=".nii")
    for folder in ("imagesTr", "labelsTr"):     # the folder as file_ending .nii has it: uncompressed files
        for f in list((root / folder).iterdir()):
            f.with_suffix("").write_bytes(gzip.decompress(f.read_bytes()))
            f.unlink()
    assert folders.read_msd(root)[0]["label"] == str(root / "labelsTr" / "phantom_0.nii")
    saved = root / "labelsTr" / "phantom_2.nii.gz"          # the annotator's tool saves .nii.gz
    shutil.copy(msd / "labelsTr" / "phantom_2.nii.gz", saved)
    with pytest.warns(UserWarning, match=r"phantom_2.nii.gz.*'file_ending' '.nii'.*"
                                         r"labelsTr/phantom_2.nii.gz -> labelsTr/phantom_2.nii \(gunzip it"):
        cases = folders.read_msd(root)
    assert cases[2]["label"] is None
    (root / "labelsTr" / "phantom_2.nii").write_bytes(gzip.decompress(saved.read_bytes()))    # as told
    saved.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert folders.read_msd(root)[2]["label"] == str(root / "labelsTr" / "phantom_2.nii")


def test_labels_of_which_none_pairs_are_an_error(msd, tmp_path):
    root = nnunet_copy(msd, tmp_path / "raw")
    (root / "dataset.json").unlink()
    for p in (root / "imagesTr").iterdir():   # images renamed without the channel suffix: pairs nothing now
        p.rename(p.with_name(p.name.replace("phantom_", "scan_")))
    with pytest.raises(ValueError, match=r"labelsTr: none of its 6 label files \(phantom_0.nii.gz, .*\) pairs"):
        folders.read_msd(root)


def test_nnunet_raw_path_finds_names_and_ids(msd, tmp_path, monkeypatch):
    assert folders.nnunet_raw_path(msd) == msd
    with pytest.raises(ValueError, match=r"Dataset003_Liver.*\$nnUNet_raw is not set"):
        folders.nnunet_raw_path("Dataset003_Liver")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    folder = nnunet_copy(msd, tmp_path / "Dataset003_Liver")
    assert folders.nnunet_raw_path("Dataset003_Liver") == folder
    assert folders.nnunet_raw_path(3) == folders.nnunet_raw_path("003") == folder
    with pytest.raises(FileNotFoundError, match="Dataset004_Liver: not found"):
        folders.nnunet_raw_path("Dataset004_Liver")
    with pytest.raises(FileNotFoundError, match="no dataset folders Dataset007_"):
        folders.nnunet_raw_path(7)
    with pytest.raises(FileNotFoundError, match="no_such_folder: no such data folder"):
        folders.nnunet_raw_path(tmp_path / "no_such_folder")


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


def test_export_after_an_annotation_run_includes_the_last_rounds_labels(phantom, tmp_path, capsys):
    """After an annotation run has ended and the user has labeled what its last round asked for, the default
    export holds every labeled case (those cases too) and says which cases and from where; --iteration N
    still gives the training set of iteration N."""
    root, out = tmp_path / "mine", tmp_path / "run"
    shutil.copytree(phantom, root)
    answers = tmp_path / "answers"                          # what the annotator will draw
    shutil.copytree(root / "labelsTr", answers)
    info = json.loads((root / "dataset.json").read_text())
    for entry in info["training"]:                          # labels for 4 of the 10 scans; the rest unlabeled
        if not entry["label"].endswith(("_0.nii.gz", "_1.nii.gz", "_2.nii.gz", "_3.nii.gz")):
            (root / entry.pop("label")).unlink()
    (root / "dataset.json").write_text(json.dumps(info))
    args = tiny.args(root, out, "--strategy", "rand", "--k", "1")
    for _ in range(5):                                      # rounds: run, label what it asks for, rerun
        assert al_loop.main(args) == 0
        if "need labels" not in capsys.readouterr().out:
            break
        with open(out / "to_annotate.csv") as f:
            for row in csv.DictReader(f):
                shutil.copy(answers / Path(row["save_label_as"]).name, row["save_label_as"])
    st = json.loads((out / "state" / "seed0_rand.json").read_text())
    last = st["iterations"][-1]
    assert len(st["iterations"]) == 2 and last["acquired"] and last["n_labeled"] == len(st["labeled"]) - 1
    assert all(Path(root / "labelsTr" / f"{c}.nii.gz").is_file() for c in st["labeled"])   # all labeled now
    export = ["--out", str(out), "--export-to", str(tmp_path / "raw"), "--export-nnunet"]
    assert al_loop.main(export + ["501"]) == 0
    printed = capsys.readouterr().out
    splits = json.loads((tmp_path / "raw" / "Dataset501_Phantom" / "splits_final.json").read_text())
    assert splits[0]["train"] == st["labeled"]              # the last round's case included
    assert f"{last['acquired'][0]} (acquired after iteration 2, labels from {root / 'labelsTr'})" in printed
    assert "training cases: " + ", ".join(st["labeled"][:-1]) + " (trained on at iteration 2" in printed
    assert al_loop.main(export + ["502", "--iteration", "2"]) == 0
    splits = json.loads((tmp_path / "raw" / "Dataset502_Phantom" / "splits_final.json").read_text())
    assert splits[0]["train"] == st["labeled"][:last["n_labeled"]]


# ---------------------------------------------------------------------------------------------- nnU-Net itself


def run_nnunet(code, tmp_path):
    """Run `code` in a fresh Python with nnU-Net's folders under tmp_path: nnunetv2.paths reads them when
    first imported, so a process of its own sees exactly these."""
    env = {**os.environ, **{name: str(tmp_path / name) for name in NNUNET_ENV}}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_export_passes_nnunet_verify_dataset_integrity(msd, tmp_path):
    pytest.importorskip("nnunetv2", reason="nnU-Net v2 not installed (pip install torch==2.13.0 nnunetv2)")
    cases, labels = folders.read_msd(msd), folders.read_task_info(msd)["labels"]
    folder = nnunet.export_dataset(cases, ["phantom_0", "phantom_2", "phantom_4"], ["phantom_1"], labels, 501,
                                   "Phantom", tmp_path / "nnUNet_raw")
    out = run_nnunet("from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity; "
                     f"verify_dataset_integrity({str(folder)!r}, num_processes=1)", tmp_path)
    assert "verify_dataset_integrity Done" in out


def test_nnunet_msd_conversion_reads_as_the_msd_folder(msd, tmp_path):
    pytest.importorskip("nnunetv2", reason="nnU-Net v2 not installed (pip install torch==2.13.0 nnunetv2)")
    source = tmp_path / msd.name
    shutil.copytree(msd, source)
    (source / "imagesTs").mkdir()     # the converter requires it
    run_nnunet("from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset; "
               f"convert_msd_dataset({str(source)!r}, overwrite_target_id=509, num_processes=1)", tmp_path)
    converted = tmp_path / "nnUNet_raw" / "Dataset509_Phantom"
    cases, reference = folders.read_msd(converted), folders.read_msd(msd)
    assert [c["id"] for c in cases] == [c["id"] for c in reference]
    assert all(c["image"].endswith("_0000.nii.gz") and c["label"] for c in cases)
    assert folders.read_task_info(converted) == folders.read_task_info(msd)
