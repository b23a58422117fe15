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

A patient whose ct.csv or voxel_dimensions.csv is absent or unreadable, or who lacks a chosen structure
(absent or empty file), is left out and listed at the end with a count. A repository snapshot may lack some
large files (the mirror used here lacked 37 of the 240 ct.csv files, 15 %): they are reported as absent.
Rerunning is safe: every file is written atomically (files.atomic_write) and a case whose image and label exist
is skipped. The test-pats split is not converted unless named in --splits. --crop-body cuts each volume to
the body's bounding box (the affine moves with it); --max-cases N keeps the first N patients that qualify.
"""
import argparse
import sys
import time
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


def find_patients(src: Path, splits: list[str]) -> list[Path]:
    """The patient folders provided-data/<split>/pt_N of SRC, in natural order; a clear error otherwise."""
    base = src / "provided-data"
    if not base.is_dir():
        raise SystemExit(f"{src}: not an OpenKBP folder: {base} is missing; pass a clone or unpacked archive of "
                         "https://github.com/ababier/open-kbp (provided-data/train-pats/pt_1/ct.csv, ...)")
    missing = [s for s in splits if not (base / s).is_dir()]
    if missing:
        raise SystemExit(f"{src}: not an OpenKBP folder: {', '.join(str(base / s) for s in missing)} missing")
    patients = sorted((p for s in splits for p in (base / s).glob("pt_*") if p.is_dir()), key=lambda p: int(p.name[3:]))
    if not patients:
        raise SystemExit(f"{src}: not an OpenKBP folder: no pt_N patient folders under {base}/{{{','.join(splits)}}}")
    return patients


def read_sparse(path: Path, values: bool, grid_vox=GRID_VOX) -> tuple[np.ndarray, np.ndarray | None]:
    """(indices int64 (N,), values float32 (N,) or None) of an OpenKBP sparse CSV; Skip names a bad file."""
    if not path.is_file():
        raise Skip(f"{path.name} absent")
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1) if values else (0,), ndmin=2,
                           dtype=np.float64)
    except (ValueError, OSError) as e:
        raise Skip(f"{path.name} unreadable ({e})")
    indices = table[:, 0].astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= np.prod(grid_vox)):
        raise Skip(f"{path.name}: indices outside the {'x'.join(map(str, grid_vox))} grid")
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


def convert_patient(folder: Path, classes, grid_vox=GRID_VOX) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image int16 HU (X, Y, Z), label uint8 (X, Y, Z), affine 4x4) in RAS on the 128^3 grid; Skip when a file
    or a structure lacks."""
    try:
        voxel_mm = np.loadtxt(folder / "voxel_dimensions.csv", ndmin=1)
    except (ValueError, OSError) as e:
        raise Skip(f"voxel_dimensions.csv absent or unreadable ({type(e).__name__})")
    if voxel_mm.shape != (3,) or not (voxel_mm > 0).all():
        raise Skip(f"voxel_dimensions.csv: expected three numbers > 0, got {voxel_mm.tolist()}")
    if not (folder / "ct.csv").is_file():
        raise Skip("ct.csv absent")
    label = np.zeros(np.prod(grid_vox), np.uint8)
    for c, names in enumerate(classes, 1):
        for name in names:
            indices, _ = read_sparse(folder / f"{name}.csv", False, grid_vox)
            if not indices.size:
                raise Skip(f"{name}.csv empty")
            label[indices] = c
    indices, stored = read_sparse(folder / "ct.csv", True, grid_vox)
    hu = np.full(np.prod(grid_vox), -HU_OFFSET, np.float32)
    hu[indices] = stored - HU_OFFSET
    hu = np.clip(np.rint(hu), np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
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


def check_out(out: Path, classes):
    """Refuse an OUT written with other structures: its finished cases would be skipped with the wrong labels."""
    path = out / "dataset.json"
    if path.is_file():
        old = folders.read_task_info(out)["labels"]
        new = {int(k): v for k, v in dataset_json(out, classes, [])["labels"].items()}
        if old != new:
            raise SystemExit(f"{path}: written for labels {old}, not {new}; pick another OUT or delete it")


def hms(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def convert(src, out, classes, splits, max_cases=0, crop_body=False, log=print,
            grid_vox=GRID_VOX) -> tuple[list[str], dict[str, str]]:
    """Convert the patients of `splits` (the first max_cases that qualify, when > 0); returns (converted case
    ids, {left-out case: reason})."""
    src, out = Path(src), Path(out)
    patients = find_patients(src, splits)
    check_out(out, classes)
    done, skipped, t0, new = [], {}, time.time(), 0
    for i, folder in enumerate(patients, 1):
        if max_cases and len(done) == max_cases:
            break
        image, label = out / "imagesTr" / f"{folder.name}.nii.gz", out / "labelsTr" / f"{folder.name}.nii.gz"
        if image.is_file() and label.is_file():
            done.append(folder.name)                  # finished by an earlier run (written atomically)
        else:
            try:
                hu, lab, affine = convert_patient(folder, classes, grid_vox)
                if crop_body:
                    hu, lab, affine = crop(hu, lab, affine, body_box(hu, lab))
                data.write_nifti(label, lab, affine)
                data.write_nifti(image, hu, affine)   # the image last: its presence marks the case finished
                done.append(folder.name)
                new += 1
            except Skip as e:
                skipped[folder.name] = str(e)
        if i % 20 == 0 or i == len(patients) or len(done) == max_cases:
            elapsed = time.time() - t0
            log(f"[{i}/{len(patients)}] {len(done)} converted ({new} new), {len(skipped)} left out; "
                f"elapsed {hms(elapsed)}, ETA {hms(elapsed / i * (len(patients) - i))}")
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
