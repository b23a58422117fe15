"""The data-set folder, in one of three layouts, read as a list of cases (file names only, no voxels):
    MSD:      root/dataset.json ("training" list, labels int -> name), imagesTr/<case>.nii.gz, labelsTr/<case>.nii.gz
    nnU-Net:  root/dataset.json (channel_names, labels name -> int, file_ending), imagesTr/<case>_0000<ending>,
              labelsTr/<case><ending>
    no json:  imagesTr/<case>.nii.gz or imagesTr/<case>_0000.nii.gz, paired with labelsTr/<case>.nii.gz by name
"""
import json
import os
import re
import warnings
from pathlib import Path

from files import few

# nnU-Net also reads .mha, .nrrd, .png and .tif (SimpleITK / PIL); this project reads NIfTI only (nibabel).
NNUNET_FILE_ENDINGS = (".nii.gz", ".nii")
NNUNET_NAME = re.compile(r"Dataset\d{3}_[\w-]+")   # a dataset named as nnU-Net names them
NNUNET_CHANNEL = "_0000"  # nnU-Net's suffix of the first (here: only) input channel


def natural_key(text):
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
    cases, absent = [], []
    for entry in _training_entries(info, json_path):
        image = root / entry["image"]
        if not image.is_file():
            raise FileNotFoundError(f"{image}: listed in {json_path} but missing; restore the file "
                                    "or remove its entry from 'training'")
        # unlabeled scans: a label annotated later is found by the image's file name
        label_to = root / entry["label"] if entry.get("label") else root / "labelsTr" / image.name
        if entry.get("label") and not label_to.is_file():
            absent.append(label_to.name)
        cases.append(_case(_case_id(image), image, label_to))
    if absent:      # the normal state of an annotation run: said once, as a count
        warnings.warn(f"{json_path}: {len(absent)} label file(s) listed but not in labelsTr/ yet ({few(absent)}); "
                      "those cases are unlabeled (annotation mode asks for them)")
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
        warnings.warn(f"{images_dir}: {few(stray)} not named <case>{suffix} as {json_path} 'file_ending' "
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
                                "(and labelsTr/ or dataset.json); or make a demo one with "
                                "phantom.make_phantom_dataset(root, n)")
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
        raise ValueError(f"{labels_dir}: none of its {len(orphans)} label files ({few(orphans)}) pairs with an "
                         f"image in {root / 'imagesTr'}; {fix}")
    many = len(orphans) != 1
    warnings.warn(f"{labels_dir}: {len(orphans)} label file{'s' * many} pair{'s' * (not many)} with no image and "
                  f"are not used ({few(orphans)}); {fix}")


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
            + (f"; save {few(moves)}" if moves else "") + (f"; remove {few(spare)}" if spare else "")
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
    return sorted(cases, key=lambda c: natural_key(c["id"]))


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
