"""folders.py: reading MSD and nnU-Net raw folders (dataset.json, pairing images and labels by name, what is
refused), the task's labels, nnU-Net dataset names and ids. Tiny synthetic NIfTI files, CPU, seconds."""
import gzip
import json
import os
from pathlib import Path
import shutil
import warnings

import numpy as np
import pytest

import data
import folders
from cases import default_n_val
from tiny import SHARED_DATA, make_msd, save


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


# ---------------------------------------------------------------------------------------------- read_msd


def test_read_msd_with_dataset_json_natural_order(tmp_path):
    make_msd(tmp_path, ["liver_10", "liver_2", "liver_1"])
    cases = folders.read_msd(tmp_path)
    assert [c["id"] for c in cases] == ["liver_1", "liver_2", "liver_10"]
    assert cases[1]["image"] == str(tmp_path / "./imagesTr/liver_2.nii.gz")
    assert all(Path(c["image"]).is_file() and Path(c["label"]).is_file() for c in cases)


def test_read_msd_without_json_pairs_by_name_and_skips_appledouble(tmp_path):
    make_msd(tmp_path, ["case_10", "case_2", "case_1"], labelled=["case_2"], with_json=False)
    (tmp_path / "imagesTr" / "._case_2.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    save(tmp_path / "imagesTr" / "case_3.nii", np.zeros((4, 5, 6), np.int16))  # uncompressed also counts
    cases = folders.read_msd(tmp_path)
    assert [c["id"] for c in cases] == ["case_1", "case_2", "case_3", "case_10"]
    assert [c["label"] is not None for c in cases] == [False, True, False, False]


def test_two_label_files_for_one_case_are_refused_naming_both(tmp_path):
    """A case with a label under both accepted names (labelsTr/<case> and labelsTr/<case>_0000) is refused with
    a message naming the two files, instead of one of them being picked silently."""
    rng = np.random.default_rng(0)
    for name in ("ph1", "ph2"):
        save(tmp_path / "imagesTr" / f"{name}_0000.nii.gz", rng.integers(-200, 300, (6, 5, 4)).astype(np.int16))
    save(tmp_path / "labelsTr" / "ph1.nii.gz", np.ones((6, 5, 4), np.uint8))
    assert folders.read_msd(tmp_path)[0]["label"] == str(tmp_path / "labelsTr" / "ph1.nii.gz")
    shutil.copy(tmp_path / "labelsTr" / "ph1.nii.gz", tmp_path / "labelsTr" / "ph1_0000.nii.gz")   # saved again
    with pytest.raises(ValueError, match=r"labelsTr/ph1.nii.gz and .*labelsTr/ph1_0000.nii.gz are both labels of "
                                         r"case ph1 .*keep one"):
        folders.read_msd(tmp_path)


def test_read_msd_listed_image_missing_names_the_file(tmp_path):
    make_msd(tmp_path, ["a_1", "ghost_7"])
    os.remove(tmp_path / "imagesTr" / "ghost_7.nii.gz")
    with pytest.raises(FileNotFoundError, match="ghost_7.nii.gz"):
        folders.read_msd(tmp_path)


def test_read_msd_listed_label_missing_is_unlabeled_with_warning(tmp_path):
    make_msd(tmp_path, ["a_1", "a_2"], labelled=["a_1"])
    with pytest.warns(UserWarning, match="a_2.nii.gz"):
        cases = folders.read_msd(tmp_path)
    assert cases[0]["label"] is not None and cases[1]["label"] is None


@pytest.mark.parametrize("text", ['{"training": [', '{"name": "x"}', '{"training": ["./imagesTr/a_1.nii.gz"]}',
                                  '{"training": {"image": "x"}}', '{"training": []}', "[1, 2]"])
def test_read_msd_malformed_json_raises_naming_the_file(tmp_path, text):
    make_msd(tmp_path, ["a_1"])
    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(ValueError, match="dataset.json"):
        folders.read_msd(tmp_path)


def test_read_msd_missing_folder_and_empty_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        folders.read_msd(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="imagesTr"):
        folders.read_msd(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "imagesTr" / "._junk.nii.gz").write_bytes(b"x")
    with pytest.raises(ValueError, match="imagesTr"):
        folders.read_msd(tmp_path)


def test_real_task08_dataset_json_is_accepted(tmp_path):
    source = SHARED_DATA / "msd_json" / "Task08_HepaticVessel_dataset.json"
    if not source.is_file():
        pytest.skip(f"{source} not present")
    shutil.copy(source, tmp_path / "dataset.json")
    info = json.loads(source.read_text())
    for entry in info["training"]:  # empty placeholders: read_msd checks existence, not content
        for key in ("image", "label"):
            (tmp_path / entry[key]).parent.mkdir(exist_ok=True)
            (tmp_path / entry[key]).touch()
    cases = folders.read_msd(tmp_path)
    assert len(cases) == 303 and len(info["test"]) == 139 and info["numTest"] == 140
    assert cases[0]["id"] == "hepaticvessel_001" and all(c["label"] for c in cases)
    task = folders.read_task_info(tmp_path)
    assert task == {"name": "HepaticVessel", "labels": {0: "background", 1: "Vessel", 2: "Tumour"}, "num_classes": 3}
    assert data.task_window(task["name"]) == (-3.0, 243.0)
    assert default_n_val(task["name"], len(cases)) == 61


def test_task_info_and_windows(tmp_path):
    make_msd(tmp_path / "Task03_Liver", ["a_1"], with_json=False)
    assert folders.read_task_info(tmp_path / "Task03_Liver") == {
        "name": "Task03_Liver", "labels": {0: "background", 1: "foreground"}, "num_classes": 2}
    assert data.task_window("Task03_Liver") == (-21.0, 189.0)
    assert data.task_window("Liver") == (-21.0, 189.0)
    assert data.task_window("Task08_HepaticVessel") == (-3.0, 243.0)
    assert data.task_window("Phantom") == tuple(float(v) for v in data.DEFAULT_WINDOW_HU)
    assert data.task_window("Liver", override=(-100, 200)) == (-100.0, 200.0)
    with pytest.raises(ValueError):
        data.task_window("Liver", override=(10, 10))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "dataset.json").write_text('{"training": [], "labels": {"0": "bg", "2": "x"}}')
    with pytest.raises(ValueError, match="labels"):
        folders.read_task_info(tmp_path / "t")


def test_labels_listed_but_not_there_yet_are_said_once_as_a_count(tmp_path):
    """An annotation run's dataset.json lists labels the user has not made yet: one warning with the count, not
    one line per case."""
    root = make_msd(tmp_path / "Task03_Liver", [f"liver_{i}" for i in range(6)], labelled=["liver_0", "liver_1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cases = folders.read_msd(root)
    assert sum(c["label"] is None for c in cases) == 4
    texts = [str(w.message) for w in caught]
    assert len(texts) == 1 and "4 label file(s) listed but not in labelsTr/ yet (liver_2.nii.gz" in texts[0]
