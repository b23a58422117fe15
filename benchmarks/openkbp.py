"""OpenKBP head-and-neck CTs with manual contours as an MSD-layout folder, for a study on real CT.

    python benchmarks/openkbp.py open-kbp data/OpenKBP_Mandible --structures Mandible
    python benchmarks/openkbp.py open-kbp data/OpenKBP_Parotids --structures RightParotid+LeftParotid
    python benchmarks/openkbp.py open-kbp data/OpenKBP_OARs --structures Mandible,Brainstem,SpinalCord

SRC is a clone (or unpacked archive) of https://github.com/ababier/open-kbp (MIT licence; the data are TCIA
head-and-neck CTs with clinical radiotherapy contours). Each patient folder provided-data/<split>/pt_N/ holds
ct.csv, voxel_dimensions.csv and one CSV per contoured structure. OUT gets imagesTr/pt_N.nii.gz (int16 HU),
labelsTr/pt_N.nii.gz (uint8 classes) and dataset.json with the labels named. --structures lists the classes,
comma-separated; A+B merges structures into one class (both parotids as one label).

The files, as the challenge's own code reads them (provided_code/utils.py load_file, data_loader.py shape_data):
a sparse CSV "index,value" whose index is the C-order (row-major) position in a 128 x 128 x 128 grid; a mask CSV
lists the indices inside the structure (empty value). CT values are stored as HU + 1000 and absent where the
stored value is 0 (air, -1000 HU). voxel_dimensions.csv holds three numbers: in-plane, in-plane, slice (mm).

Axis order and orientation, read from the data rather than assumed:
  - axis 2 is the slice axis: voxel_dimensions' third number (1.5-3.3 mm) differs from the first two
    (1.95-5.4 mm, equal to each other in every patient);
  - axis 0 runs anterior -> posterior: the mandible's centroid lies at a smaller axis-0 index than the
    spinal cord's, and they share axis 1 (the midline);
  - axis 1 runs patient right -> left: RightParotid's centroid lies at a smaller axis-1 index than LeftParotid's;
  - axis 2 runs superior -> inferior: the brainstem lies at a smaller axis-2 index than the mandible.
    (Rows A->P and columns R->L are how a DICOM axial slice is stored.)
  The spacings hold in all 240 train and validation patients; the three centroid orders in each of the 25
  with all five structures among every 4th patient folder with a CT. Read back by data.py (RAS), the output
  of 4 validation patients has the mandible anterior of the cord, the right parotid at larger X and the
  brainstem above the mandible.
  Each volume is written in RAS order (X toward the patient's right, Y anterior, Z superior: axes 1, 0, 2, each
  reversed) with affine diag(in-plane, in-plane, slice mm), the grid's centre at the origin (the data carry no
  position). The HU offset was checked on the same patients: the median stored value is 1514-1990 inside the
  mandible (bone: 500-1000 HU), 1014-1206 inside the spinal cord (soft tissue, about 40 HU) and 935-1110 in
  the parotids (fatty gland, about -10 to 30 HU); outside the body nothing is stored: -1000 HU, air.

A patient is left out, and listed at the end with a count, when ct.csv or voxel_dimensions.csv is absent,
unreadable or damaged, or a chosen structure is absent or empty. Damaged: a CSV that does not end with a newline
(every OpenKBP file does: the file was cut off, e.g. during a copy), whose indices do not increase (the challenge
writes them sorted), a ct.csv that holds no voxels, or one that stores no CT value at more than AIR_MAX of a
structure's voxels (a real structure lies in the body: on the 203 patients with a CT at most 72 %, Esophagus of
pt_89; a CT cut off at a line end or of another patient). A repository snapshot may lack some large files (the
mirror used here lacked 37 of the 240 ct.csv files, 15 %): they are reported as absent. The test-pats split is
not converted unless named in --splits. --crop-body cuts each volume to the body's bounding box (the affine
moves with it); --max-cases N keeps the first N patients that qualify.

OUT must be new, empty, or this converter's own: it writes OUT/openkbp-convert.json (MANIFEST) before anything
else and refuses, touching nothing, a folder that holds other files. An OUT of this converter from before the
manifest (a dataset.json "converted by benchmarks/openkbp.py" and only imagesTr/ and labelsTr/ pt_N.nii.gz
files) is adopted: its cases have no record, so each is converted again. The manifest holds the options and,
per converted case, the size and mtime of each source file read (ct.csv, voxel_dimensions.csv, the structures'
CSVs):
    {"converter": "benchmarks/openkbp.py", "structures": "Mandible", "crop_body": true,
     "cases": {"pt_1": {"source": "train-pats/pt_1", "files": {"ct.csv": [size, mtime_ns], ...}}}}
Rerunning is safe: every file is written atomically (files.atomic_write). A case whose image and label exist and
whose source files are as recorded is kept; one whose source changed (repaired, copied again) is converted again,
and one now left out loses its earlier image and label. A rerun with other --structures or another --crop-body
is refused (its cases would mix two kinds): rerun with the recorded values, or choose a new OUT.
"""
import argparse
import io
import json
import re
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]   # the repository: the core modules, from any working folder
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

