"""CT volumes for the loop, top to bottom: 1. writing and 2. reading NIfTI in RAS (nibabel only here), 3.
resampling, HU windowing and the body box (pure numpy), 4. the memory-mapped preprocessed cache. The data-set
folders are folders.py; patches are train.py; the split is cases.py.

Arrays are (X, Y, Z) in RAS order: index X grows toward the patient's Right, Y toward Anterior, Z toward Superior.
"""
import gzip
import hashlib
import json
import os
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from files import atomic_save_npy, atomic_write_bytes

# Paper settings: clip HU to these windows, then scale to [0, 1].
TASK_WINDOWS_HU = {"Task03_Liver": (-21, 189), "Task08_HepaticVessel": (-3, 243)}
# Other data sets: the paper's liver window, a soft-tissue abdominal window.
DEFAULT_WINDOW_HU = (-21, 189)
# Names a task may go by: MSD folder name, or the "name" field of its dataset.json.
_TASK_ALIASES = {"Task03_Liver": ("task03", "liver"), "Task08_HepaticVessel": ("task08", "hepaticvessel")}
CACHE_VERSION = 2  # bump when the cached arrays change meaning; old entries then miss and are rebuilt


def write_nifti(path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write array (X, Y, Z) with its 4x4 voxel-to-world affine (mm) as NIfTI atomically.

    Gzipped when the name ends in .gz. qform and sform are both set
    (code 1, scanner), as most CT converters do. The array's dtype is stored as is (int16 HU, uint8 labels).
    """
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    raw = img.to_bytes()
    return atomic_write_bytes(path, gzip.compress(raw, 6) if str(path).endswith(".gz") else raw)


def match_task(task_name):
    """'Task03_Liver' / 'Task08_HepaticVessel' if task_name names one of them, else None."""
    name = str(task_name).lower().replace(" ", "").replace("_", "")
    return next((task for task, aliases in _TASK_ALIASES.items() if any(a in name for a in aliases)), None)


def task_window(task_name: str, override=None) -> tuple[float, float]:
    """HU window (lo_hu, hi_hu) for a task: `override` wins, then the paper's per-task window, else the default."""
    if override is not None:
        lo_hu, hi_hu = (float(v) for v in override)
        if not hi_hu > lo_hu:
            raise ValueError(f"window override {override}: need lo_hu < hi_hu")
        return lo_hu, hi_hu
    lo_hu, hi_hu = TASK_WINDOWS_HU.get(match_task(task_name), DEFAULT_WINDOW_HU)
    return float(lo_hu), float(hi_hu)


# ----------------------------------------------------------------------------------------------------------
# 2. NIfTI reading, reoriented to RAS. Only the header is read until voxels are needed.


def _open_nifti(path):
    """nibabel image of a 3-D volume (a 4-D one with trailing size-1 axes is accepted); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; check the path or the data folder")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for non-NIfTI or damaged headers
        raise ValueError(f"{path}: not a readable NIfTI file ({e}); re-export or re-download it") from e
    shape = img.shape
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise ValueError(f"{path}: expected a 3-D volume, got shape {shape}; save one volume per file")
    if min(shape[:3]) == 0:
        raise ValueError(f"{path}: empty volume (shape {shape})")
    return img


def _ras_geometry(img, path):
    """Orientation transform to RAS and the resulting (shape, affine). ornt (3, 2) as nibabel.orientations."""
    ornt = nib.orientations.io_orientation(img.affine)
    if np.isnan(ornt).any():
        raise ValueError(f"{path}: degenerate affine (a zero-length voxel axis):\n{img.affine}")
    shape = tuple(int(s) for s in img.shape[:3])
    ras_shape = tuple(shape[i] for i in np.argsort(ornt[:, 0]))       # file axis i becomes RAS axis ornt[i, 0]
    return ornt, ras_shape, img.affine @ nib.orientations.inv_ornt_aff(ornt, shape)


def _spacing_from_affine(affine):
    """Voxel size (3,) float64 mm = lengths of the affine's first three columns."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _read_nifti_ras(path):
    """All voxels of a NIfTI file, reoriented to RAS, without conversion.

    Returns raw (X, Y, Z) in the file's dtype and memory order (a flipped / transposed view, no copy),
    slope and inter (HU = raw * slope + inter) and spacing_mm float64 (3,).
    Every voxel read in this module goes through here.
    """
    img = _open_nifti(path)
    ornt, _shape, ras_affine = _ras_geometry(img, path)
    try:
        if nib.is_proxy(img.dataobj):
            raw = img.dataobj.get_unscaled()
            slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
        else:
            raw, slope, inter = np.asarray(img.dataobj), 1.0, 0.0
    except Exception as e:  # truncated gzip, short file: zlib.error, EOFError, OSError, ValueError
        raise ValueError(f"{path}: cannot read the voxel data ({e}); the file is probably truncated") from e
    raw = nib.orientations.apply_orientation(raw.reshape(raw.shape[:3]), ornt)
    return raw, slope, inter, _spacing_from_affine(ras_affine)


def _apply_scaling(volume, slope, inter):
    """volume * slope + inter in place (float32 volume); returns it."""
    volume *= np.float32(slope)
    volume += np.float32(inter)
    return volume


def load_ct(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a CT volume in RAS orientation.

    Returns volume float32 (X, Y, Z) C-contiguous, in HU (scl_slope / scl_inter applied), and spacing_mm
    float64 (3,). Integer data (int16, int32, uint8) is converted once, without a float64 intermediate.
    (preprocess_case does not call this: it resamples the raw voxels first and converts only the result.)
    """
    raw, slope, inter, spacing_mm = _read_nifti_ras(path)
    return _apply_scaling(np.ascontiguousarray(raw, dtype=np.float32), slope, inter), spacing_mm


def _read_label(path):
    """A label map in RAS: (X, Y, Z) class numbers (any integer dtype, validated to 0..255), spacing_mm (3,)."""
    raw, slope, inter, spacing_mm = _read_nifti_ras(path)
    if raw.dtype == np.uint8 and (slope, inter) == (1.0, 0.0):
        return raw, spacing_mm  # nothing to check: uint8 holds only 0..255
    values = raw if (slope, inter) == (1.0, 0.0) else raw * slope + inter
    if values.dtype.kind == "f" and not np.array_equal(values, np.rint(values)):
        raise ValueError(f"{path}: label map has non-integer values; labels must be class numbers 0..C-1")
    lo, hi = values.min(), values.max()
    if lo < 0 or hi > 255:
        raise ValueError(f"{path}: label values span {lo}..{hi}; labels must be class numbers 0..255")
    return values, spacing_mm


def _read_image_resampled(path, spacing_mm):
    """HU float32 (X, Y, Z) of an image file on the spacing_mm grid. Slope and inter are applied to the
    (smaller) resampled volume: interpolation is linear, so this equals resampling the scaled one.
    NaN or infinite voxels are an error naming the file (checked in slabs, without a full-size mask)."""
    raw, slope, inter, native_mm = _read_nifti_ras(path)
    if raw.dtype.kind == "f" and not all(np.isfinite(raw[..., z:z + 16]).all() for z in range(0, raw.shape[2], 16)):
        raise ValueError(f"{path}: the image has NaN or infinite voxels; fix the file or remove the case")
    return _apply_scaling(resample_image(raw, native_mm, spacing_mm), slope, inter)


def check_same_grid(image_path, label_path) -> tuple[tuple, np.ndarray]:
    """Image and label must share shape and affine (in RAS) - checked from the headers only."""
    _, image_shape, image_affine = _ras_geometry(_open_nifti(image_path), image_path)
    _, label_shape, label_affine = _ras_geometry(_open_nifti(label_path), label_path)
    # Agreement to 5% of the smallest voxel: smaller differences are float rounding in the headers.
    tol_mm = 0.05 * float(_spacing_from_affine(image_affine).min())
    if image_shape != label_shape or not np.allclose(image_affine, label_affine, rtol=0, atol=tol_mm):
        raise ValueError(f"image {image_path} (shape {image_shape}) and label {label_path} (shape {label_shape}) "
                         f"do not share one voxel grid; affines:\n{image_affine}\n{label_affine}\n"
                         "resample the label onto the image grid or fix the header")
    return image_shape, image_affine


# ----------------------------------------------------------------------------------------------------------
# 3. Resampling and windowing (pure numpy). Voxel centres are aligned: the first and last voxel centres keep
# the volume's physical extent, src = (dst + 0.5) * n_src / n_dst - 0.5 (torch's align_corners=False).


def _target_shape(shape, spacing_mm, target_spacing_mm):
    """New shape per axis = max(1, round(n * spacing / target)): the same physical extent on the new grid."""
    shape, spacing, target = (np.asarray(v, dtype=np.float64) for v in (shape, spacing_mm, target_spacing_mm))
    if spacing.shape != (3,) or target.shape != (3,) or (spacing <= 0).any() or (target <= 0).any():
        raise ValueError(f"spacings must be 3 positive numbers in mm; got {spacing_mm} and {target_spacing_mm}")
    return tuple(int(max(1, round(n))) for n in shape * spacing / target)


def _linear_axis(volume, axis, n_dst):
    """Linear resampling of `volume` along one axis to n_dst samples. Returns float32."""
    n_src = volume.shape[axis]
    src = np.clip((np.arange(n_dst) + 0.5) * (n_src / n_dst) - 0.5, 0, n_src - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_src - 1)
    w1 = (src - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
    lo = np.take(volume, i0, axis=axis).astype(np.float32, copy=False)  # gathers only the rows needed
    hi = np.take(volume, i1, axis=axis).astype(np.float32, copy=False)
    hi -= lo
    hi *= w1
    lo += hi  # lo + w1 * (hi - lo)
    return lo


def _in_memory_order(volume, spacing_mm, target_spacing_mm):
    """(view whose last axis is the fastest in memory, the new shape in its axis order, transposed: bool).
    NIfTI stores X fastest; gathering whole rows is much faster than single elements, so such volumes are
    resampled as volume.T and transposed back."""
    if volume.ndim != 3:
        raise ValueError(f"resampling needs a 3-D volume, got shape {volume.shape}")
    new_shape = _target_shape(volume.shape, spacing_mm, target_spacing_mm)
    strides = np.abs(volume.strides)
    if strides[0] < strides[2]:
        return volume.T, new_shape[::-1], True
    return volume, new_shape, False


def _nearest_axis(volume, axis, n_dst):
    """Nearest-neighbour resampling along one axis: round(src) = floor((dst + 0.5) * n_src / n_dst)."""
    n_src = volume.shape[axis]
    index = np.minimum(np.floor((np.arange(n_dst) + 0.5) * (n_src / n_dst)).astype(np.int64), n_src - 1)
    return np.take(volume, index, axis=axis)


def _resample(volume, spacing_mm, target_spacing_mm, along_axis, dtype):
    """Separable resampling, one 1-D pass per axis, shrinking axes first so later passes touch fewer voxels."""
    work, new_shape, transposed = _in_memory_order(np.asanyarray(volume), spacing_mm, target_spacing_mm)
    for axis in np.argsort(np.asarray(new_shape) / np.asarray(work.shape), kind="stable"):
        if new_shape[axis] != work.shape[axis]:
            work = along_axis(work, int(axis), new_shape[axis])
    return np.ascontiguousarray(work.T if transposed else work, dtype=dtype)


def resample_image(volume: np.ndarray, spacing_mm, target_spacing_mm) -> np.ndarray:
    """Trilinear resampling of volume (X, Y, Z), any numeric dtype and memory order, to target_spacing_mm.
    Only the gathered rows are converted to float32. Returns float32 (X', Y', Z') C-contiguous with
    X' = max(1, round(X * spacing / target)) and so on."""
    return _resample(volume, spacing_mm, target_spacing_mm, _linear_axis, np.float32)


def resample_label(label: np.ndarray, spacing_mm, target_spacing_mm) -> np.ndarray:
    """Nearest-neighbour resampling of a label map (X, Y, Z), values 0..255 kept exactly; uint8 (X', Y', Z')
    on the same grid as resample_image gives for the same shape and spacings."""
    return _resample(label, spacing_mm, target_spacing_mm, _nearest_axis, np.uint8)


def window(image_hu: np.ndarray, lo_hu: float, hi_hu: float) -> np.ndarray:
    """Clip HU to [lo_hu, hi_hu] and scale to [0, 1]. Returns float32 of the same shape (input untouched)."""
    if not hi_hu > lo_hu:
        raise ValueError(f"window: need lo_hu < hi_hu, got ({lo_hu}, {hi_hu})")
    out = np.clip(np.asarray(image_hu, dtype=np.float32), lo_hu, hi_hu)
    out -= np.float32(lo_hu)
    out *= np.float32(1.0 / (hi_hu - lo_hu))
    return out


def body_box(image_hu: np.ndarray, window_hu: tuple[float, float], label: np.ndarray | None = None
             ) -> tuple[slice, slice, slice]:
    """The body box of a case: the bounding box of its voxels above the window's low end, as the first author's
    tutorial cuts every volume (MONAI tutorials, active_learning/liver_tumor_al/active_learning.py:
    ScaleIntensityRanged to [0, 1], then CropForegroundd(source_key="image"), which keeps the box of voxels > 0).

    image_hu (X, Y, Z) HU, any numeric dtype or a memmap; window_hu (lo_hu, hi_hu). label (X, Y, Z) or None: its
    foreground voxels outside the box extend the box, so that a label is never cut. Returns three slices (the
    whole volume when no voxel is above lo_hu) for image_hu[box]; uncrop puts a result back.
    """
    image_hu = np.asarray(image_hu)
    inside = image_hu > window_hu[0]                                          # (X, Y, Z) bool: the body
    if label is not None:
        if np.shape(label) != image_hu.shape:
            raise ValueError(f"body_box: label shape {np.shape(label)} differs from image shape {image_hu.shape}")
        inside |= np.asarray(label) > 0
    box = []
    for axis in range(3):
        hit = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, image_hu.shape[axis]))
    return tuple(box)


def uncrop(volume: np.ndarray, box: tuple[slice, slice, slice], shape: tuple[int, int, int]) -> np.ndarray:
    """A volume computed inside `box` (body_box) put back on the full grid of `shape`, zeros outside: a
    segmentation there is background, an uncertainty map zero. Returns an array of volume's dtype."""
    full = np.zeros(tuple(shape), dtype=np.asarray(volume).dtype)
    full[box] = volume
    return full


def preprocess_case(image_path, label_path=None, spacing_mm=(1.5, 1.5, 2.0)) -> tuple[np.ndarray, np.ndarray | None]:
    """Load one case in RAS and resample it to spacing_mm (paper: 1.5 x 1.5 x 2.0 mm).

    Returns image_hu float32 (X, Y, Z) (trilinear) and label uint8 (X, Y, Z) (nearest) on the same grid,
    or None when label_path is None. Image and label must share shape and affine.
    """
    if label_path is not None:
        check_same_grid(image_path, label_path)
    if label_path is None:
        return _read_image_resampled(image_path, spacing_mm), None
    label, label_mm = _read_label(label_path)
    return _read_image_resampled(image_path, spacing_mm), resample_label(label, label_mm, spacing_mm)


def to_native_grid(volume: np.ndarray, image_path, spacing_mm, nearest: bool) -> np.ndarray:
    """Map a volume on the resampled RAS grid of image_path back onto the image file's own voxel grid.

    volume (X', Y', Z'): the grid preprocess_case / cached_case give for image_path at spacing_mm.
    nearest=True: a label map of class numbers 0..255, kept exactly, returns uint8; False: linear, float32.
    Returns a C-contiguous array of the file's stored shape (first 3 axes) and axis order - not RAS - to be
    written with the file's own affine (write_native). Inverts the centre-aligned mapping of section 4.
    """
    img = _open_nifti(image_path)
    ornt, ras_shape, ras_affine = _ras_geometry(img, image_path)
    native_mm = _spacing_from_affine(ras_affine)
    expected = _target_shape(ras_shape, native_mm, spacing_mm)
    volume = np.asanyarray(volume)
    if volume.shape != expected:
        raise ValueError(f"{image_path}: volume of shape {volume.shape} is not on this image's grid at "
                         f"{tuple(float(s) for s in spacing_mm)} mm, which has shape {expected}; pass the "
                         "output for this image at the spacing it was preprocessed with")
    # The resampled grid keeps the file's extent, so its true voxel size is native * n / n' (spacing_mm up to
    # rounding of n'); resampling from that size to native_mm gives exactly the file's RAS shape.
    grid_mm = native_mm * np.asarray(ras_shape) / np.asarray(expected)
    along_axis, dtype = (_nearest_axis, np.uint8) if nearest else (_linear_axis, np.float32)
    ras = _resample(volume, grid_mm, native_mm, along_axis, dtype)
    ras_to_file = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(ras, ras_to_file))


