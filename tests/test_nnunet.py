"""Tests for nnU-Net v2 interchange: data.read_msd on nnU-Net raw folders, on a tiny phantom."""
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from phantom import make_phantom_dataset  # noqa: E402

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
    for case in data.read_msd(msd_root):
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
    cases, reference = data.read_msd(root), data.read_msd(msd)
    assert [c["id"] for c in cases] == [c["id"] for c in reference] == [f"phantom_{i}" for i in range(6)]
    assert all(c["image"].endswith(f"{c['id']}_0000.nii.gz") for c in cases)
    for c, r in zip(cases, reference):
        assert Path(c["label"]).read_bytes() == Path(r["label"]).read_bytes()
    assert data.read_task_info(root) == data.read_task_info(msd) == {
        "name": "Phantom", "labels": {0: "background", 1: "liver", 2: "tumour"}, "num_classes": 3}


def test_partly_labeled_nnunet_folder_pools_the_rest_and_finds_new_labels(msd, tmp_path):
    root = nnunet_copy(msd, tmp_path / "raw", labelled={"phantom_0", "phantom_3"})
    cases = data.read_msd(root)
    assert [c["id"] for c in cases if c["label"]] == ["phantom_0", "phantom_3"]
    assert len(cases) == 6
    shutil.copy(msd / "labelsTr" / "phantom_5.nii.gz", root / "labelsTr" / "phantom_5.nii.gz")  # annotated later
    assert data.read_msd(root)[5]["label"] == str(root / "labelsTr" / "phantom_5.nii.gz")


@pytest.mark.parametrize("change, match", [
    ({"channel_names": {"0": "CT", "1": "PET"}}, "'channel_names'.*single-channel"),
    ({"file_ending": ".mha"}, "'file_ending' is '.mha'.*NIfTI only"),
    ({"file_ending": ".png"}, "'file_ending' is '.png'")])
def test_nnunet_folder_refuses_what_it_cannot_read(msd, tmp_path, change, match):
    root = nnunet_copy(msd, tmp_path / "raw", **change)
    for reader in (data.read_msd, data.read_task_info):
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
        data.read_task_info(root)
    assert str(root / "dataset.json") in str(err.value)


def test_channel_named_images_without_json_pair_with_case_labels(msd, tmp_path):
    root = nnunet_copy(msd, tmp_path / "raw", labelled={"phantom_1"})
    (root / "dataset.json").unlink()
    cases = data.read_msd(root)
    assert [c["id"] for c in cases] == [f"phantom_{i}" for i in range(6)]  # ids do not wait for a label
    assert [c["id"] for c in cases if c["label"]] == ["phantom_1"]
    assert cases[1]["label"] == str(root / "labelsTr" / "phantom_1.nii.gz")


def test_label_pairing_with_no_image_is_warned(msd, tmp_path):
    root = tmp_path / "msd"
    shutil.copytree(msd, root)
    shutil.copy(root / "labelsTr" / "phantom_0.nii.gz", root / "labelsTr" / "ghost_7.nii.gz")
    with pytest.warns(UserWarning, match=r"1 label files pair with no image.*ghost_7.nii.gz.*rename or remove"):
        cases = data.read_msd(root)
    assert all(c["label"] for c in cases)
    raw = nnunet_copy(msd, tmp_path / "raw")
    shutil.copy(raw / "labelsTr" / "phantom_0.nii.gz", raw / "labelsTr" / "phantom_0_0000.nii.gz")
    with pytest.warns(UserWarning, match="phantom_0_0000.nii.gz"):
        data.read_msd(raw)


def test_labels_of_which_none_pairs_are_an_error(msd, tmp_path):
    root = nnunet_copy(msd, tmp_path / "raw")
    (root / "dataset.json").unlink()
    for p in (root / "imagesTr").iterdir():   # images renamed without the channel suffix: pairs nothing now
        p.rename(p.with_name(p.name.replace("phantom_", "scan_")))
    with pytest.raises(ValueError, match=r"labelsTr: none of its 6 label files \(phantom_0.nii.gz, .*\) pairs"):
        data.read_msd(root)


def test_nnunet_raw_path_finds_names_and_ids(msd, tmp_path, monkeypatch):
    assert data.nnunet_raw_path(msd) == msd
    with pytest.raises(ValueError, match=r"Dataset003_Liver.*\$nnUNet_raw is not set"):
        data.nnunet_raw_path("Dataset003_Liver")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    folder = nnunet_copy(msd, tmp_path / "Dataset003_Liver")
    assert data.nnunet_raw_path("Dataset003_Liver") == folder
    assert data.nnunet_raw_path(3) == data.nnunet_raw_path("003") == folder
    with pytest.raises(FileNotFoundError, match="Dataset004_Liver: not found"):
        data.nnunet_raw_path("Dataset004_Liver")
    with pytest.raises(FileNotFoundError, match="no dataset folders Dataset007_"):
        data.nnunet_raw_path(7)
    with pytest.raises(FileNotFoundError, match="no_such_folder: no such data folder"):
        data.nnunet_raw_path(tmp_path / "no_such_folder")