import data  # noqa: E402
import files  # noqa: E402
import folders  # noqa: E402

STRUCTURES = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
GRID_VOX = (128, 128, 128)   # every OpenKBP array (provided_code/data_shapes.py: patient_shape)
BODY_HU = -500               # --crop-body: the body is the largest 26-connected component above this (air: -1000)
HU_OFFSET = 1000             # stored value = HU + 1000 (checked on the data: see the module docstring)
AIR_MAX = 0.9                # a ct.csv storing nothing at more of a structure's voxels is damaged (real: <= 72 %)
MANIFEST = "openkbp-convert.json"   # written first into OUT: the converter's own folder, options, source stamps
CONVERTER = "benchmarks/openkbp.py"
OLD_DESCRIPTION = "converted by benchmarks/openkbp.py"   # dataset.json of an OUT written before the manifest
CASE_FILE = re.compile(r"pt_\d+\.nii\.gz")
PROGRESS_EVERY, PROGRESS_S = 20, 10.0   # a progress line every 20 patients or 10 s, and after the last


class Skip(Exception):
    """A patient left out, with the reason."""


def parse_structures(text: str) -> list[tuple[str, ...]]:
    """'Mandible,RightParotid+LeftParotid' -> [('Mandible',), ('RightParotid', 'LeftParotid')]: one class each."""
    classes = [tuple(s.strip() for s in part.split("+")) for part in text.split(",") if part.strip()]
    unknown = sorted({s for c in classes for s in c} - set(STRUCTURES))
    if not classes or unknown:
        raise SystemExit(f"--structures {text!r}: unknown {unknown or 'empty'}; choose from {', '.join(STRUCTURES)} "
                         "(comma between classes, + to merge structures into one class)")
    return classes


def structures_text(classes) -> str:
    """The --structures value of `classes`: 'Mandible,RightParotid+LeftParotid'."""
    return ",".join("+".join(names) for names in classes)


def find_patients(src: Path, splits: list[str]) -> list[Path]:
    """The patient folders provided-data/<split>/pt_N of SRC, in natural order; a clear error otherwise."""
    base = src / "provided-data"
    if not base.is_dir():
        raise SystemExit(f"{src}: not an OpenKBP folder: {base} is missing; pass a clone or unpacked archive of "
                         "https://github.com/ababier/open-kbp (provided-data/train-pats/pt_1/ct.csv, ...)")
    missing = [s for s in splits if not (base / s).is_dir()]
    if missing:
        found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise SystemExit(f"{src}: split {', '.join(str(base / s) for s in missing)} missing; {base} holds "
                         + (f"the splits {', '.join(found)}" if found else "no split folders") +
                         "; choose the splits to convert with --splits NAME[,NAME]"
                         + (f", e.g. --splits {','.join(found)}" if found else ""))
    patients = sorted((p for s in splits for p in (base / s).glob("pt_*") if p.is_dir()), key=lambda p: int(p.name[3:]))
    if not patients:
        raise SystemExit(f"{src}: not an OpenKBP folder: no pt_N patient folders under {base}/{{{','.join(splits)}}}")
    return patients


