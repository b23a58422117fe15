"""Data for proxy-ranked active learning on 3D CT: MSD folders, NIfTI I/O, resampling, cache, patches, phantom.

Read top to bottom:
  1. atomic file writes (used by every module that saves state)
  2. the Medical Segmentation Decathlon (MSD) layout: dataset.json, imagesTr/, labelsTr/
  3. NIfTI reading in RAS orientation (nibabel only here and in write_nifti)
  4. resampling to the paper's 1.5 x 1.5 x 2.0 mm grid and HU windowing (pure numpy)
  5. the preprocessed cache: int16 HU / uint8 labels as .npy, memory-mapped
  6. foreground-balanced patch sampling and intensity augmentation
  7. pool / validation split
  8. the built-in phantom data set (synthetic contrast-enhanced abdominal CT in MSD layout)

Arrays are (X, Y, Z) in RAS order: index X grows toward the patient's Right, Y toward Anterior, Z toward Superior.
"""
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

# DESIGN.md "Paper settings": clip HU to these windows, then scale to [0, 1].
TASK_WINDOWS_HU = {"Task03_Liver": (-21, 189), "Task08_HepaticVessel": (-3, 243)}
# Other data sets: the paper's liver window, a soft-tissue abdominal window (DESIGN.md, Task03 row).
DEFAULT_WINDOW_HU = (-21, 189)
# DESIGN.md "splits": Task03 105 pool / 26 validation; Task08 242 pool / 61 validation.
PAPER_N_VAL = {"Task03_Liver": 26, "Task08_HepaticVessel": 61}
# Names a task may go by: MSD folder name, or the "name" field of its dataset.json.
_TASK_ALIASES = {"Task03_Liver": ("task03", "liver"), "Task08_HepaticVessel": ("task08", "hepaticvessel")}
CACHE_VERSION = 1  # bump when the cached arrays change meaning; old entries then miss and are rebuilt
PHANTOM_VERSION = 1  # bump when the phantom generator changes; existing phantom folders are then rewritten


# ----------------------------------------------------------------------------------------------------------
# 1. Atomic writes: write a temporary file in the same folder, then os.replace (atomic on POSIX and Windows).


def _atomic_write(path, write_fn, suffix=""):
    """Call write_fn(tmp_path) on a temporary file next to `path`, then move it onto `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; others sharing a data or cache folder must read them
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_bytes(path, data):
    """Write `data` (bytes) to `path` atomically. Returns the Path."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return _atomic_write(path, write)


def atomic_write_json(path, obj):
    """Write `obj` as indented JSON to `path` atomically. Returns the Path."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def atomic_save_npy(path, array):
    """Save `array` as .npy to `path` atomically (np.save to an open handle, so no '.npy' is appended)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
    return _atomic_write(path, write)


def write_nifti(path, array, affine):
    """Write array (X, Y, Z) with its 4x4 voxel-to-world affine (mm) as NIfTI atomically.

    The temporary name keeps the '.nii.gz' ending so nibabel gzips it. qform and sform are both set
    (code 1, scanner), as most CT converters do. The array's dtype is stored as is (int16 HU, uint8 labels).
    """
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    ending = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
    return _atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=ending)


# ----------------------------------------------------------------------------------------------------------
# 2. The MSD layout: root/dataset.json, root/imagesTr/<case>.nii.gz, root/labelsTr/<case>.nii.gz


