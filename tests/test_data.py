"""Tests for data.py: loading CT as RAS, preprocessing, resampling, windows, the cache; tiny synthetic NIfTI volumes,
odd sizes, non-identity affines; real CT when shared/data/real_ct is present. CPU, seconds."""
import os
from pathlib import Path
import sys

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data
import folders
from tiny import LPS_AFFINE, SHARED_DATA, make_msd, save


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


def test_foreground_index_skips_the_loss_ignore_label():
    """data.foreground_index's default unannotated value is the one the loss skips (losses.IGNORE)."""
    import inspect
    import losses
    assert inspect.signature(data.foreground_index).parameters["ignore"].default == losses.IGNORE
    label = np.array([[[0, 1], [losses.IGNORE, 2]]], np.uint8)
    index = data.foreground_index(label)
    assert sorted(index) == [0, 1, 2] and index[0].tolist() == [0]