def quiet_loadtxt(source, **kwargs) -> np.ndarray:
    """np.loadtxt with its warnings (\"input contained no data\") raised as ValueError: the caller names the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        try:
            return np.loadtxt(source, **kwargs)
        except UserWarning as e:
            raise ValueError(str(e)) from None


def read_text(path: Path) -> str:
    """The text of an OpenKBP file; Skip when absent, unreadable, or cut off: every OpenKBP file ends with a
    newline (all 2,781 of the snapshot used here), so one of several lines that does not was cut short."""
    if not path.is_file():
        raise Skip(f"{path.name} absent")
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise Skip(f"{path.name} unreadable ({e})")
    if "\n" in text.strip() and not text.endswith("\n"):     # one line alone: a header, no data
        raise Skip(f"{path.name} cut off: it ends in {text.splitlines()[-1][-20:]!r} without a newline, as every "
                   "OpenKBP file does; copy it again from the source")
    return text


def read_sparse(path: Path, values: bool, grid_vox=GRID_VOX) -> tuple[np.ndarray, np.ndarray | None]:
    """(indices int64 (N,), values float32 (N,) or None) of an OpenKBP sparse CSV; Skip names a bad file. No
    rows after the header give empty arrays."""
    body = read_text(path).partition("\n")[2]
    try:
        table = (quiet_loadtxt(io.StringIO(body), delimiter=",", usecols=(0, 1) if values else (0,), ndmin=2,
                               dtype=np.float64) if body.strip() else np.zeros((0, 2)))
    except ValueError as e:
        raise Skip(f"{path.name} unreadable ({e})")
    indices = table[:, 0].astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= np.prod(grid_vox)):
        raise Skip(f"{path.name}: indices outside the {'x'.join(map(str, grid_vox))} grid")
    back = np.flatnonzero(np.diff(indices) <= 0)
    if back.size:       # the challenge writes the indices sorted: a file out of order was damaged
        raise Skip(f"{path.name}: index {indices[back[0] + 1]} on line {back[0] + 3} does not follow "
                   f"{indices[back[0]]}; the file is damaged, copy it again from the source")
    return indices, table[:, 1].astype(np.float32) if values else None


def to_ras(volume: np.ndarray) -> np.ndarray:
    """(A->P, R->L, S->I), the challenge's order, to RAS (X right, Y anterior, Z superior)."""
    return np.ascontiguousarray(volume.transpose(1, 0, 2)[::-1, ::-1, ::-1])


