"""Tests for data.py: tiny synthetic NIfTI volumes in MSD layout, odd sizes, non-identity affines. CPU, seconds."""
import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import files
import folders
import train
from cases import default_n_val, split_cases

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LPS_AFFINE = np.array([[-0.8, 0, 0, 40.0], [0, -0.9, 0, 60.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])


def save(path, array, affine=LPS_AFFINE, slope_inter=None):
    """Write a NIfTI (gzip when the name says so) with nibabel, as a scanner export would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=float))
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    nib.save(img, str(path))
    return str(path)


def make_msd(root, names, labelled=None, shape=(9, 11, 7), with_json=True):
    """MSD folder with int16 images and uint8 labels; labelled: names that get a label (default all)."""
    rng = np.random.default_rng(0)
    labelled = names if labelled is None else labelled
    training = []
    for name in names:
        save(root / "imagesTr" / f"{name}.nii.gz", rng.integers(-200, 300, shape).astype(np.int16))
        if name in labelled:
            save(root / "labelsTr" / f"{name}.nii.gz", (rng.random(shape) < 0.3).astype(np.uint8))
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    if with_json:
        info = {"name": "Liver", "labels": {"0": "background", "1": "liver"}, "numTraining": len(names),
                "training": training, "test": ["./imagesTs/x_9.nii.gz"]}
        (root / "dataset.json").write_text(json.dumps(info))
    return root


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


# ---------------------------------------------------------------------------------------------- load_ct


@pytest.mark.parametrize("affine", [
    LPS_AFFINE,
    np.array([[0, -0.7, 0, 10.0], [1.2, 0, 0, -5.0], [0, 0, -3.0, 100.0], [0, 0, 0, 1]]),  # axes swapped + flips
])
def test_load_ct_returns_ras_with_marker_in_place(tmp_path, affine):
    stored = np.zeros((5, 7, 3), np.int16)
    stored[1, 2, 0] = 500
    path = save(tmp_path / "m.nii.gz", stored, affine)
    volume, spacing_mm = data.load_ct(path)
    # Expected RAS index: world position relative to the most right-anterior-superior-negative corner.
    corners = np.array([[i, j, k, 1] for i in (0, 4) for j in (0, 6) for k in (0, 2)]) @ affine.T
    world = affine @ np.array([1, 2, 0, 1])
    expected_spacing = np.abs(affine[:3, :3]).sum(axis=1)  # world axis x, y, z
    expected_index = np.rint((world[:3] - corners[:, :3].min(axis=0)) / expected_spacing).astype(int)
    assert volume.dtype == np.float32 and volume.flags.c_contiguous
    assert np.allclose(spacing_mm, expected_spacing)
    assert tuple(np.argwhere(volume == 500)[0]) == tuple(expected_index)
    assert nib.aff2axcodes(affine) != ("R", "A", "S")


def test_load_ct_applies_slope_inter_and_int_types(tmp_path):
    raw = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    volume, _ = data.load_ct(save(tmp_path / "s.nii.gz", raw, np.eye(4), slope_inter=(2.0, -1024.0)))
    assert np.array_equal(volume, raw.astype(np.float32) * 2 - 1024)
    for dtype in (np.int32, np.uint8, np.float32):
        volume, spacing_mm = data.load_ct(save(tmp_path / f"{np.dtype(dtype).name}.nii.gz", raw.astype(dtype)))
        assert volume.dtype == np.float32 and np.array_equal(volume, raw[::-1, ::-1, :].astype(np.float32))
        assert np.allclose(spacing_mm, (0.8, 0.9, 2.5))


def test_load_ct_shape_and_file_errors(tmp_path):
    volume, _ = data.load_ct(save(tmp_path / "one.nii.gz", np.ones((4, 5, 6, 1), np.int16)))
    assert volume.shape == (4, 5, 6)
    with pytest.raises(ValueError, match="four.nii.gz.*3-D"):
        data.load_ct(save(tmp_path / "four.nii.gz", np.ones((4, 5, 6, 2), np.int16)))
    with pytest.raises(ValueError, match="flat.nii.gz"):
        data.load_ct(save(tmp_path / "flat.nii.gz", np.ones((4, 5), np.int16)))
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(ValueError, match="junk.nii.gz"):
        data.load_ct(tmp_path / "junk.nii.gz")
    full = (tmp_path / "one.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="cut.nii.gz"):
        data.load_ct(tmp_path / "cut.nii.gz")
    with pytest.raises(FileNotFoundError, match="absent.nii.gz"):
        data.load_ct(tmp_path / "absent.nii.gz")


# ---------------------------------------------------------------------------------------------- resampling


def test_preprocess_keeps_extent_and_label_values(tmp_path):
    shape, native_mm = (17, 23, 19), (1.0, 0.8, 2.5)
    affine = np.diag([-1.0, 0.8, -2.5, 1.0])
    x_mm = np.arange(shape[0], dtype=np.float32)[::-1, None, None] * 1.0  # stored x axis is flipped
    image = np.broadcast_to(x_mm * 10, shape).astype(np.int16)           # a ramp along RAS x: 10 HU per mm
    label = np.zeros(shape, np.uint8)
    label[2:9, 3:15, 4:12], label[10:16, 12:20, 10:17] = 1, 2
    image_hu, label_out = data.preprocess_case(save(tmp_path / "i.nii.gz", image, affine),
                                               save(tmp_path / "l.nii.gz", label, affine), (1.5, 1.5, 2.0))
    expected_shape = (11, 12, 24)  # round(17 * 1.0 / 1.5), round(23 * 0.8 / 1.5), round(19 * 2.5 / 2.0)
    assert image_hu.shape == label_out.shape == expected_shape
    assert image_hu.dtype == np.float32 and label_out.dtype == np.uint8
    assert set(np.unique(label_out)) == {0, 1, 2}
    # Voxel centres map as src = (dst + 0.5) * n_src / n_dst - 0.5: a linear ramp is reproduced exactly inside.
    src = (np.arange(11) + 0.5) * 17 / 11 - 0.5
    inside = (src >= 0) & (src <= 16)
    ras_ramp = (16 - np.arange(17))[::-1] * 10.0  # RAS x index i holds 10 * i HU
    assert np.allclose(image_hu[inside, 5, 5], np.interp(src[inside], np.arange(17), ras_ramp), atol=1e-3)
    assert abs(image_hu.mean() - image.mean()) < 2.0  # physical extent kept: no shift of the ramp


def test_resample_identity_and_label_exact_values():
    rng = np.random.default_rng(1)
    volume = rng.normal(0, 100, (7, 9, 5)).astype(np.float32)
    assert np.array_equal(data.resample_image(volume, (1, 2, 3), (1, 2, 3)), volume)
    label = rng.choice(np.array([0, 3, 7], np.uint8), size=(15, 13, 11))
    down = data.resample_label(label, (1, 1, 1), (2.2, 1.7, 3.1))
    assert down.dtype == np.uint8 and set(np.unique(down)) <= {0, 3, 7}
    fortran = np.asfortranarray(volume)[::-1]  # memory order and negative strides must not change the result
    assert np.allclose(data.resample_image(fortran, (1, 1, 1), (0.6, 1.3, 0.9)),
                       data.resample_image(np.ascontiguousarray(fortran), (1, 1, 1), (0.6, 1.3, 0.9)), atol=1e-4)


def test_preprocess_rejects_mismatched_image_and_label(tmp_path):
    image = save(tmp_path / "img.nii.gz", np.zeros((6, 7, 8), np.int16))
    small = save(tmp_path / "small.nii.gz", np.zeros((6, 7, 5), np.uint8))
    with pytest.raises(ValueError, match="img.nii.gz.*small.nii.gz"):
        data.preprocess_case(image, small)
    moved = LPS_AFFINE.copy()
    moved[0, 3] += 5.0
    shifted = save(tmp_path / "shifted.nii.gz", np.zeros((6, 7, 8), np.uint8), moved)
    with pytest.raises(ValueError, match="shifted.nii.gz"):
        data.preprocess_case(image, shifted)


def test_window_clips_and_scales():
    hu = np.array([-1000, -21, 84, 189, 3000], np.int16)
    out = data.window(hu, -21, 189)
    assert out.dtype == np.float32 and np.allclose(out, [0, 0, 0.5, 1, 1])
    with pytest.raises(ValueError):
        data.window(hu, 5, 5)


# ---------------------------------------------------------------------------------------------- cache


@pytest.fixture
def one_case(tmp_path):
    make_msd(tmp_path / "msd", ["c_1"], shape=(13, 11, 9))
    return folders.read_msd(tmp_path / "msd")[0]


@pytest.fixture
def count_reads(monkeypatch):
    """Count every voxel read (all reads in data.py go through _read_nifti_ras)."""
    calls = []
    original = data._read_nifti_ras

    def counting(path):
        calls.append(str(path))
        return original(path)
    monkeypatch.setattr(data, "_read_nifti_ras", counting)
    return calls


def test_cache_builds_once_then_memory_maps(one_case, tmp_path, count_reads, monkeypatch):
    image, label = data.cached_case(one_case, tmp_path / "cache", (1.5, 1.5, 2.0))
    assert len(count_reads) == 2
    hu, lab = data.preprocess_case(one_case["image"], one_case["label"], (1.5, 1.5, 2.0))
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert np.array_equal(image, np.rint(hu)) and np.array_equal(label, lab)
    count_reads.clear()
    monkeypatch.setattr(data, "load_ct", lambda *a: pytest.fail("cache hit must not load the image"))
    image2, label2 = data.cached_case(one_case, tmp_path / "cache", (1.5, 1.5, 2.0))
    assert count_reads == [] and isinstance(image2, np.memmap) and isinstance(label2, np.memmap)
    assert np.array_equal(image2, image) and np.array_equal(label2, label)
    data.cached_case(one_case, tmp_path / "cache", (2.0, 2.0, 2.0))  # another spacing is another entry
    assert len(count_reads) == 2 and len(list((tmp_path / "cache").glob("*.npy"))) == 4


def test_cache_rebuilds_stale_entry_when_source_changes(one_case, tmp_path, count_reads):
    image, _ = data.cached_case(one_case, tmp_path / "cache")
    old_files = set((tmp_path / "cache").glob("*image*.npy"))
    save(one_case["image"], np.full((13, 11, 9), 77, np.int16))
    stat = os.stat(one_case["image"])
    os.utime(one_case["image"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    count_reads.clear()
    image2, _ = data.cached_case(one_case, tmp_path / "cache")
    assert count_reads == [one_case["image"]]  # image rebuilt, label entry still valid
    assert np.all(image2 == 77) and not np.all(image == 77)
    new_files = set((tmp_path / "cache").glob("*image*.npy"))
    assert len(new_files) == 1 and new_files.isdisjoint(old_files)  # the stale entry was deleted


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape"])
def test_cache_rebuilds_corrupt_entry(one_case, tmp_path, count_reads, damage):
    image, _ = data.cached_case(one_case, tmp_path / "cache", with_label=False)
    entry = next((tmp_path / "cache").glob("*image*.npy"))
    expected = np.array(image)
    del image
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:200])
    elif damage == "garbage":
        entry.write_bytes(b"\x00garbage" * 50)
    else:
        np.save(entry, np.zeros((3, 3, 3), np.int16))
    count_reads.clear()
    with pytest.warns(UserWarning, match="rebuilding"):
        image2, _ = data.cached_case(one_case, tmp_path / "cache", with_label=False)
    assert count_reads == [one_case["image"]] and np.array_equal(image2, expected)


def damage_voxels(entry, value):
    """Overwrite every voxel of a .npy cache entry in place with `value`, its header left intact (a bad disk
    block or a botched copy)."""
    with open(entry, "r+b") as f:
        np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        f.write(np.full(shape, value, dtype).tobytes())


def test_cache_entry_with_garbage_voxels_is_detected_and_rebuilt(one_case, tmp_path, count_reads, monkeypatch):
    """A cache entry whose header is intact but whose voxels are garbage is not trusted: a warning names the
    entry and it is rebuilt from the image file; so is an entry whose checksum file is missing."""
    image, _ = data.cached_case(one_case, tmp_path / "cache", with_label=False)
    expected = np.array(image)
    del image
    entry = next((tmp_path / "cache").glob("*image*.npy"))
    damage_voxels(entry, 1000)
    assert np.all(np.load(entry) == 1000)                       # the damage is there, the header still reads
    monkeypatch.setattr(data, "_VERIFIED", set(), raising=False)               # a later process: no entry checked yet
    count_reads.clear()
    with pytest.warns(UserWarning, match=f"{entry.name}: cache entry is damaged.*rebuilding"):
        image, _ = data.cached_case(one_case, tmp_path / "cache", with_label=False)
    assert count_reads == [one_case["image"]] and np.array_equal(image, expected)
    del image
    entry.with_name(entry.name + ".crc32").unlink()            # a cache folder tidied by hand
    monkeypatch.setattr(data, "_VERIFIED", set(), raising=False)
    with pytest.warns(UserWarning, match=f"{entry.name}: cache entry is damaged"):
        image, _ = data.cached_case(one_case, tmp_path / "cache", with_label=False)
    assert np.array_equal(image, expected)
    count_reads.clear()
    monkeypatch.setattr(data, "_VERIFIED", set(), raising=False)
    data.cached_case(one_case, tmp_path / "cache", with_label=False)        # intact again: a plain hit
    assert count_reads == []


def test_damaged_label_cache_entry_does_not_blame_the_label_file(one_case, tmp_path, monkeypatch):
    """Garbage voxels in a label's cache entry (255 everywhere) warn naming the entry and rebuild it, instead
    of calling the user's correct label file wrong."""
    _, label = data.cached_case(one_case, tmp_path / "cache", num_classes=2)
    expected = np.array(label)
    del label
    entry = next((tmp_path / "cache").glob("*label*.npy"))
    damage_voxels(entry, 255)
    monkeypatch.setattr(data, "_VERIFIED", set(), raising=False)               # a later process
    with pytest.warns(UserWarning, match=f"{entry.name}: cache entry is damaged"):
        _, label = data.cached_case(one_case, tmp_path / "cache", num_classes=2)
    assert np.array_equal(label, expected)


def test_cache_without_label_never_opens_the_label(one_case, tmp_path, monkeypatch):
    opened = []
    original = nib.load
    monkeypatch.setattr(data.nib, "load", lambda path, *a, **k: opened.append(str(path)) or original(path, *a, **k))
    image, label = data.cached_case(one_case, tmp_path / "cache", with_label=False)
    assert label is None and image.ndim == 3
    assert opened and all("labelsTr" not in p for p in opened)
    os.remove(one_case["label"])  # the oracle's labels may not even exist yet
    image, label = data.cached_case(one_case, tmp_path / "cache", with_label=False)
    assert label is None


def test_cache_checks_classes_and_grid(tmp_path):
    make_msd(tmp_path / "msd", ["c_1"], shape=(8, 9, 7))
    case = folders.read_msd(tmp_path / "msd")[0]
    save(case["label"], np.full((8, 9, 7), 2, np.uint8))
    with pytest.raises(ValueError, match="c_1.nii.gz.*2"):
        data.cached_case(case, tmp_path / "cache", num_classes=2)
    assert data.cached_case(case, tmp_path / "cache", num_classes=3)[1].max() == 2
    save(case["label"], np.zeros((8, 9, 6), np.uint8))
    with pytest.raises(ValueError, match="imagesTr.*labelsTr"):
        data.cached_case(case, tmp_path / "cache")


# ---------------------------------------------------------------------------------------------- patches


def test_foreground_index_lists_present_classes():
    label = np.zeros((5, 6, 7), np.uint8)
    label[1, 2, 3], label[4, 5, 6] = 1, 3
    index = train.foreground_index(label)
    assert sorted(index) == [1, 3]
    assert np.unravel_index(int(index[3][0]), label.shape) == (4, 5, 6)


def test_sample_patch_foreground_ratio_and_class_balance():
    rng = np.random.default_rng(0)
    image = rng.normal(50, 100, (21, 19, 17)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[4:7, 5:8, 6:9] = 1            # 27 voxels = 0.4 % of the volume
    label[15, 15, 15] = 2               # one voxel: by class, still half of the foreground-centred draws
    fg_index = train.foreground_index(label)
    centres = []
    for _ in range(800):
        patch, lab = train.sample_patch(image, label, (9, 8, 7), 0.3, rng, (-21, 189), fg_index, by_class=True)
        centres.append(lab[4, 4, 3])    # the centre voxel sits at patch_vox // 2
    centres = np.array(centres)
    assert patch.shape == (9, 8, 7) and patch.dtype == np.float32 and lab.dtype == np.uint8
    assert abs((centres > 0).mean() - 0.3) < 0.06     # background centres land on background only
    assert abs((centres == 2).sum() / (centres > 0).sum() - 0.5) < 0.12


def test_sample_patch_rejects_fg_fraction_outside_0_1():
    with pytest.raises(ValueError, match="fg_fraction 1.5"):
        train.sample_patch(np.zeros((4, 4, 4)), None, (2, 2, 2), 1.5, np.random.default_rng(0), (-21, 189))


def test_sample_patch_pads_small_odd_volume_after_windowing(tmp_path):
    image = np.full((5, 7, 3), 500, np.int16)            # above the window: 1 after windowing
    np.save(tmp_path / "img.npy", image)
    memmap = np.load(tmp_path / "img.npy", mmap_mode="r")
    label = np.ones((5, 7, 3), np.uint8)
    rng = np.random.default_rng(3)
    patch, lab = train.sample_patch(memmap, label, (11, 15, 7), 0.5, rng, (-21, 189))  # > 2x the volume
    assert patch.shape == lab.shape == (11, 15, 7) and patch.dtype == np.float32
    assert patch.sum() == 5 * 7 * 3 and lab.sum() == 5 * 7 * 3  # whole volume inside, the rest padded with 0
    assert set(np.unique(patch)) == {0.0, 1.0}
    for _ in range(20):  # partly outside: image and label padding line up
        patch, lab = train.sample_patch(memmap, label, (8, 9, 6), 0.5, rng, (-21, 189))
        assert np.array_equal(patch, lab.astype(np.float32)) and 0 < lab.sum() < 8 * 9 * 6
    patch, lab = train.sample_patch(memmap, None, (4, 4, 4), 1.0, np.random.default_rng(3), (-21, 189))
    assert lab is None and patch.shape == (4, 4, 4)


def test_augment_intensity_keeps_shape_and_sometimes_changes():
    rng = np.random.default_rng(0)
    patch = np.linspace(0, 1, 7 * 6 * 5, dtype=np.float32).reshape(7, 6, 5)
    copy = patch.copy()
    outs = [train.augment_intensity(patch, rng) for _ in range(40)]
    assert all(o.shape == patch.shape and o.dtype == np.float32 for o in outs)
    changed = [not np.array_equal(o, patch) for o in outs]
    assert any(changed) and not all(changed)  # each transform has p = 0.5: all three skipped 1 time in 8
    assert np.array_equal(patch, copy)


# ---------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_saved_and_reloaded(tmp_path):
    ids = [f"liver_{i}" for i in range(20)]
    a = split_cases(ids, 5, seed=1, path=tmp_path / "a.json")
    b = split_cases(list(reversed(ids)), 5, seed=1, path=tmp_path / "b.json")
    assert a == b and len(a["val"]) == 5 and sorted(a["pool"] + a["val"], key=folders.natural_key) == ids
    assert split_cases(ids, 5, seed=2, path=None) != a
    assert split_cases(ids, 7, seed=9, path=tmp_path / "a.json") == a  # the saved split wins
    assert json.loads((tmp_path / "a.json").read_text())["val"] == a["val"]
    assert len(split_cases(ids, 0.25, seed=1, path=None)["val"]) == 5
    with pytest.raises(ValueError, match="a.json"):
        split_cases(ids[:10], 5, seed=1, path=tmp_path / "a.json")
    for bad in (20, 1.5, "3", True):
        with pytest.raises(ValueError):
            split_cases(ids, bad, seed=1, path=None)


def test_default_n_val():
    assert default_n_val("Task03_Liver", 131) == 26
    assert default_n_val("HepaticVessel", 303) == 61
    assert default_n_val("Phantom", 12) == 2
    assert default_n_val("Liver", 10) == 2   # too few cases for the paper's 26
    assert default_n_val("x", 2) == 1


# ---------------------------------------------------------------------------------------------- writing


def test_atomic_writers_leave_no_temporaries(tmp_path):
    files.atomic_write_json(tmp_path / "s.json", {"a": [1, 2]})
    files.atomic_save_npy(tmp_path / "a.npy", np.arange(5))
    data.write_nifti(tmp_path / "v.nii.gz", np.ones((3, 4, 5), np.int16), LPS_AFFINE)
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": [1, 2]}
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.arange(5))
    assert (tmp_path / "v.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # really gzipped
    assert gzip.decompress((tmp_path / "v.nii.gz").read_bytes())[344:348] == b"n+1\x00"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "s.json", "v.nii.gz"]


# ---------------------------------------------------------------------------------------------- real CT


def test_real_ct_cases_if_present(tmp_path):
    root = SHARED_DATA / "real_ct"
    if not (root / "imagesTr").is_dir():
        pytest.skip(f"{root} not present")
    cases = {c["id"]: c for c in folders.read_msd(root)}
    assert set(cases) == {"abdpelvis_000", "upperabd_001"}
    volume, spacing_mm = data.load_ct(cases["abdpelvis_000"]["image"])  # int32, sform only
    assert volume.shape == (122, 101, 112) and np.allclose(spacing_mm, 3.0)
    reference = nib.load(cases["abdpelvis_000"]["image"]).get_fdata(dtype=np.float32)  # stored RAS already
    assert volume.dtype == np.float32 and np.array_equal(volume, reference) and volume.max() > 300
    volume, spacing_mm = data.load_ct(cases["upperabd_001"]["image"])  # LPS on disk
    assert np.allclose(spacing_mm, (0.9765625, 0.9765625, 2.0))
    raw = np.asarray(nib.load(cases["upperabd_001"]["image"]).dataobj)
    assert np.array_equal(volume, raw[::-1, ::-1, :].astype(np.float32))
    image, label = data.cached_case(cases["upperabd_001"], tmp_path / "cache", num_classes=2)
    assert image.shape == label.shape == (333, 333, 20) and set(np.unique(label)) == {0, 1}
    assert 60 < np.median(image[label == 1]) < 130  # README: liver median about 93 HU


def test_split_draws_validation_from_candidates_only(tmp_path):
    ids = [f"c{i}" for i in range(10)]
    split = split_cases(ids, 2, seed=0, path=tmp_path / "s.json", candidates=["c3", "c5", "c7"])
    assert set(split["val"]) <= {"c3", "c5", "c7"} and len(split["val"]) == 2
    assert sorted(split["pool"] + split["val"], key=folders.natural_key) == ids
    assert split_cases(ids, 0, seed=0, path=None, candidates=[])["val"] == []    # nothing labeled yet
