"""Data for proxy-ranked active learning on 3D CT, top to bottom: 2. the data folder (Medical Segmentation
Decathlon, nnU-Net v2 raw, or paired by file name), 3. NIfTI reading in RAS (nibabel only there and in
write_nifti), 4. resampling and HU windowing (pure numpy), 5. the memory-mapped preprocessed cache, 6. patches
(the paper's 1:1 draw) and intensity augmentation, 7. the pool / validation split. (1, atomic writes: files.py.)

Arrays are (X, Y, Z) in RAS order: index X grows toward the patient's Right, Y toward Anterior, Z toward Superior.
"""
import gzip
import hashlib
import json
import os
import re
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from files import atomic_save_npy, atomic_write_bytes, atomic_write_json

# Paper settings: clip HU to these windows, then scale to [0, 1].
TASK_WINDOWS_HU = {"Task03_Liver": (-21, 189), "Task08_HepaticVessel": (-3, 243)}
# Other data sets: the paper's liver window, a soft-tissue abdominal window.
DEFAULT_WINDOW_HU = (-21, 189)
# Paper splits: Task03 105 pool / 26 validation; Task08 242 pool / 61 validation.
PAPER_N_VAL = {"Task03_Liver": 26, "Task08_HepaticVessel": 61}
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


# ----------------------------------------------------------------------------------------------------------
# 2. The data folder, in one of three layouts:
#    MSD:      root/dataset.json ("training" list, labels int -> name), imagesTr/<case>.nii.gz, labelsTr/<case>.nii.gz
#    nnU-Net:  root/dataset.json (channel_names, labels name -> int, file_ending), imagesTr/<case>_0000<ending>,
#              labelsTr/<case><ending>
#    no json:  imagesTr/<case>.nii.gz or imagesTr/<case>_0000.nii.gz, paired with labelsTr/<case>.nii.gz by name

# nnU-Net also reads .mha, .nrrd, .png and .tif (SimpleITK / PIL); this project reads NIfTI only (nibabel).
NNUNET_FILE_ENDINGS = (".nii.gz", ".nii")
NNUNET_CHANNEL = "_0000"  # nnU-Net's suffix of the first (here: only) input channel


