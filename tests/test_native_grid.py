"""Tests for writing results back onto the image file's own grid (data.to_native_grid, data.write_native) and
for dataset.json entries without a label. Tiny synthetic NIfTI files (gzip, int16 HU, odd sizes, non-identity
affines with non-zero origins: LPS-stored, RAS-stored, permuted axes). CPU, seconds."""
import json
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import folders

SPACING = (1.5, 1.5, 2.0)
# name: (stored shape, affine). Voxel sizes differ per axis so a swapped axis changes the geometry.
GEOMETRIES = {
    "lps": ((23, 31, 17), [[-0.8, 0, 0, 40.3], [0, -0.7, 0, 61.7], [0, 0, 2.5, -301.2], [0, 0, 0, 1]]),
    "ras": ((29, 21, 19), [[0.9, 0, 0, -120.5], [0, 1.1, 0, -80.25], [0, 0, 1.7, 35.0], [0, 0, 0, 1]]),
    # file axis 0 -> Superior, 1 -> Left, 2 -> Posterior
    "permuted": ((17, 33, 27), [[0, -0.75, 0, 90.0], [0, 0, -0.85, 110.0], [2.5, 0, 0, -50.0], [0, 0, 0, 1]]),
}


def save(path, array, affine):
    """Write a NIfTI with nibabel (gzip by the name), as a scanner export would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=float)), str(path))
    return str(path)


def make_image(path, geometry, seed=0):
    """int16 HU image of the named geometry, random texture. Returns (path, stored array)."""
    shape, affine = GEOMETRIES[geometry]
    hu = np.random.default_rng(seed).integers(-200, 300, shape).astype(np.int16)
    return save(path, hu, affine), hu


def ras_grid(image_path, spacing_mm):
    """Independent of data.py's orientation code (nibabel's canonical image): RAS shape, native voxel size,
    resampled shape and the resampled grid's affine (voxel j sits at old index (j + 0.5) * n / n' - 0.5)."""
    canonical = nib.as_closest_canonical(nib.load(image_path))
    ras_shape = np.array(canonical.shape[:3])
    native_mm = np.sqrt((canonical.affine[:3, :3] ** 2).sum(axis=0))
    res_shape = data._target_shape(tuple(ras_shape), native_mm, spacing_mm)
    scale = ras_shape / np.array(res_shape)
    to_old = np.diag(np.append(scale, 1.0))
    to_old[:3, 3] = 0.5 * scale - 0.5
    return ras_shape, native_mm, res_shape, canonical.affine @ to_old


def world(affine, index):
    """World coordinates (N, 3) mm of voxel indices (N, 3) through a 4x4 affine."""
    index = np.atleast_2d(np.asarray(index, dtype=float))
    return index @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def half_voxel_world(affine):
    """Half a voxel along each world axis (mm), for axis-aligned (possibly permuted / flipped) affines."""
    return 0.5 * np.abs(np.asarray(affine)[:3, :3]).sum(axis=1)


# ---------------------------------------------------------------------------------- geometry of the write-back


@pytest.mark.parametrize("geometry", ["lps", "ras", "permuted"])
def test_marked_voxel_lands_at_the_same_world_position(tmp_path, geometry):
    image, _ = make_image(tmp_path / "img.nii.gz", geometry)
    img = nib.load(image)
    _, _, res_shape, res_affine = ras_grid(image, SPACING)
    res_half = half_voxel_world(res_affine)
    corners = [(0, 0, 0), tuple(n - 1 for n in res_shape)]
    interior = [(2, res_shape[1] - 3, res_shape[2] // 2), (res_shape[0] // 3, 4, res_shape[2] - 4)]
    for j in corners + interior:
        marked = np.zeros(res_shape, dtype=np.uint8)
        marked[j] = 1
        out = data.write_native(tmp_path / "seg.nii.gz", marked, image, SPACING, nearest=True)
        written = nib.load(str(out))
        assert written.shape == img.shape and written.get_data_dtype() == np.uint8
        np.testing.assert_allclose(written.affine, img.affine, atol=1e-4)
        seg = np.asarray(written.dataobj)
        assert np.array_equal(seg, data.to_native_grid(marked, image, SPACING, nearest=True))
        landed = np.argwhere(seg == 1)
        assert len(landed) > 0 and set(np.unique(seg)) == {0, 1}
        target = world(res_affine, j)[0]
        # every native voxel given the mark lies inside the marked resampled voxel ...
        assert (np.abs(world(written.affine, landed) - target) <= res_half + 1e-4).all(), (geometry, j)
        # ... and together they are centred on it to within half a native voxel
        centre = world(written.affine, landed).mean(axis=0)
        assert (np.abs(centre - target) <= half_voxel_world(img.affine) + 1e-4).all(), (geometry, j, centre, target)

    for j in interior:  # linear maps: the peak lands on the native voxel nearest the marked centre
        peak = np.zeros(res_shape, dtype=np.float32)
        peak[j] = 1.0
        out = data.write_native(tmp_path / "map.nii.gz", peak, image, SPACING, nearest=False)
        written = nib.load(str(out))
        assert written.get_data_dtype() == np.float32 and written.shape == img.shape
        values = np.asarray(written.dataobj)
        top = np.argwhere(values >= values.max() - 1e-6)
        distance = np.abs(world(written.affine, top) - world(res_affine, j)[0])
        assert (distance <= half_voxel_world(img.affine) + 1e-4).all(), (geometry, j)


@pytest.mark.parametrize("geometry", ["lps", "ras", "permuted"])
def test_segmentation_of_a_bright_blob_lands_on_the_blob(tmp_path, geometry):
    """End to end without affine arithmetic: threshold the pipeline's resampled image, write it back, and the
    native blob is covered (a flipped or swapped axis would put it at the mirrored place)."""
    shape, affine = GEOMETRIES[geometry]
    hu = np.zeros(shape, dtype=np.int16)
    c = (shape[0] // 4 + 2, shape[1] - shape[1] // 4 - 2, shape[2] // 3 + 1)  # off-centre on every axis
    hu[c[0] - 2:c[0] + 3, c[1] - 2:c[1] + 3, c[2] - 2:c[2] + 3] = 1000
    image = save(tmp_path / "blob.nii.gz", hu, affine)
    resampled, _ = data.preprocess_case(image, None, SPACING)
    seg = (resampled > 500).astype(np.uint8)
    assert seg.sum() > 0
    written = nib.load(str(data.write_native(tmp_path / "seg.nii.gz", seg, image, SPACING, nearest=True)))
    native = np.asarray(written.dataobj)
    assert native[c] == 1
    _, _, _, res_affine = ras_grid(image, SPACING)
    far = np.abs(world(affine, np.argwhere(native == 1)) - world(affine, c)[0])
    assert (far <= 3 * half_voxel_world(affine) + 2 * half_voxel_world(res_affine) + 1e-4).all()


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("geometry", ["lps", "ras", "permuted"])
def test_label_and_image_round_trip_exactly_at_native_spacing(tmp_path, geometry):
    shape, affine = GEOMETRIES[geometry]
    image, hu = make_image(tmp_path / "img.nii.gz", geometry)
    label_native = np.random.default_rng(1).integers(0, 4, shape).astype(np.uint8)
    label = save(tmp_path / "lab.nii.gz", label_native, affine)
    ras_shape, native_mm, _, _ = ras_grid(image, SPACING)
    image_res, label_res = data.preprocess_case(image, label, tuple(native_mm))
    assert label_res.shape == tuple(ras_shape)  # 1:1, so the way back must be exact
    back = data.to_native_grid(label_res, image, tuple(native_mm), nearest=True)
    assert back.dtype == np.uint8 and back.shape == shape
    assert np.array_equal(back, label_native)
    hu_back = data.to_native_grid(image_res, image, tuple(native_mm), nearest=False)
    assert hu_back.dtype == np.float32 and np.array_equal(hu_back, hu.astype(np.float32))


@pytest.mark.parametrize("geometry", ["lps", "ras", "permuted"])
@pytest.mark.parametrize("coarsen", [(1.0, 1.0, 1.0), (1.9, 2.3, 1.3)])
def test_presegmentation_written_back_is_read_by_the_pipeline(tmp_path, geometry, coarsen):
    """A pre-segmentation made on the resampled grid, saved as labelsTr/<case>.nii.gz, passes the grid check and
    the cache reads the same values back: exact at native spacing, and also at a coarser one (every axis
    shrinks, where nearest there and back is the identity on the resampled grid)."""
    root = tmp_path / "Task"
    image, _ = make_image(root / "imagesTr" / "case_7.nii.gz", geometry)
    _, native_mm, _, _ = ras_grid(image, SPACING)
    spacing = tuple(native_mm * np.array(coarsen))
    _, _, res_shape, _ = ras_grid(image, spacing)
    preseg = np.random.default_rng(2).integers(0, 3, res_shape).astype(np.uint8)
    label = data.write_native(root / "labelsTr" / "case_7.nii.gz", preseg, image, spacing, nearest=True)
    assert nib.load(str(label)).get_data_dtype() == np.uint8
    data.check_same_grid(image, label)  # raises if the grids differ
    (case,) = folders.read_msd(root)
    assert case["label"] == str(label)
    image_hu, label_res = data.cached_case(case, tmp_path / "cache", spacing, num_classes=3)
    assert label_res.shape == image_hu.shape == res_shape
    assert np.array_equal(label_res, preseg)


def test_integer_label_dtypes_accepted_and_wrong_shapes_name_the_file(tmp_path):
    image, _ = make_image(tmp_path / "img.nii.gz", "lps")
    _, _, res_shape, _ = ras_grid(image, SPACING)
    as_int64 = np.random.default_rng(3).integers(0, 3, res_shape)
    assert np.array_equal(data.to_native_grid(as_int64, image, SPACING, nearest=True),
                          data.to_native_grid(as_int64.astype(np.uint8), image, SPACING, nearest=True))
    with pytest.raises(ValueError, match=r"img\.nii\.gz.*shape"):
        data.to_native_grid(np.zeros(tuple(n + 1 for n in res_shape)), image, SPACING, nearest=True)
    with pytest.raises(ValueError, match=r"img\.nii\.gz.*shape"):
        data.write_native(tmp_path / "x.nii.gz", np.zeros(res_shape[::-1]), image, SPACING, nearest=False)
    assert not (tmp_path / "x.nii.gz").exists()
    flat = np.full(res_shape, 0.25, dtype=np.float32)  # a float map: linear, constant stays constant
    assert np.allclose(data.to_native_grid(flat, image, SPACING, nearest=False), 0.25)


# ------------------------------------------------------------------------------- dataset.json without labels


def test_json_entry_without_label_finds_labelstr_file_once_it_exists(tmp_path):
    shape, affine = GEOMETRIES["lps"]
    for name in ("a", "b", "c", "d"):
        save(tmp_path / "imagesTr" / f"{name}.nii.gz", np.zeros(shape, dtype=np.int16), affine)
    training = [{"image": "./imagesTr/a.nii.gz"}, {"image": "./imagesTr/b.nii.gz", "label": None},
                {"image": "./imagesTr/c.nii.gz", "label": ""},
                {"image": "./imagesTr/d.nii.gz", "label": "./labelsTr/d_seg.nii.gz"}]
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "Mine", "training": training}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # d's listed label is missing: tested below
        before = {c["id"]: c["label"] for c in folders.read_msd(tmp_path)}
    assert before == {"a": None, "b": None, "c": None, "d": None}

    for name in ("a", "b", "d"):  # d lists another name: its own labelsTr/d.nii.gz is not used
        save(tmp_path / "labelsTr" / f"{name}.nii.gz", np.ones(shape, dtype=np.uint8), affine)
    with pytest.warns(UserWarning, match="d_seg.nii.gz"):
        after = {c["id"]: c["label"] for c in folders.read_msd(tmp_path)}
    assert after == {"a": str(tmp_path / "labelsTr" / "a.nii.gz"), "b": str(tmp_path / "labelsTr" / "b.nii.gz"),
                     "c": None, "d": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # entries without a label never warn
        training.pop()
        (tmp_path / "dataset.json").write_text(json.dumps({"name": "Mine", "training": training}))
        assert [c["label"] is not None for c in folders.read_msd(tmp_path)] == [True, True, False]