def write_native(path, volume: np.ndarray, image_path, spacing_mm, nearest: bool) -> Path:
    """to_native_grid, then write NIfTI with the image file's own affine (qform and sform, as write_nifti), so
    it overlays the image in any viewer and passes check_same_grid. Segmentations (nearest=True) are stored
    uint8, maps float32. Returns the Path."""
    array = to_native_grid(volume, image_path, spacing_mm, nearest)
    return write_nifti(path, array, nifti_affine(image_path))


def nifti_affine(path) -> np.ndarray:
    """The 4x4 voxel-to-world affine (mm) of a NIfTI file, in its own axis order (header only)."""
    return _open_nifti(path).affine


# ----------------------------------------------------------------------------------------------------------
# Labels: where the patch sampler centres its patches.


def foreground_index(label: np.ndarray, ignore: int = 255) -> dict[int, np.ndarray]:
    """Flat voxel indices of each foreground class present in label (X, Y, Z) uint8.

    Returns {class: int32 or int64 (N,) indices into label.ravel()}, only classes with N > 0.
    A partial label (`ignore` where unannotated: losses.IGNORE, 255) also gets 0: its annotated background voxels,
    where background centres are drawn; `ignore` itself is no class. Compute once per case and pass to sample_patch.
    """
    flat = np.asarray(label).ravel()
    where = np.flatnonzero(flat)
    values = flat[where]
    index_dtype = np.int32 if flat.size < 2**31 else np.int64
    index = {int(c): where[values == c].astype(index_dtype) for c in np.unique(values) if c != ignore}
    if len(index) < len(np.unique(values)):                     # partial: centres only on annotated voxels
        index[0] = np.flatnonzero(flat == 0).astype(index_dtype)
    return index