def _natural_key(text):
    """Sort key that orders embedded numbers by value: liver_2 before liver_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _case_id(path):
    """Case id = file name without .nii.gz / .nii."""
    return re.sub(r"\.nii(\.gz)?$", "", Path(path).name)


def _nifti_files(folder):
    """The .nii.gz / .nii files in folder (none if it is missing). Names starting with '.' are AppleDouble
    '._x' files (macOS tar) or our own unfinished temporary files, and are skipped."""
    if not Path(folder).is_dir():
        return []
    return [p for p in Path(folder).iterdir()
            if p.name.endswith((".nii.gz", ".nii")) and not p.name.startswith(".") and p.is_file()]


def _load_dataset_json(json_path):
    """Parse dataset.json; errors name the file and the fix. Returns the dict."""
    try:
        info = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e}); fix or delete the file "
                         "(without dataset.json, imagesTr/ and labelsTr/ are paired by file name)") from e
    if not isinstance(info, dict):
        raise ValueError(f"{json_path}: expected a JSON object at the top level, got {type(info).__name__}")
    return info


def _is_nnunet(info):
    """nnU-Net v2 raw dataset.json (channel_names, file_ending) rather than MSD (modality, training)."""
    return "channel_names" in info or "file_ending" in info


def _training_entries(info, json_path):
    """Validate dataset.json 'training': a list of {"image": path, "label": path} objects."""
    entries = info.get("training")
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: missing or malformed 'training' list; an MSD dataset.json has "
                         '"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...] '
                         '(an nnU-Net v2 one has "channel_names" and "file_ending" instead)')
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("image"), str)
                and isinstance(entry.get("label", ""), (str, type(None)))):
            raise ValueError(f"{json_path}: training entry {i} is {entry!r}; expected an object "
                             '{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}')
    if info.get("numTraining") not in (None, len(entries)):
        warnings.warn(f"{json_path}: numTraining={info['numTraining']} but 'training' has {len(entries)} "
                      "entries; using the list")
    return entries


def _cases_from_json(root, json_path, info):
    """Cases listed in the MSD dataset.json 'training' (the 'test' list is ignored: it has no labels). An entry
    without a label (no "label", null or "") gets root/labelsTr/<image file name> once that file exists."""
    cases = []
    for entry in _training_entries(info, json_path):
        image = root / entry["image"]
        if not image.is_file():
            raise FileNotFoundError(f"{image}: listed in {json_path} but missing; restore the file "
                                    "or remove its entry from 'training'")
        # unlabeled scans: a label annotated later is found by the image's file name
        label_to = root / entry["label"] if entry.get("label") else root / "labelsTr" / image.name
        if entry.get("label") and not label_to.is_file():
            warnings.warn(f"{label_to}: listed in {json_path} but missing; case treated as unlabeled")
        cases.append(_case(_case_id(image), image, label_to))
    if not cases:
        raise ValueError(f"{json_path}: the 'training' list is empty; list the cases or delete dataset.json")
    return cases


def _nnunet_file_ending(info, json_path):
    """Check what this project can read of an nnU-Net dataset.json: one channel, a NIfTI file_ending, the
    imagesTr/ + labelsTr/ layout. Returns the file_ending (".nii.gz" or ".nii")."""
    channels = info.get("channel_names")
    if not isinstance(channels, dict) or len(channels) != 1:
        raise ValueError(f"{json_path}: 'channel_names' is {channels!r}; this project segments single-channel "
                         'CT, e.g. "channel_names": {"0": "CT"}; keep one channel (its imagesTr/<case>_0000 files)')
    ending = info.get("file_ending")
    if ending not in NNUNET_FILE_ENDINGS:
        raise ValueError(f"{json_path}: 'file_ending' is {ending!r}; this project reads NIfTI only "
                         f"({', '.join(NNUNET_FILE_ENDINGS)}); convert the images and labels to .nii.gz")
    if "dataset" in info:
        raise ValueError(f"{json_path}: a 'dataset' key (files listed outside imagesTr/ and labelsTr/) is not "
                         "supported; place the files as imagesTr/<case>_0000<ending> and labelsTr/<case><ending>")
    return ending


def _nnunet_labels(info, json_path):
    """{int: name} from an nnU-Net 'labels' {name: int}; refuses regions and the ignore label, which the
    losses and the Dice here do not model."""
    raw = info.get("labels")
    if not isinstance(raw, dict):
        raise ValueError(f"{json_path}: 'labels' must map names to class numbers, e.g. "
                         '{"background": 0, "liver": 1}; got ' + repr(raw))
    regions = [name for name, value in raw.items() if isinstance(value, (list, tuple))]
    if "regions_class_order" in info or regions:
        raise ValueError(f"{json_path}: region-based labels ('regions_class_order' or labels {regions} given as "
                         "lists) are not supported; give every class its own number and drop 'regions_class_order'")
    if any(str(name).lower() == "ignore" for name in raw):
        raise ValueError(f"{json_path}: the 'ignore' label (partial annotation) in 'labels' is not supported; "
                         "remove it from 'labels' and label those voxels fully")
    try:
        return {int(value): str(name) for name, value in raw.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{json_path}: 'labels' values must be class numbers, got {raw!r}") from e


def _cases_from_nnunet(root, json_path, info):
    """nnU-Net v2 raw: imagesTr/<case>_0000<ending> paired with labelsTr/<case><ending>; case id = <case>."""
    ending = _nnunet_file_ending(info, json_path)
    images_dir, suffix = root / "imagesTr", NNUNET_CHANNEL + ending
    names = [p.name for p in images_dir.iterdir() if p.is_file() and not p.name.startswith(".")] \
        if images_dir.is_dir() else []
    stray = [n for n in names if n.endswith(ending) and not n.endswith(suffix)]
    if stray:
        warnings.warn(f"{images_dir}: {_few(stray)} not named <case>{suffix} as {json_path} 'file_ending' "
                      "asks; ignored; rename them to be used")
    ids = [n[:-len(suffix)] for n in names if n.endswith(suffix)]
    if not ids:
        raise ValueError(f"{images_dir}: no images named <case>{suffix}; an nnU-Net raw dataset has "
                         f"imagesTr/<case>{suffix} (file_ending from {json_path})")
    return [_case(cid, images_dir / f"{cid}{suffix}", root / "labelsTr" / f"{cid}{ending}") for cid in ids]


def _cases_from_folders(root):
    """Without dataset.json: every imagesTr/*.nii(.gz), paired with labelsTr/<same name> when it exists.
    When every image is named <case>_0000 (nnU-Net's naming) the id is <case> and its label labelsTr/<case>;
    the id does not depend on the label being there yet, as split.json and the run state name cases by id."""
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: not found; expected an MSD folder with imagesTr/ "
                                "(and labelsTr/ or dataset.json); or make a demo one with phantom.make_phantom_dataset(root, n)")
    images = _nifti_files(images_dir)
    if not images:
        raise ValueError(f"{images_dir}: no .nii.gz or .nii images; put the CT volumes there")
    channel_named = all(_case_id(p).endswith(NNUNET_CHANNEL) for p in images)
    cases = []
    for image in images:
        stem = _case_id(image)
        case_id = stem[:-len(NNUNET_CHANNEL)] if channel_named else stem
        candidates = [root / "labelsTr" / (case_id + image.name[len(stem):]), root / "labelsTr" / image.name]
        found = [p for p in dict.fromkeys(candidates) if p.is_file()]
        if len(found) > 1:      # <case> and <case>_0000: which one is the newer annotation is not ours to guess
            raise ValueError(f"{found[0]} and {found[1]} are both labels of case {case_id} ({image}); keep one "
                             "(delete or move the other out of labelsTr/) and rerun")
        cases.append(_case(case_id, image, found[0] if found else candidates[0]))
    return cases


def _case(case_id, image, label_to):
    """A case: {"id", "image", "label": the label file or None while it is missing, "label_to": where its label
    is, or where a label saved later is found}."""
    return {"id": case_id, "image": str(image), "label": str(label_to) if label_to.is_file() else None,
            "label_to": str(label_to)}


def _few(names, n=5):
    """'a, b, c and 4 more' for messages."""
    names = sorted(str(x) for x in names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _check_label_files(root, cases, same_name_pairs, nnunet=None):
    """Every labelsTr/*.nii(.gz) should pair with an image: warn naming the ones that do not, and stop when
    none does, which would otherwise read as 'nothing is labeled'. A label pairs when it is some case's
    label or, with same_name_pairs (MSD), when an image of its name is in imagesTr/ though not listed.
    nnunet: (dataset.json path, file_ending) of an nnU-Net folder, whose labels must have that ending."""
    labels_dir = root / "labelsTr"
    files = _nifti_files(labels_dir)
    used = {Path(c["label"]).resolve() for c in cases if c["label"]}
    images = {p.name for p in _nifti_files(root / "imagesTr")} if same_name_pairs else set()
    orphans = [p.name for p in files if p.resolve() not in used and p.name not in images]
    if not orphans:
        return
    fix = _nnunet_label_fix(cases, orphans, *nnunet) if nnunet else (
        "a label pairs with an image by name: labelsTr/<case>.nii.gz with imagesTr/<case>.nii.gz or "
        "imagesTr/<case>_0000.nii.gz (nnU-Net), or as listed in dataset.json; rename or remove the files")
    if len(orphans) == len(files):
        raise ValueError(f"{labels_dir}: none of its {len(orphans)} label files ({_few(orphans)}) pairs with an "
                         f"image in {root / 'imagesTr'}; {fix}")
    warnings.warn(f"{labels_dir}: {len(orphans)} label file{'s' * (len(orphans) != 1)} pair{'s' * (len(orphans) == 1)} with no image and are not used "
                  f"({_few(orphans)}); {fix}")


def _nnunet_label_fix(cases, orphans, json_path, ending):
    """The fix for labels of an nnU-Net folder that pair with no image: its file_ending and, for each file
    that belongs to a case under another name (<case>.nii.gz where file_ending is .nii, <case>_0000), the
    name expected, and gzip / gunzip where the compression differs (a renamed file keeps its own)."""
    labels = {c["id"]: c["label"] for c in cases}
    moves, spare = [], []
    for name in orphans:
        cid = _case_id(name)
        cid = cid[:-len(NNUNET_CHANNEL)] if cid not in labels and cid.endswith(NNUNET_CHANNEL) else cid
        if labels.get(cid):
            spare.append(f"labelsTr/{name} (case {cid} has {Path(labels[cid]).name})")
        elif cid in labels:
            gz = name.endswith(".gz"), ending.endswith(".gz")
            how = "" if gz[0] == gz[1] else " (gunzip it: .nii is uncompressed)" if gz[0] else " (gzip it)"
            moves.append(f"labelsTr/{name} -> labelsTr/{cid}{ending}{how}")
    return (f"{json_path} has 'file_ending' {ending!r}, so the label of a case is labelsTr/<case>{ending}"
            + (f"; save {_few(moves)}" if moves else "") + (f"; remove {_few(spare)}" if spare else "")
            + ("" if moves or spare else "; rename or remove the files")
            + f" (or change 'file_ending' in {json_path}, if every image and label has the other ending)")


def read_msd(root: str | Path) -> list[dict]:
    """List the training cases of a data folder (MSD, nnU-Net v2 raw, or imagesTr/ + labelsTr/ alone).

    root: folder with dataset.json (MSD: its 'training' list; nnU-Net v2: its file_ending, imagesTr/<case>_0000
    and labelsTr/<case>) or, without it, imagesTr/ and labelsTr/ paired by file name. Returns
    [{"id": str, "image": str path, "label": str path or None, "label_to": str path}] in natural order of id
    (liver_2 before liver_10). A case without a label file is unlabeled (label None); "label_to" is where its
    label is, or where a label saved later is found. Label files that pair with no image are warned about,
    or an error when none pairs.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found; pass an MSD task folder "
                                "(with imagesTr/) or create a demo one with phantom.make_phantom_dataset")
    json_path = root / "dataset.json"
    if json_path.is_file():
        info = _load_dataset_json(json_path)
        nnunet_layout = _is_nnunet(info)
        cases = (_cases_from_nnunet if nnunet_layout else _cases_from_json)(root, json_path, info)
    else:
        nnunet_layout, cases = False, _cases_from_folders(root)
    ids = [c["id"] for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{root}: case ids {duplicates} appear more than once; every image needs a unique name")
    _check_label_files(root, cases, same_name_pairs=not nnunet_layout,
                       nnunet=(json_path, info["file_ending"]) if nnunet_layout else None)
    return sorted(cases, key=lambda c: _natural_key(c["id"]))


def read_task_info(root: str | Path) -> dict:
    """Task name and classes: {"name": str, "labels": {int: str}, "num_classes": int}.

    From dataset.json ('name', 'labels': int -> name for MSD, name -> int for nnU-Net v2); without it,
    name = folder name and labels = background/foreground.
    """
    root = Path(root)
    json_path = root / "dataset.json"
    if not json_path.is_file():
        return {"name": root.resolve().name, "labels": {0: "background", 1: "foreground"}, "num_classes": 2}
    info = _load_dataset_json(json_path)
    if _is_nnunet(info):
        _nnunet_file_ending(info, json_path)
        labels = _nnunet_labels(info, json_path)
    else:
        raw = info.get("labels")
        try:
            labels = {int(k): str(v) for k, v in raw.items()}
        except (AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"{json_path}: 'labels' must map class numbers to names, e.g. "
                             '{"0": "background", "1": "liver"}; got ' + repr(raw)) from e
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise ValueError(f"{json_path}: 'labels' must number the classes 0..C-1 with C >= 2 (0 = background); "
                         f"got {sorted(labels)}")
    return {"name": str(info.get("name", root.resolve().name)), "labels": labels, "num_classes": len(labels)}


def nnunet_raw_path(name_or_path: str | int | Path) -> Path:
    """The data folder for `--data`: an existing folder as is, else an nnU-Net dataset name
    (Dataset003_Liver) or id (3, "003") looked up under $nnUNet_raw, nnU-Net's own variable."""
    text = str(name_or_path)
    if Path(text).expanduser().is_dir():
        return Path(text).expanduser()
    if not re.fullmatch(r"Dataset\d{3}_[\w-]+|\d{1,3}", text):
        raise FileNotFoundError(f"{text}: no such data folder; pass a folder, or an nnU-Net dataset name "
                                "(Dataset003_Liver) or id (3) that is under $nnUNet_raw")
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise ValueError(f"{text}: an nnU-Net dataset name, but $nnUNet_raw is not set; "
                         "export nnUNet_raw=/path/to/nnUNet_raw, or pass the dataset folder itself")
    if text.isdigit():
        found = sorted(p for p in Path(raw).glob(f"Dataset{int(text):03d}_*") if p.is_dir())
        if len(found) != 1:
            raise FileNotFoundError(f"{text}: {'several' if found else 'no'} dataset folders Dataset{int(text):03d}_* "
                                    f"in $nnUNet_raw={raw} {[p.name for p in found]}; pass the full name or folder")
        return found[0]
    folder = Path(raw) / text
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not found ($nnUNet_raw={raw}); check the dataset name, or pass the folder")
    return folder


def _match_task(task_name):
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
    lo_hu, hi_hu = TASK_WINDOWS_HU.get(_match_task(task_name), DEFAULT_WINDOW_HU)
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
    return write_nifti(path, array, _open_nifti(image_path).affine)


# ----------------------------------------------------------------------------------------------------------
# 5. The preprocessed cache. One .npy per source file (image and label separately), named by a hash of the
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


# ----------------------------------------------------------------------------------------------------------
# 6. Patches. The paper's 1:1: a patch is centred on foreground with probability fg_fraction, on a uniform
# voxel of any foreground class (tumour centres in proportion to tumour voxels, as MONAI's
# RandCropByPosNegLabeld), else on a background voxel. Beyond the paper, by_class: a present foreground class
# first, uniformly, then a voxel of it (nnU-Net's oversampling; helps small classes such as tumours and vessels).
# fg_fraction None: the proxy's "random selection of patches", a centre anywhere. Then the paper's augmentation.


def foreground_index(label: np.ndarray) -> dict[int, np.ndarray]:
    """Flat voxel indices of each foreground class present in label (X, Y, Z) uint8.

    Returns {class: int32 or int64 (N,) indices into label.ravel()}, only classes with N > 0.
    Compute once per case and pass to sample_patch.
    """
    flat = np.asarray(label).ravel()
    where = np.flatnonzero(flat)
    values = flat[where]
    index_dtype = np.int32 if flat.size < 2**31 else np.int64
    return {int(c): where[values == c].astype(index_dtype) for c in np.unique(values)}


BACKGROUND_TRIES = 100  # a background centre by rejection: fails only where background is a tiny share of the volume


def _foreground_voxel(fg_index, rng, by_class):
    """A flat index: uniform over all foreground voxels, or (by_class) a uniform present class, then a voxel."""
    classes = [c for c in sorted(fg_index) if c != 0 and len(fg_index[c])]
    if by_class:
        voxels = fg_index[classes[rng.integers(len(classes))]]
        return int(voxels[rng.integers(len(voxels))])
    counts = np.cumsum([len(fg_index[c]) for c in classes])     # the classes' voxels, end to end, never built
    i = int(rng.integers(counts[-1]))
    k = int(np.searchsorted(counts, i, side="right"))           # class c with probability n_c / N
    return int(fg_index[classes[k]][i - (counts[k - 1] if k else 0)])


def _background_voxel(shape, label, rng):
    """A flat index of a voxel with label 0, by rejection; any voxel if BACKGROUND_TRIES draws found none."""
    size = int(np.prod(shape))
    for _ in range(BACKGROUND_TRIES):
        i = int(rng.integers(size))
        if label[np.unravel_index(i, shape)] == 0:
            return i
    return int(rng.integers(size))


def _pick_centre(shape, label, fg_fraction, rng, fg_index, by_class=False):
    """Patch centre (3,) int: with prob fg_fraction a foreground voxel, else a background one; any voxel
    where fg_fraction is None, the label is None, or (for a foreground draw) the label has no foreground."""
    size = int(np.prod(shape))
    if fg_fraction is None or label is None:
        flat = rng.integers(size)
    elif rng.random() < fg_fraction:
        fg_index = foreground_index(label) if fg_index is None else fg_index
        has_fg = any(c != 0 and len(v) for c, v in fg_index.items())
        flat = _foreground_voxel(fg_index, rng, by_class) if has_fg else rng.integers(size)
    else:
        flat = _background_voxel(shape, label, rng)
    return np.array(np.unravel_index(int(flat), shape))


def _crop_slices(shape, centre, patch_vox):
    """Source and destination slices of a patch centred at `centre` (the part that lies inside the volume)."""
    start = np.asarray(centre) - np.asarray(patch_vox) // 2
    src, dst = [], []
    for n, s, p in zip(shape, start, patch_vox):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    return tuple(src), tuple(dst)


def sample_patch(image_hu: np.ndarray, label: np.ndarray | None, patch_vox: tuple[int, int, int],
                 fg_fraction: float | None, rng: np.random.Generator, window_hu: tuple[float, float],
                 fg_index: dict[int, np.ndarray] | None = None, by_class: bool = False
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """One training patch.

    image_hu (X, Y, Z) HU, float or an int16 memmap (only the crop is read); label uint8 (X, Y, Z) or None;
    patch_vox (px, py, pz); rng np.random.Generator; window_hu (lo_hu, hi_hu); fg_index from
    foreground_index (computed if None).
    fg_fraction: probability of a foreground centre (paper: 1:1 -> 0.5; 9:1 -> 0.9 with noisy labels). A
      foreground centre is uniform over all foreground voxels (each class in proportion to its voxels, as
      MONAI's RandCropByPosNegLabeld); a background centre is a voxel with label 0. A label without
      foreground, or label None: any voxel. None: any voxel, label ignored (the proxy's random patches).
    by_class: beyond the paper, a foreground centre picks a present class uniformly, then a voxel of it, so
      small classes (tumours, vessels) are centred on as often as large ones.
    Returns patch float32 (px, py, pz) windowed to [0, 1] and label_patch uint8 (px, py, pz) or None.
    Parts outside the volume are padded with 0 after windowing (image) and 0 = background (label).
    """
    patch_vox = tuple(int(p) for p in patch_vox)
    if len(patch_vox) != 3 or min(patch_vox) < 1 or np.ndim(image_hu) != 3:
        raise ValueError(f"sample_patch: need a 3-D image and 3 positive patch sizes; got image shape "
                         f"{np.shape(image_hu)}, patch_vox {patch_vox}")
    if fg_fraction is not None and not 0 <= fg_fraction <= 1:
        raise ValueError(f"sample_patch: fg_fraction {fg_fraction} must lie in [0, 1], or be None for any voxel")
    if label is not None and label.shape != image_hu.shape:
        raise ValueError(f"sample_patch: label shape {label.shape} differs from image shape {image_hu.shape}")
    centre = _pick_centre(image_hu.shape, label, fg_fraction, rng, fg_index, by_class)
    src, dst = _crop_slices(image_hu.shape, centre, patch_vox)
    patch = np.zeros(patch_vox, dtype=np.float32)
    patch[dst] = window(image_hu[src], *window_hu)
    if label is None:
        return patch, None
    label_patch = np.zeros(patch_vox, dtype=np.uint8)
    label_patch[dst] = label[src]
    return patch, label_patch


def augment_intensity(patch: np.ndarray, rng: np.random.Generator, shift: float = 0.1, scale: float = 0.1,
                      noise_std: float = 0.1) -> np.ndarray:
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


def default_n_val(task_name: str, n_cases: int) -> int:
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


def read_split(path) -> dict:
    """A saved split {"pool": [ids], "val": [ids]}, checked: lists of case ids, each once. ValueError naming
    the file otherwise."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        pool, val = list(saved["pool"]), list(saved["val"])
        if not all(isinstance(c, str) for c in pool + val):
            raise TypeError("pool and val must be lists of case ids")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid split file ({e}); restore it from a backup, or start a new run "
                         "folder (a new split would move cases between pool and validation)") from e
    if len(set(pool + val)) != len(pool) + len(val):
        raise ValueError(f"{path}: a case appears twice in pool/val; delete the split file to make a new one")
    return {"pool": pool, "val": val}


def _reload_split(path, case_ids):
    """Read a saved split and check it names only known cases."""
    split = read_split(path)
    unknown = sorted(set(split["pool"] + split["val"]) - set(case_ids))
    if unknown:
        raise ValueError(f"{path}: names cases not in the data set: {unknown[:10]}; "
                         "delete the split file or point to the data set it was made for")
    missing = set(case_ids) - set(split["pool"] + split["val"])
    if missing:
        warnings.warn(f"{path}: {len(missing)} cases of the data set are in neither pool nor val ({_few(missing)}); "
                      "they are unused")
    return split


def split_cases(case_ids: list, n_val, seed: int, path, candidates: list | None = None) -> dict:
    """Split case ids into {"pool": [ids], "val": [ids]}, deterministic by seed.

    If `path` exists the saved split is reloaded (and checked against case_ids); otherwise n_val validation
    cases are drawn from `candidates` (default: all; in annotation mode, the labeled cases) by a
    np.random.default_rng(seed) permutation of the naturally sorted ids, the rest of case_ids is the pool,
    and the split is written atomically as JSON. n_val: int count, or float in (0, 1) for a fraction of the
    candidates.
    """
    case_ids = sorted(set(case_ids), key=_natural_key)
    if path is not None and Path(path).is_file():
        return _reload_split(path, case_ids)
    candidates = case_ids if candidates is None else sorted(set(candidates), key=_natural_key)
    n_val = _resolve_n_val(n_val, len(candidates)) if n_val else 0
    order = np.random.default_rng(int(seed)).permutation(len(candidates))
    val = sorted((candidates[i] for i in order[:n_val]), key=_natural_key)
    pool = [c for c in case_ids if c not in set(val)]
    if path is not None:
        atomic_write_json(path, {"seed": int(seed), "n_val": n_val, "pool": pool, "val": val})
    return {"pool": pool, "val": val}