def affine_ras(voxel_mm, grid_vox=GRID_VOX) -> np.ndarray:
    """4x4 affine of a RAS-ordered grid: diag(in-plane, in-plane, slice mm), grid centre at the origin."""
    spacing = np.array([voxel_mm[1], voxel_mm[0], voxel_mm[2]], dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -spacing * (np.array(grid_vox) - 1) / 2
    return affine


def body_box(image_hu: np.ndarray, label: np.ndarray, margin_vox: int = 2) -> tuple[slice, ...]:
    """The bounding box (X, Y, Z slices) of the body (the largest component above BODY_HU) and of the label,
    widened by margin_vox: the 128^3 grid spans about 500 mm, a head and neck about half of that."""
    components, n = ndi.label(image_hu > BODY_HU, structure=np.ones((3, 3, 3), bool))
    keep = label > 0
    if n:
        keep |= components == np.bincount(components.ravel())[1:].argmax() + 1
    if not keep.any():
        return tuple(slice(0, s) for s in image_hu.shape)
    where = np.nonzero(keep)
    return tuple(slice(max(int(w.min()) - margin_vox, 0), min(int(w.max()) + margin_vox + 1, s))
                 for w, s in zip(where, image_hu.shape))


def crop(image_hu, label, affine, box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arrays cut to `box`, and the affine moved so that every voxel keeps its place in the world."""
    moved = affine.copy()
    moved[:3, 3] += affine[:3, :3] @ np.array([b.start for b in box], dtype=np.float64)
    return np.ascontiguousarray(image_hu[box]), np.ascontiguousarray(label[box]), moved


def read_voxel_mm(folder: Path) -> np.ndarray:
    """The three voxel sizes (mm) of voxel_dimensions.csv; Skip when absent, unreadable or not three numbers > 0."""
    text = read_text(folder / "voxel_dimensions.csv")
    try:
        voxel_mm = quiet_loadtxt(io.StringIO(text), ndmin=1)
    except ValueError as e:
        raise Skip(f"voxel_dimensions.csv unreadable ({e})")
    if voxel_mm.shape != (3,) or not (voxel_mm > 0).all():
        raise Skip(f"voxel_dimensions.csv: expected three numbers > 0, got {voxel_mm.tolist()}")
    return voxel_mm


def read_label(folder: Path, classes, grid_vox=GRID_VOX) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(label uint8, flat, challenge order; {structure: its indices}); Skip when a structure is absent or empty."""
    label, where = np.zeros(np.prod(grid_vox), np.uint8), {}
    for c, names in enumerate(classes, 1):
        for name in names:
            where[name], _ = read_sparse(folder / f"{name}.csv", False, grid_vox)
            if not where[name].size:
                raise Skip(f"{name}.csv empty")
            label[where[name]] = c
    return label, where


def read_ct(folder: Path, where: dict[str, np.ndarray], grid_vox=GRID_VOX) -> np.ndarray:
    """HU int16, flat, challenge order; Skip when ct.csv holds no voxels or stores nothing at most of a
    structure's voxels (`where`: {structure: indices}): a CT cut short, or another patient's."""
    indices, stored = read_sparse(folder / "ct.csv", True, grid_vox)
    if not indices.size:
        raise Skip("ct.csv holds no voxels (empty, or only its header); copy it again from the source")
    in_ct = np.zeros(np.prod(grid_vox), bool)
    in_ct[indices] = True
    for name, at in where.items():
        air = 1 - in_ct[at].mean()
        if air > AIR_MAX:
            raise Skip(f"ct.csv stores no CT value at {air:.0%} of {name}.csv's voxels (in air; a real structure "
                       "lies in the body): ct.csv is cut short or another patient's; copy it again from the source")
    hu = np.full(np.prod(grid_vox), -HU_OFFSET, np.float32)
    hu[indices] = stored - HU_OFFSET
    return np.clip(np.rint(hu), np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)


def convert_patient(folder: Path, classes, grid_vox=GRID_VOX) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image int16 HU (X, Y, Z), label uint8 (X, Y, Z), affine 4x4) in RAS on the 128^3 grid; Skip when a file
    lacks or is damaged, or a structure lacks."""
    voxel_mm = read_voxel_mm(folder)
    if not (folder / "ct.csv").is_file():
        raise Skip("ct.csv absent")
    label, where = read_label(folder, classes, grid_vox)
    hu = read_ct(folder, where, grid_vox)
    return to_ras(hu.reshape(grid_vox)), to_ras(label.reshape(grid_vox)), affine_ras(voxel_mm, grid_vox)


def dataset_json(out: Path, classes, cases: list[str]) -> dict:
    """The MSD dataset.json of the converted cases."""
    labels = {"0": "background", **{str(c): "+".join(names) for c, names in enumerate(classes, 1)}}
    return {"name": "OpenKBP_" + "_".join("".join(n) for n in classes), "modality": {"0": "CT"},
            "description": "OpenKBP head-and-neck CT (int16 HU) with clinical contours, converted by "
                           "benchmarks/openkbp.py", "reference": "https://github.com/ababier/open-kbp (MIT)",
            "tensorImageSize": "3D", "labels": labels, "numTraining": len(cases),
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
            "test": []}


def source_record(folder: Path, classes) -> dict:
    """What a case is made from: its folder under provided-data/ and [size, mtime_ns] (None: absent) of each file
    read. A copy, an edit or a repair changes them."""
    stamps = {}
    for name in ("ct.csv", "voxel_dimensions.csv", *(f"{n}.csv" for names in classes for n in names)):
        try:
            st = (folder / name).stat()
            stamps[name] = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamps[name] = None
    return {"source": f"{folder.parent.name}/{folder.name}", "files": stamps}


def manifest_problem(obj) -> str | None:
    """What is wrong with a manifest read from JSON, or None."""
    if not (isinstance(obj, dict) and isinstance(obj.get("structures"), str)
            and isinstance(obj.get("crop_body"), bool) and isinstance(obj.get("cases"), dict)):
        return "expected an object with 'structures' (text), 'crop_body' (true/false) and 'cases' (an object)"
    return None


def older_output(out: Path) -> bool:
    """Whether OUT was written by this converter before it wrote a manifest: a dataset.json described as
    converted here, and nothing else but imagesTr/ and labelsTr/ holding pt_N.nii.gz files."""
    try:
        info = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (isinstance(info, dict) and OLD_DESCRIPTION in str(info.get("description", ""))):
        return False
    if any(p.name not in ("dataset.json", "imagesTr", "labelsTr") and not files.OWN_TMP.fullmatch(p.name)
           for p in out.iterdir()):
        return False
    for sub in (out / "imagesTr", out / "labelsTr"):
        if sub.exists() and not (sub.is_dir() and all(
                CASE_FILE.fullmatch(p.name) or files.OWN_TMP.fullmatch(p.name) for p in sub.iterdir())):
            return False
    return True


def refuse_foreign(out: Path):
    """Stop, touching nothing, unless OUT is new, empty, or this converter's (its manifest, or older_output)."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"OUT {out}: is a file; give a folder for the converted data set")
    held = sorted(p.name + "/" * p.is_dir() for p in out.iterdir()) if out.is_dir() else []
    if held and not (out / MANIFEST).is_file() and not older_output(out):
        raise SystemExit(f"OUT {out}: holds {len(held)} file(s) or folder(s) ({files.few(held)}) and is not this "
                         f"converter's output (it has no {MANIFEST}); the converter writes only into a new or empty "
                         f"folder, or one it wrote, so that nothing there is overwritten. Choose a new OUT, e.g. "
                         f"{out / 'OpenKBP'}")


def check_options(path: Path, manifest: dict, classes, crop_body: bool):
    """A rerun keeps the recorded --structures and --crop-body: the converted cases were made with them."""
    old, new = manifest["structures"], structures_text(classes)
    if old != new:
        old_labels, new_labels = (dataset_json(path.parent, parse_structures(t), [])["labels"] for t in (old, new))
        raise SystemExit(f"{path}: written for labels {old_labels} (--structures {old}), not {new_labels} "
                         f"(--structures {new}); rerun with --structures {old}, or choose a new OUT")
    if manifest["crop_body"] != crop_body:
        was, asks = ("with" if on else "without" for on in (manifest["crop_body"], crop_body))
        raise SystemExit(f"{path}: --crop-body: OUT was converted {was} --crop-body, this run is {asks} "
                         f"--crop-body; its cases would mix cropped and whole 128^3 volumes. Rerun {was} "
                         "--crop-body, or choose a new OUT")


def open_out(out: Path, classes, crop_body: bool) -> dict:
    """The manifest of OUT after the OUT rule (refuse_foreign) and the option checks; a new one is written
    first into a new, empty or older OUT (whose cases, unrecorded, are all converted again)."""
    refuse_foreign(out)
    path = out / MANIFEST
    if path.is_file():
        try:
            manifest = files.read_json(path, manifest_problem, "it is this converter's record of OUT: choose a "
                                                                "new OUT, or delete this one and convert again")
        except files.ProxyAlError as e:
            raise SystemExit(str(e)) from None
        check_options(path, manifest, classes, crop_body)
        return manifest
    if (out / "dataset.json").is_file():       # an older output: its labels must be these
        old = folders.read_task_info(out)["labels"]
        new = {int(k): v for k, v in dataset_json(out, classes, [])["labels"].items()}
        if old != new:
            raise SystemExit(f"{out / 'dataset.json'}: written for labels {old}, not {new}; pick another OUT or "
                             "delete it")
    manifest = {"converter": CONVERTER, "structures": structures_text(classes), "crop_body": crop_body, "cases": {}}
    files.atomic_write_json(path, manifest)
    return manifest


def hms(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def convert_case(folder: Path, out: Path, classes, crop_body: bool, manifest: dict, grid_vox=GRID_VOX) -> bool:
    """Convert one patient into OUT, unless its image and label exist and its source is as the manifest records
    it; returns whether it was converted. Skip: it cannot be (its earlier image and label are then deleted)."""
    image, label = out / "imagesTr" / f"{folder.name}.nii.gz", out / "labelsTr" / f"{folder.name}.nii.gz"
    record = source_record(folder, classes)    # before reading: a file changed meanwhile is converted next time
    if image.is_file() and label.is_file() and manifest["cases"].get(folder.name) == record:
        return False
    if manifest["cases"].pop(folder.name, None) is not None:   # no record may vouch for files being replaced
        files.atomic_write_json(out / MANIFEST, manifest)
    try:
        hu, lab, affine = convert_patient(folder, classes, grid_vox)
    except Skip:
        image.unlink(missing_ok=True)        # an earlier conversion of a source that is not there any more
        label.unlink(missing_ok=True)
        raise
    if crop_body:
        hu, lab, affine = crop(hu, lab, affine, body_box(hu, lab))
    data.write_nifti(label, lab, affine)
    data.write_nifti(image, hu, affine)
    manifest["cases"][folder.name] = record
    files.atomic_write_json(out / MANIFEST, manifest)
    return True


def progress_line(i, n, done, new, skipped, elapsed, max_cases=0) -> str:
    """'[i/n] converted, new, left out; elapsed, ETA' (the ETA from the patients, or the cases still wanted)."""
    eta = elapsed / i * (n - i)
    if max_cases and done:
        eta = min(eta, elapsed / done * (max_cases - done))
    return (f"[{i}/{n}] {done} converted ({new} new), {skipped} left out; elapsed {hms(elapsed)}, "
            f"ETA {hms(eta)}")


def convert(src, out, classes, splits, max_cases=0, crop_body=False, log=print,
            grid_vox=GRID_VOX) -> tuple[list[str], dict[str, str]]:
    """Convert the patients of `splits` (the first max_cases that qualify, when > 0); returns (converted case
    ids, {left-out case: reason}). OUT and rerun rules: the module docstring."""
    src, out = Path(src), Path(out)
    patients = find_patients(src, splits)
    manifest = open_out(out, classes, crop_body)
    done, skipped, new, t0 = [], {}, 0, time.monotonic()
    shown = t0
    for i, folder in enumerate(patients, 1):
        try:
            new += convert_case(folder, out, classes, crop_body, manifest, grid_vox)
            done.append(folder.name)
        except Skip as e:
            skipped[folder.name] = str(e)
        last = i == len(patients) or (max_cases and len(done) == max_cases)
        if last or i % PROGRESS_EVERY == 0 or time.monotonic() - shown >= PROGRESS_S:
            shown = time.monotonic()
            log(progress_line(i, len(patients), len(done), new, len(skipped), shown - t0, max_cases))
        if last:
            break
    files.atomic_write_json(out / "dataset.json", dataset_json(out, classes, done))
    return done, skipped


def report(done, skipped, log=print):
    """The left-out patients, grouped by reason, and the counts."""
    by_reason = {}
    for case, reason in skipped.items():
        by_reason.setdefault(reason, []).append(case)
    for reason, cases in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        log(f"  left out, {reason}: {len(cases)} ({', '.join(cases)})")
    absent = sum(len(c) for r, c in by_reason.items() if r == "ct.csv absent")
    log(f"{len(done)} converted, {len(skipped)} left out" +
        (f" ({absent} because ct.csv is absent: a snapshot without large files lacks some)" if absent else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a clone or unpacked archive of github.com/ababier/open-kbp")
    parser.add_argument("out", help="the MSD-layout folder to write (imagesTr/, labelsTr/, dataset.json)")
    parser.add_argument("--structures", default="Mandible",
                        help="classes, comma-separated; A+B merges into one class (default Mandible; "
                             f"from {', '.join(STRUCTURES)})")
    parser.add_argument("--splits", default="train-pats,validation-pats",
                        help="folders under provided-data/ (default train-pats,validation-pats; test-pats is kept "
                             "back for independent checks)")
    parser.add_argument("--max-cases", type=int, default=0,
                        help="convert only the first N patients that qualify (natural order); 0: all")
    parser.add_argument("--crop-body", action="store_true",
                        help="cut each volume to the body's bounding box (and the label's), 2 voxels around it: "
                             "about a third of the voxels, for a study on a CPU")
    args = parser.parse_args(argv)
    classes = parse_structures(args.structures)
    t0 = time.time()
    done, skipped = convert(args.src, args.out, classes, [s.strip() for s in args.splits.split(",") if s.strip()],
                            args.max_cases, args.crop_body)
    report(done, skipped)
    print(f"wrote {Path(args.out) / 'dataset.json'} in {hms(time.time() - t0)}")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