# ----------------------------------------------------------------------------------------------------------
# 4. The preprocessed cache. One .npy per source file (image and label separately), named by a hash of the
# source's absolute path, size, mtime_ns and the target spacing: a changed source gets a new name, so stale
# entries are never read. Loads are memory-mapped; an unreadable or wrongly shaped entry is rebuilt, and so is
# one whose voxels no longer match the CRC-32 written next to it (<entry>.npy.crc32), which a damaged disk or
# copy can cause with the .npy header intact. An entry is checked once per process: zlib's CRC-32 reads the
# whole entry at about 3 GB/s from the page cache, 30 ms for a 512 x 512 x 200 int16 volume (PERFORMANCE.md).


def _cache_path(cache_dir, case_id, kind, source_path, spacing_mm):
    """cache_dir/<id>_<kind>_<spacing>_<path hash>_<key hash>.npy for this exact version of the source file."""
    stat = os.stat(source_path)
    spacing = [round(float(s), 6) for s in spacing_mm]
    source = os.path.abspath(source_path)
    key = json.dumps([source, stat.st_size, stat.st_mtime_ns, spacing, kind, CACHE_VERSION])
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
    source_tag = hashlib.sha1(source.encode("utf-8")).hexdigest()[:8]  # two data sets may share case ids
    spacing_tag = "x".join(f"{s:g}" for s in spacing)
    return Path(cache_dir) / f"{case_id}_{kind}_{spacing_tag}_{source_tag}_{digest}.npy"