def _natural_key(text):
    """Sort key that orders embedded numbers by value: liver_2 before liver_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _case_id(path):
    """Case id = file name without .nii.gz / .nii."""
    name = Path(path).name
    for ending in (".nii.gz", ".nii"):
        if name.endswith(ending):
            return name[: -len(ending)]
    return name


def _load_dataset_json(json_path):
    """Parse dataset.json; errors name the file and the fix. Returns the dict."""
    try:
        with open(json_path, encoding="utf-8") as f:
            info = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e}); fix or delete the file "
                         "(without dataset.json, imagesTr/ and labelsTr/ are paired by file name)") from e
    if not isinstance(info, dict):
        raise ValueError(f"{json_path}: expected a JSON object at the top level, got {type(info).__name__}")
    return info


def _training_entries(info, json_path):
    """Validate dataset.json 'training': a list of {"image": path, "label": path} objects."""
    entries = info.get("training")
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: missing or malformed 'training' list; an MSD dataset.json has "
                         '"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]')
    for i, entry in enumerate(entries):
        ok = isinstance(entry, dict) and isinstance(entry.get("image"), str)
        ok = ok and isinstance(entry.get("label", ""), (str, type(None)))
        if not ok:
            raise ValueError(f"{json_path}: training entry {i} is {entry!r}; expected an object "
                             '{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}')
    if info.get("numTraining") not in (None, len(entries)):
        warnings.warn(f"{json_path}: numTraining={info['numTraining']} but 'training' has {len(entries)} "
                      "entries; using the list")
    return entries


def _cases_from_json(root, json_path):
    """Cases listed in dataset.json 'training' (the 'test' list is ignored: it has no labels)."""
    cases = []
    for entry in _training_entries(_load_dataset_json(json_path), json_path):
        image = root / entry["image"]
        if not image.is_file():
            raise FileNotFoundError(f"{image}: listed in {json_path} but missing; restore the file "
                                    "or remove its entry from 'training'")
        label = root / entry["label"] if entry.get("label") else None
        if label is not None and not label.is_file():
            warnings.warn(f"{label}: listed in {json_path} but missing; case treated as unlabeled")
            label = None
        cases.append({"id": _case_id(image), "image": str(image), "label": None if label is None else str(label)})
    if not cases:
        raise ValueError(f"{json_path}: the 'training' list is empty; list the cases or delete dataset.json")
    return cases


def _cases_from_folders(root):
    """Without dataset.json: every imagesTr/*.nii(.gz), paired with labelsTr/<same name> when it exists."""
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: not found; expected an MSD folder with imagesTr/ "
                                "(and labelsTr/ or dataset.json); make one with make_phantom_dataset(root, n)")
    # Names starting with '.' are AppleDouble '._x' files (macOS tar) or our own unfinished temporary files.
    images = [p for p in images_dir.iterdir()
              if p.name.endswith((".nii.gz", ".nii")) and not p.name.startswith(".") and p.is_file()]
    if not images:
        raise ValueError(f"{images_dir}: no .nii.gz or .nii images; put the CT volumes there")
    cases = []
    for image in images:
        label = root / "labelsTr" / image.name
        cases.append({"id": _case_id(image), "image": str(image),
                      "label": str(label) if label.is_file() else None})
    return cases


def read_msd(root):
    """List the training cases of an MSD folder.

    root: folder with dataset.json (its 'training' list is used) or, without it, imagesTr/ and labelsTr/
    paired by file name. Returns [{"id": str, "image": str path, "label": str path or None}] in natural
    order of id (liver_2 before liver_10). A case without a label file is unlabeled (label None).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found; pass an MSD task folder "
                                "(with imagesTr/) or create one with make_phantom_dataset")
    json_path = root / "dataset.json"
    cases = _cases_from_json(root, json_path) if json_path.is_file() else _cases_from_folders(root)
    ids = [c["id"] for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{root}: case ids {duplicates} appear more than once; every image needs a unique name")
    return sorted(cases, key=lambda c: _natural_key(c["id"]))


def read_task_info(root):
    """Task name and classes: {"name": str, "labels": {int: str}, "num_classes": int}.

    From dataset.json ('name', 'labels'); without it, name = folder name and labels = background/foreground.
    """
    root = Path(root)
    json_path = root / "dataset.json"
    if not json_path.is_file():
        return {"name": root.resolve().name, "labels": {0: "background", 1: "foreground"}, "num_classes": 2}
    info = _load_dataset_json(json_path)
    raw = info.get("labels")
    try:
        labels = {int(k): str(v) for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{json_path}: 'labels' must map class numbers to names, e.g. "
                         '{"0": "background", "1": "liver"}; got ' + repr(raw)) from e
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise ValueError(f"{json_path}: 'labels' keys must be 0..C-1 with C >= 2 (0 = background); "
                         f"got {sorted(labels)}")
    return {"name": str(info.get("name", root.resolve().name)), "labels": labels, "num_classes": len(labels)}


def _match_task(task_name):
    """'Task03_Liver' / 'Task08_HepaticVessel' if task_name names one of them, else None."""
    name = str(task_name).lower().replace(" ", "").replace("_", "")
    for task, aliases in _TASK_ALIASES.items():
        if any(alias in name for alias in aliases):
            return task
    return None


def task_window(task_name, override=None):
    """HU window (lo_hu, hi_hu) for a task: `override` wins, then the paper's per-task window, else the default."""
    if override is not None:
        lo_hu, hi_hu = (float(v) for v in override)
        if not hi_hu > lo_hu:
            raise ValueError(f"window override {override}: need lo_hu < hi_hu")
        return lo_hu, hi_hu
    task = _match_task(task_name)
    lo_hu, hi_hu = TASK_WINDOWS_HU[task] if task else DEFAULT_WINDOW_HU
    return float(lo_hu), float(hi_hu)


# ----------------------------------------------------------------------------------------------------------
# 3. NIfTI reading, reoriented to RAS. Only the header is read until voxels are needed.


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
    ras_shape = [0, 0, 0]
    for axis, (new_axis, _flip) in enumerate(ornt):
        ras_shape[int(new_axis)] = shape[axis]
    ras_affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    return ornt, tuple(ras_shape), ras_affine


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
    if slope != 1.0:
        volume *= np.float32(slope)
    if inter != 0.0:
        volume += np.float32(inter)
    return volume


def load_ct(path):
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
    """HU float32 (X, Y, Z) of an image file on the spacing_mm grid.

    Resamples the raw voxels in their file order and applies slope / inter to the (smaller) result:
    interpolation is linear, so this equals resampling the scaled volume.
    """
    raw, slope, inter, native_mm = _read_nifti_ras(path)
    return _apply_scaling(resample_image(raw, native_mm, spacing_mm), slope, inter)


def _check_same_grid(image_path, label_path):
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
# 4. Resampling and windowing (pure numpy). Voxel centres are aligned: the first and last voxel centres keep
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
    """View whose last axis is the fastest in memory, and the new shape in that axis order.

    NIfTI stores X fastest (Fortran order); gathering whole rows of a C-ordered view is much faster than
    gathering single elements, so such volumes are resampled as volume.T and transposed back.
    Returns (view, new_shape of the view, transposed: bool).
    """
    if volume.ndim != 3:
        raise ValueError(f"resampling needs a 3-D volume, got shape {volume.shape}")
    new_shape = _target_shape(volume.shape, spacing_mm, target_spacing_mm)
    strides = np.abs(volume.strides)
    if strides[0] < strides[2]:
        return volume.T, new_shape[::-1], True
    return volume, new_shape, False


def resample_image(volume, spacing_mm, target_spacing_mm):
    """Trilinear resampling of volume (X, Y, Z), any numeric dtype and memory order, to target_spacing_mm.

    Separable: three 1-D linear passes, shrinking axes first so later passes touch fewer voxels; only the
    gathered rows are converted to float32. Returns float32 (X', Y', Z') C-contiguous with
    X' = max(1, round(X * spacing / target)) and so on.
    """
    work, new_shape, transposed = _in_memory_order(np.asanyarray(volume), spacing_mm, target_spacing_mm)
    for axis in np.argsort(np.asarray(new_shape) / np.asarray(work.shape), kind="stable"):
        if new_shape[axis] != work.shape[axis]:
            work = _linear_axis(work, int(axis), new_shape[axis])
    return np.ascontiguousarray(work.T if transposed else work, dtype=np.float32)


def resample_label(label, spacing_mm, target_spacing_mm):
    """Nearest-neighbour resampling of a label map (X, Y, Z); class values are kept exactly.

    label: integer dtype with values 0..255, any memory order. Returns uint8 (X', Y', Z') C-contiguous,
    on the same grid as resample_image gives for the same shape and spacings.
    """
    work, new_shape, transposed = _in_memory_order(np.asanyarray(label), spacing_mm, target_spacing_mm)
    for axis in np.argsort(np.asarray(new_shape) / np.asarray(work.shape), kind="stable"):
        n_src, n_dst = work.shape[axis], new_shape[axis]
        if n_dst != n_src:
            # nearest source voxel: round(src) = floor((dst + 0.5) * n_src / n_dst)
            index = np.minimum(np.floor((np.arange(n_dst) + 0.5) * (n_src / n_dst)).astype(np.int64), n_src - 1)
            work = np.take(work, index, axis=int(axis))
    return np.ascontiguousarray(work.T if transposed else work, dtype=np.uint8)


def window(image_hu, lo_hu, hi_hu):
    """Clip HU to [lo_hu, hi_hu] and scale to [0, 1]. Returns float32 of the same shape (input untouched)."""
    if not hi_hu > lo_hu:
        raise ValueError(f"window: need lo_hu < hi_hu, got ({lo_hu}, {hi_hu})")
    out = np.clip(np.asarray(image_hu, dtype=np.float32), lo_hu, hi_hu)
    out -= np.float32(lo_hu)
    out *= np.float32(1.0 / (hi_hu - lo_hu))
    return out


def preprocess_case(image_path, label_path=None, spacing_mm=(1.5, 1.5, 2.0)):
    """Load one case in RAS and resample it to spacing_mm (paper: 1.5 x 1.5 x 2.0 mm).

    Returns image_hu float32 (X, Y, Z) (trilinear) and label uint8 (X, Y, Z) (nearest) on the same grid,
    or None when label_path is None. Image and label must share shape and affine.
    """
    if label_path is not None:
        _check_same_grid(image_path, label_path)
    image_hu = _read_image_resampled(image_path, spacing_mm)
    if label_path is None:
        return image_hu, None
    label, label_mm = _read_label(label_path)
    return image_hu, resample_label(label, label_mm, spacing_mm)


# ----------------------------------------------------------------------------------------------------------
# 5. The preprocessed cache. One .npy per source file (image and label separately), named by a hash of the
# source's absolute path, size, mtime_ns and the target spacing: a changed source gets a new name, so stale
# entries are never read. Loads are memory-mapped; an unreadable or wrongly shaped entry is rebuilt.


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


def _read_cache_entry(path, shape, dtype):
    """Memory-map a cache entry if it is intact and has the expected shape and dtype, else None."""
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
    return array


def _store_cache_entry(path, array):
    """Save atomically, delete older entries of the same source file and spacing, return the memory map."""
    atomic_save_npy(path, array)
    prefix = path.name.rsplit("_", 1)[0] + "_"
    for old in path.parent.iterdir():
        stale = old.name.startswith(prefix) and re.fullmatch(r"[0-9a-f]{16}\.npy", old.name[len(prefix):])
        if stale and old.name != path.name:
            old.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r", allow_pickle=False)


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


def cached_case(case, cache_dir, spacing_mm=(1.5, 1.5, 2.0), with_label=True, num_classes=None):
    """Preprocessed case from the cache, building missing entries once.

    case: {"id", "image", "label"} from read_msd. Returns image_hu int16 memmap (X, Y, Z) and label uint8
    memmap (X, Y, Z), or None when with_label is False or the case is unlabeled. with_label=False never
    touches the label file (active learning: labels of unselected cases are not read).
    num_classes: if given, a label value >= num_classes is an error naming the label file.
    """
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    image = _cached_image(case, cache_dir, spacing_mm)
    if not with_label or case.get("label") is None:
        return image, None
    _check_same_grid(case["image"], case["label"])
    label = _cached_label(case, cache_dir, spacing_mm, image.shape)
    if num_classes is not None and label.size and int(label.max()) >= num_classes:
        raise ValueError(f"{case['label']}: label value {int(label.max())} but the task has {num_classes} "
                         f"classes (0..{num_classes - 1} in dataset.json 'labels'); fix the label or dataset.json")
    return image, label


# ----------------------------------------------------------------------------------------------------------
# 6. Patches: nnU-Net-style foreground oversampling (centre on a voxel of a present foreground class,
# random crop otherwise), and the paper's intensity augmentation.


def foreground_index(label, num_classes=None, max_per_class=None):
    """Flat voxel indices of each foreground class present in label (X, Y, Z) uint8.

    Returns {class: int32 or int64 (N,) indices into label.ravel()}, only classes with N > 0.
    Compute once per case and pass to sample_patch. num_classes: values >= it raise ValueError.
    max_per_class: keep an evenly strided subset (bounds memory for big organs; nnU-Net keeps 10,000).
    """
    flat = np.asarray(label).ravel()
    where = np.flatnonzero(flat)
    values = flat[where]
    if num_classes is not None and values.size and int(values.max()) >= num_classes:
        raise ValueError(f"foreground_index: label value {int(values.max())} >= num_classes {num_classes}")
    index_dtype = np.int32 if flat.size < 2**31 else np.int64
    index = {}
    for c in np.unique(values):
        voxels = where[values == c].astype(index_dtype)
        if max_per_class and voxels.size > max_per_class:
            voxels = voxels[:: int(np.ceil(voxels.size / max_per_class))]
        index[int(c)] = voxels
    return index


def _pick_centre(shape, label, fg_fraction, rng, fg_index):
    """Patch centre (3,) int: with prob fg_fraction a voxel of a random present foreground class, else any voxel."""
    if label is not None and rng.random() < fg_fraction:
        if fg_index is None:
            fg_index = foreground_index(label)
        present = [c for c in sorted(fg_index) if c != 0 and len(fg_index[c])]
        if present:
            voxels = fg_index[present[rng.integers(len(present))]]
            return np.array(np.unravel_index(int(voxels[rng.integers(len(voxels))]), shape))
    return np.array([rng.integers(n) for n in shape])


def _crop_slices(shape, centre, patch_vox):
    """Source and destination slices of a patch centred at `centre` (the part that lies inside the volume)."""
    start = np.asarray(centre) - np.asarray(patch_vox) // 2
    src, dst = [], []
    for n, s, p in zip(shape, start, patch_vox):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    return tuple(src), tuple(dst)


def sample_patch(image_hu, label, patch_vox, fg_fraction, rng, window_hu, fg_index=None):
    """One training patch.

    image_hu (X, Y, Z) HU, float or an int16 memmap (only the crop is read); label uint8 (X, Y, Z) or None;
    patch_vox (px, py, pz); fg_fraction: probability of centring on foreground (paper: 1:1 -> 0.5);
    rng np.random.Generator; window_hu (lo_hu, hi_hu); fg_index from foreground_index (computed if None).
    Returns patch float32 (px, py, pz) windowed to [0, 1] and label_patch uint8 (px, py, pz) or None.
    Parts outside the volume are padded with 0 after windowing (image) and 0 = background (label).
    """
    patch_vox = tuple(int(p) for p in patch_vox)
    if len(patch_vox) != 3 or min(patch_vox) < 1 or np.ndim(image_hu) != 3:
        raise ValueError(f"sample_patch: need a 3-D image and 3 positive patch sizes; got image shape "
                         f"{np.shape(image_hu)}, patch_vox {patch_vox}")
    if label is not None and label.shape != image_hu.shape:
        raise ValueError(f"sample_patch: label shape {label.shape} differs from image shape {image_hu.shape}")
    centre = _pick_centre(image_hu.shape, label, fg_fraction, rng, fg_index)
    src, dst = _crop_slices(image_hu.shape, centre, patch_vox)
    patch = np.zeros(patch_vox, dtype=np.float32)
    patch[dst] = window(image_hu[src], *window_hu)
    if label is None:
        return patch, None
    label_patch = np.zeros(patch_vox, dtype=np.uint8)
    label_patch[dst] = label[src]
    return patch, label_patch


def augment_intensity(patch, rng, shift=0.1, scale=0.1, noise_std=0.1):
    """The paper's augmentation (intensity shift, intensity scale, gaussian noise), each with probability 0.5.

    patch float32 (any shape) in window units [0, 1]; returns a new float32 array of the same shape.
    scale: multiply by 1 + U(-scale, scale); shift: add U(-shift, shift); noise: add N(0, s^2) per voxel with
    s ~ U(0, noise_std) per patch. The paper names the three transforms but no values; these follow MONAI:
    RandShiftIntensityd(offsets=0.10, prob=0.50) in its BTCV Swin UNETR tutorial, RandScaleIntensityd
    factors=0.1 in its BraTS tutorial, RandGaussianNoise's default std=0.1. Voxels never move.
    """
    out = np.array(patch, dtype=np.float32, copy=True)
    if rng.random() < 0.5:
        out *= np.float32(1.0 + rng.uniform(-scale, scale))
    if rng.random() < 0.5:
        out += np.float32(rng.uniform(-shift, shift))
    if rng.random() < 0.5:
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(rng.uniform(0, noise_std))
    return out


# ----------------------------------------------------------------------------------------------------------
# 7. Pool / validation split: fixed by seed and saved, so every strategy and repeat sees the same split.


def default_n_val(task_name, n_cases):
    """Validation size: the paper's for Task03 (26) and Task08 (61) when the set is big enough, else 20 %.

    Always leaves at least one pool case and one validation case.
    """
    if n_cases < 2:
        raise ValueError(f"need at least 2 cases for a pool / validation split, got {n_cases}")
    task = _match_task(task_name)
    if task and n_cases > PAPER_N_VAL[task]:
        return PAPER_N_VAL[task]
    return int(min(max(1, round(0.2 * n_cases)), n_cases - 1))


def _resolve_n_val(n_val, n_cases):
    """n_val as a count: int as given, or a float in (0, 1) taken as a fraction of n_cases."""
    if isinstance(n_val, bool) or not isinstance(n_val, (int, float, np.integer, np.floating)):
        raise ValueError(f"n_val must be an int or a fraction in (0, 1), got {n_val!r}")
    if isinstance(n_val, (float, np.floating)):
        if not 0 < n_val < 1:
            raise ValueError(f"n_val as a fraction must lie in (0, 1), got {n_val}")
        n_val = min(max(1, round(n_val * n_cases)), n_cases - 1)
    if not 0 <= n_val <= n_cases - 1:
        raise ValueError(f"n_val={n_val} must leave at least one of the {n_cases} cases in the pool")
    return int(n_val)


def _reload_split(path, case_ids):
    """Read a saved split and check it names only known cases, each once."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        pool, val = list(saved["pool"]), list(saved["val"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid split file ({e}); delete it to make a new split") from e
    unknown = sorted(set(pool + val) - set(case_ids))
    if unknown:
        raise ValueError(f"{path}: names cases not in the data set: {unknown[:10]}; "
                         "delete the split file or point to the data set it was made for")
    if len(set(pool + val)) != len(pool) + len(val):
        raise ValueError(f"{path}: a case appears twice in pool/val; delete the split file to make a new one")
    missing = set(case_ids) - set(pool + val)
    if missing:
        warnings.warn(f"{path}: {len(missing)} cases of the data set are in neither pool nor val; they are unused")
    return {"pool": pool, "val": val}


def split_cases(case_ids, n_val, seed, path):
    """Split case ids into {"pool": [ids], "val": [ids]}, deterministic by seed.

    If `path` exists the saved split is reloaded (and checked against case_ids); otherwise it is drawn
    (np.random.default_rng(seed) permutation of the naturally sorted ids) and written atomically as JSON.
    n_val: int count, or float in (0, 1) for a fraction.
    """
    case_ids = sorted(set(case_ids), key=_natural_key)
    if path is not None and Path(path).is_file():
        return _reload_split(path, case_ids)
    n_val = _resolve_n_val(n_val, len(case_ids))
    order = np.random.default_rng(int(seed)).permutation(len(case_ids))
    val = sorted((case_ids[i] for i in order[:n_val]), key=_natural_key)
    pool = sorted((case_ids[i] for i in order[n_val:]), key=_natural_key)
    if path is not None:
        atomic_write_json(path, {"seed": int(seed), "n_val": n_val, "pool": pool, "val": val})
    return {"pool": pool, "val": val}


# ----------------------------------------------------------------------------------------------------------
# 8. The phantom: synthetic contrast-enhanced (portal-venous) abdominal CT, written exactly like MSD data.
# Typical portal-venous HU used below: fat -100, muscle 50, bone 400-700, liver 100-130, spleen ~110,
# kidney cortex 150-180, aorta ~160, hypodense tumours 40-70 (textbook CT attenuation values).


def _phantom_affine(shape_vox, spacing_mm):
    """LPS-like storage affine diag(-sx, -sy, sz) with a table offset, as DICOM converters write it."""
    affine = np.diag([-spacing_mm[0], -spacing_mm[1], spacing_mm[2], 1.0])
    centre_vox = (np.asarray(shape_vox) - 1) / 2
    affine[:3, 3] = np.array([-8.0, 20.0, -450.0]) - affine[:3, :3] @ centre_vox  # volume centre in world mm
    return affine


def _phantom_grid_mm(shape_vox, affine, shift_mm):
    """RAS mm of voxel centres relative to the patient centre, as broadcastable (X,1,1), (1,Y,1), (1,1,Z) arrays."""
    centre = affine[:3, :3] @ ((np.asarray(shape_vox) - 1) / 2) + affine[:3, 3] + shift_mm
    axes = [(affine[d, d] * np.arange(n) + affine[d, 3] - centre[d]).astype(np.float32)
            for d, n in enumerate(shape_vox)]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def _ellipsoid(grid, centre, radii):
    """Normalised squared distance sum(((p - centre) / radii)^2) on the grid; <= 1 inside the ellipsoid."""
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))


def _smooth_field(rng, shape, sigma_vox):
    """Zero-mean, unit-sd, spatially smooth random field (X, Y, Z) float32."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _paint_body(hu, grid, body):
    """Air outside, skin fat ring, muscle wall, visceral fat inside; spine and aorta. Returns the inside mask."""
    x, y, _ = grid
    r = np.broadcast_to((x / body[0]) ** 2 + (y / body[1]) ** 2, hu.shape)
    hu[r <= 1.0] = -100.0                        # subcutaneous fat
    hu[r <= 0.88] = 50.0                         # abdominal wall muscle
    inside = r <= 0.72
    hu[inside] = -100.0                          # visceral fat
    spine = np.broadcast_to((x / (0.16 * body[0])) ** 2 + ((y + 0.6 * body[1]) / (0.2 * body[1])) ** 2, hu.shape)
    hu[spine <= 1.0] = 700.0                     # cortical bone
    hu[spine <= 0.55] = 400.0                    # cancellous bone
    aorta = np.broadcast_to(((x + 0.1 * body[0]) / 6.0) ** 2 + ((y + 0.3 * body[1]) / 6.0) ** 2, hu.shape)
    hu[aorta <= 1.0] = 160.0                     # portal-venous aorta
    return inside & (spine > 1.0) & (aorta > 1.0)


def _paint_organs(hu, rng, grid, body, half_z, inside):
    """Kidneys (150-180 HU), spleen (~110 HU) and the liver; returns the liver mask (X, Y, Z) bool.

    Positions and radii are fractions of the body half-axes (rx, ry) and the half field of view in z.
    """
    unit = np.array((body[0], body[1], half_z))
    for side in (-1.0, 1.0):  # +x is the patient's right (RAS)
        kidney = _ellipsoid(grid, unit * (side * 0.42, -0.35, -0.35), unit * (0.13, 0.2, 0.3))
        hu[(kidney <= 1.0) & inside] = rng.uniform(150, 180)
    spleen_size = rng.uniform(0.7, 1.5)  # includes splenomegaly: a competing 100-150 HU blob
    spleen = _ellipsoid(grid, unit * (-0.55, -0.2, 0.3), unit * spleen_size * (0.17, 0.28, 0.35))
    hu[(spleen <= 1.0) & inside] = rng.uniform(100, 125)
    size, shift = rng.uniform(0.8, 1.15), unit * rng.uniform(-0.06, 0.06, 3)
    right_lobe = _ellipsoid(grid, shift + unit * (0.35, 0.0, 0.2), unit * size * (0.4, 0.55, 0.6))
    left_lobe = _ellipsoid(grid, shift + unit * (0.0, 0.3, 0.4), unit * size * (0.3, 0.25, 0.3))
    lumps = _smooth_field(rng, hu.shape, 3.0)
    liver = (np.minimum(right_lobe, left_lobe) + 0.2 * lumps <= 1.0) & inside
    # Mostly enhanced 100-130 HU; about 1 case in 6 poorly enhanced (real livers can be far lower:
    # /work/shared/data README, abdpelvis_000 at about 46 HU), where the HU band finds spleen or kidney instead.
    mean_hu = rng.uniform(100, 130) if rng.random() > 0.17 else rng.uniform(75, 95)
    hu[liver] = mean_hu + 6.0 * (lumps[liver] - lumps[liver].mean())  # mild perfusion heterogeneity
    return liver


def _paint_tumours(hu, rng, grid, liver, body):
    """0-3 hypodense tumours (40-70 HU) inside the liver; most cases have one. Returns the tumour mask."""
    tumour = np.zeros(hu.shape, dtype=bool)
    liver_voxels = np.flatnonzero(liver)
    n_tumours = 0 if rng.random() < 0.25 or liver_voxels.size == 0 else int(rng.integers(1, 4))
    for _ in range(n_tumours):
        centre_vox = np.unravel_index(liver_voxels[rng.integers(liver_voxels.size)], hu.shape)
        centre_mm = [float(g.ravel()[i]) for g, i in zip(grid, centre_vox)]
        radius_mm = rng.uniform(0.07, 0.15) * body[0]
        sphere = (_ellipsoid(grid, centre_mm, (radius_mm,) * 3) <= 1.0) & liver
        hu[sphere] = rng.uniform(40, 70)
        tumour |= sphere
    return tumour


def _phantom_case(rng, shape_vox, spacing_mm):
    """One synthetic case: image int16 HU (X, Y, Z), label uint8 (0 background, 1 liver, 2 tumour), affine."""
    affine = _phantom_affine(shape_vox, spacing_mm)
    half_fov_mm = np.asarray(shape_vox) * np.asarray(spacing_mm) / 2
    grid = _phantom_grid_mm(shape_vox, affine, rng.uniform(-0.04, 0.04, 3) * half_fov_mm)
    body = half_fov_mm[:2] * np.array((0.85, 0.65)) * rng.uniform(0.9, 1.05)  # (rx, ry) mm
    hu = np.full(shape_vox, -1000.0, dtype=np.float32)  # air
    inside = _paint_body(hu, grid, body)
    liver = _paint_organs(hu, rng, grid, body, half_fov_mm[2], inside)
    tumour = _paint_tumours(hu, rng, grid, liver, body)
    hu = ndimage.gaussian_filter(hu, 0.6)  # partial-volume blur at organ edges
    # Noise 10-20 HU sd, mildly correlated like reconstructed CT noise.
    hu += rng.uniform(10, 20) * _smooth_field(rng, shape_vox, 0.7)
    label = liver.astype(np.uint8)
    label[tumour] = 2
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)  # 12-bit CT range
    return image, label, affine


def _phantom_complete(root, params):
    """True if root holds a finished phantom written with exactly these parameters."""
    try:
        with open(root / "dataset.json", encoding="utf-8") as f:
            info = json.load(f)
        files = [root / e[k] for e in info["training"] for k in ("image", "label")]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return info.get("phantom") == params and all(p.is_file() for p in files)


def make_phantom_dataset(root, n_cases, seed=0, shape_vox=(64, 64, 40), spacing_mm=(2.5, 2.5, 4.0)):
    """Write the built-in demo data set: n_cases synthetic abdominal CTs in MSD layout under root.

    imagesTr/phantom_{i}.nii.gz (int16 HU, LPS-like affine, native spacing_mm), labelsTr/ same names
    (uint8: 0 background, 1 liver, 2 tumour) and dataset.json. Case i depends only on (seed, i).
    Idempotent: a complete folder made with the same parameters is left as is. Returns root (Path).
    """
    if int(n_cases) < 1 or len(shape_vox) != 3 or len(spacing_mm) != 3 or min(shape_vox) < 8:
        raise ValueError(f"make_phantom_dataset: need n_cases >= 1, 3 sizes >= 8 and 3 spacings; got "
                         f"{n_cases}, {shape_vox}, {spacing_mm}")
    root = Path(root)
    params = {"version": PHANTOM_VERSION, "n_cases": int(n_cases), "seed": int(seed),
              "shape_vox": [int(s) for s in shape_vox], "spacing_mm": [float(s) for s in spacing_mm]}
    if _phantom_complete(root, params):
        return root
    training = []
    for i in range(int(n_cases)):
        image, label, affine = _phantom_case(np.random.default_rng([int(seed), i]), params["shape_vox"], spacing_mm)
        write_nifti(root / "imagesTr" / f"phantom_{i}.nii.gz", image, affine)
        write_nifti(root / "labelsTr" / f"phantom_{i}.nii.gz", label, affine)
        training.append({"image": f"./imagesTr/phantom_{i}.nii.gz", "label": f"./labelsTr/phantom_{i}.nii.gz"})
    atomic_write_json(root / "dataset.json", {  # written last: its presence marks a complete folder
        "name": "Phantom", "description": "Synthetic contrast-enhanced abdominal CT (proxy-al demo)",
        "reference": "proxy-al make_phantom_dataset", "licence": "CC0", "release": "1.0",
        "tensorImageSize": "3D", "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "numTraining": int(n_cases), "numTest": 0, "training": training, "test": [], "phantom": params})
    return root