def _checksum_path(path):
    """The CRC-32 written next to a cache entry: <entry>.npy.crc32."""
    return path.with_name(path.name + ".crc32")


def _crc32(array):
    """'crc32 <8 hex digits>' of an array's bytes in memory order (a memmap is read once, from the page cache
    where it is there)."""
    return f"crc32 {zlib.crc32(memoryview(np.ascontiguousarray(array)).cast('B')):08x}"


_VERIFIED = set()   # (path, size, mtime_ns) of the entries this process has checked: a replaced one is checked again


def _verify_cache_entry(path, array):
    """True if array's bytes match the entry's CRC-32 file (once per process and version of the file)."""
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return True
    try:
        expected = _checksum_path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        expected = "missing"          # removed by hand, or an entry from elsewhere: check fails, entry is rebuilt
    if _crc32(array) != expected:
        return False
    _VERIFIED.add(key)
    return True


def _read_cache_entry(path, shape, dtype):
    """Memory-map a cache entry if it is intact (readable, its CRC-32 matching) and has the expected shape and
    dtype, else None."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # truncated or garbage file
        warnings.warn(f"{path}: unreadable cache entry ({e}); rebuilding it")
        return None
    if array.shape != tuple(shape) or array.dtype != dtype:
        warnings.warn(f"{path}: cache entry has shape {array.shape} {array.dtype}, expected {shape} "
                      f"{np.dtype(dtype)}; rebuilding it")
        return None
    if not _verify_cache_entry(path, array):
        warnings.warn(f"{path}: cache entry is damaged (its voxels do not match {_checksum_path(path).name}, "
                      "or that file is missing); rebuilding it from the source file")
        return None
    return array


class CacheError(RuntimeError):
    """The cache folder cannot be written (permissions, disk full): a fault of the environment, not of a case."""


def _store_cache_entry(path, array):
    """Save atomically with its CRC-32, delete older entries of the same source file and spacing, return the
    memory map."""
    try:
        # The CRC-32 first: an entry's name fixes its content (source version, spacing), so a reader in another
        # process sees no entry yet, or one with its CRC-32 already there.
        atomic_write_bytes(_checksum_path(path), (_crc32(array) + "\n").encode("ascii"))
        atomic_save_npy(path, array)
    except OSError as e:
        raise CacheError(f"{path.parent}: cannot write the preprocessed cache ({e}); free disk space, fix the "
                         "folder's permissions or choose another with --cache-dir") from e
    for old in path.parent.glob(path.name.rsplit("_", 1)[0] + "_" + "[0-9a-f]" * 16 + ".npy"):
        if old.name != path.name:
            old.unlink(missing_ok=True)
            _checksum_path(old).unlink(missing_ok=True)
    stored = np.load(path, mmap_mode="r", allow_pickle=False)
    stat = os.stat(path)
    _VERIFIED.add((str(path), stat.st_size, stat.st_mtime_ns))      # its CRC-32 was just taken from `array`
    return stored


def _cached_image(case, cache_dir, spacing_mm):
    """int16 HU memmap (X, Y, Z) at spacing_mm; built from the image file when missing or invalid."""
    _, shape, affine = _ras_geometry(_open_nifti(case["image"]), case["image"])
    path = _cache_path(cache_dir, case["id"], "image", case["image"], spacing_mm)
    expected = _target_shape(shape, _spacing_from_affine(affine), spacing_mm)
    image = _read_cache_entry(path, expected, np.int16)
    if image is None:
        hu = _read_image_resampled(case["image"], spacing_mm)
        np.rint(hu, out=hu)
        np.clip(hu, -32768, 32767, out=hu)  # int16 range; CT HU lie well inside it
        image = _store_cache_entry(path, hu.astype(np.int16))
    return image


def _cached_label(case, cache_dir, spacing_mm, expected_shape):
    """uint8 label memmap (X, Y, Z) at spacing_mm, resampled from the label file's own header."""
    path = _cache_path(cache_dir, case["id"], "label", case["label"], spacing_mm)
    label = _read_cache_entry(path, expected_shape, np.uint8)
    if label is None:
        raw, label_mm = _read_label(case["label"])
        label = _store_cache_entry(path, resample_label(raw, label_mm, spacing_mm))
    return label


def cached_case(case: dict, cache_dir, spacing_mm=(1.5, 1.5, 2.0), with_label: bool = True,
                num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Preprocessed case from the cache, building missing entries once.

    case: {"id", "image", "label"} from read_msd. Returns image_hu int16 memmap (X, Y, Z) and label uint8
    memmap (X, Y, Z), or None when with_label is False or the case is unlabeled. with_label=False never
    touches the label file (active learning: labels of unselected cases are not read).
    num_classes: if given, a label value >= num_classes is an error naming the label file.
    """
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"{cache_dir}: cannot create the cache folder ({e}); choose another with --cache-dir") from e
    image = _cached_image(case, cache_dir, spacing_mm)
    if not with_label or case.get("label") is None:
        return image, None
    check_same_grid(case["image"], case["label"])
    label = _cached_label(case, cache_dir, spacing_mm, image.shape)
    if num_classes is not None and label.size and int(label.max()) >= num_classes:
        raise ValueError(f"{case['label']}: label value {int(label.max())} but the task has {num_classes} "
                         f"classes (0..{num_classes - 1}: dataset.json 'labels', or 0/1 without a dataset.json); "
                         "fix the label, or list every class in dataset.json")
    return image, label
