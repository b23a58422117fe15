"""Hand an active-learning selection to nnU-Net v2: the cases a run has labeled (or those one iteration trained
on) become an nnU-Net raw dataset (imagesTr/, labelsTr/, dataset.json) with the run's validation cases as fold 0's
validation split (splits_final.json), ready for `nnUNetv2_plan_and_preprocess` and `nnUNetv2_train`.
A run of boxes (--query patch) gives partial labels: a case's label file inside its boxes and nnU-Net's ignore
label (dataset.json "labels": {"ignore": C}, C = the number of classes) everywhere else.

Reading nnU-Net raw datasets is folders.read_msd's job; this module only writes them. Images and whole labels
are the original files, hard-linked where the file system allows (nothing here edits a file in place: writers
replace files, so a link never sees a change made through the other name); partial labels are new files.
"""
import gzip
import os
import re
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

import data
from annotate import ASKED, box_mask
from files import atomic_write_json, read_json

# nnU-Net's raw layout: one input channel as <case>_0000<ending>, the label as <case><ending>.
FILE_ENDING = ".nii.gz"
# "CT" makes nnU-Net use its CT normalisation (clip to the foreground's 0.5-99.5 percentiles, z-score).
CHANNEL_NAMES = {"0": "CT"}
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # Dataset<id>_<name> must stay a plain folder name


# ----------------------------------------------------------------------------------------------------------
# 1. Which cases: a run's training set at one iteration.


def _pick(kinds, choices, wanted, option):
    """The one of `choices` the user meant: `wanted`, or the only choice. kinds: 'seeds' / 'strategies'."""
    if wanted is None:
        if len(choices) == 1:
            return choices[0]
        raise ValueError(f"the run has {len(choices)} {kinds} {choices}; choose one with {option}")
    if str(wanted) not in choices:
        raise ValueError(f"{option} {wanted}: not in the run; its {kinds} are {choices}")
    return str(wanted)


def _seed_order(seed):
    """Sort key for seed keys: numbers by value, then any others by name."""
    return (0, int(seed), "") if seed.isdigit() else (1, 0, seed)


def selection(states: dict, strategy: str | None = None, seed: int | str | None = None,
              iteration: int | None = None) -> tuple[str, int, int, list[str]]:
    """The cases the supervised model Ms of one strategy, seed and iteration was trained on.

    states: {seed_str: {strategy: state.RunState}}, as run_folder.read_states returns. iteration counts from 1;
    iteration j trained on the first n_labeled of Tl (record j). Defaults: the run's only seed, its only
    strategy, the last finished iteration. Returns (strategy, seed, iteration, the units in the order labeled).
    """
    if not states:
        raise ValueError("the run has no state yet; run al_loop.py first")
    seed = _pick("seeds", sorted(states, key=_seed_order), seed, "--seed")
    strategy = _pick("strategies", sorted(states[seed]), strategy, "--strategy")
    st = states[seed][strategy]
    records = st.iterations
    if not records:
        raise ValueError(f"strategy {strategy} seed {seed}: no finished iteration yet; nothing was trained")
    j = len(records) if iteration is None else int(iteration)
    if not 1 <= j <= len(records):
        raise ValueError(f"--iteration {iteration}: strategy {strategy} seed {seed} has finished iterations "
                         f"1..{len(records)}")
    n_labeled = records[j - 1].n_labeled
    if n_labeled > len(st.labeled):
        raise ValueError(f"strategy {strategy} seed {seed}: iteration {j} trained on {n_labeled} cases but the "
                         f"state lists {len(st.labeled)}; the state file is damaged (--rebuild-state)")
    return strategy, int(seed) if seed.isdigit() else seed, j, list(st.labeled[:n_labeled])


# ----------------------------------------------------------------------------------------------------------
# 2. Partial labels: boxes of the training grid on a label file's own grid.


def _stored_label(path, classes) -> np.ndarray:
    """A label file's voxels (X, Y, Z) uint8 in its own axis order (data.py's readers give RAS), checked to be
    class numbers 0..classes-1 (ValueError naming the file otherwise)."""
    try:
        values = np.asanyarray(nib.load(str(path)).dataobj)        # scaled by the header's slope, if any
    except Exception as e:  # nibabel raises several types for a damaged header, a truncated gzip, a short file
        raise ValueError(f"{path}: cannot read the label's voxels ({e}); restore the file") from e
    values = values.reshape(values.shape[:3])
    lo, hi = values.min(), values.max()
    if lo < 0 or hi >= classes or (values.dtype.kind == "f" and not np.array_equal(values, np.rint(values))):
        raise ValueError(f"{path}: label values span {lo}..{hi}; a label holds the class numbers 0..{classes - 1} "
                         "of dataset.json: fix the file")
    return values.astype(np.uint8)


def write_partial_label(cases, cid, boxes, ignore, target) -> bool:
    """target: the label file of case cid with `ignore` at every voxel outside `boxes` (Cases.box_mask's (start, size)
    on its training grid), on the file's own grid with its affine, uint8, written atomically. cases: cases.Cases.
    Returns whether any voxel is `ignore`."""
    image, label = cases.files[cid]["image"], cases.files[cid]["label"]
    data.check_same_grid(image, label)                  # the boxes were drawn on the image's grid
    inside = box_mask(cases, cid, boxes, onto=label, numbered=False) > 0
    partial = np.where(inside, _stored_label(label, ignore), np.uint8(ignore))
    data.write_nifti(target, partial, data.nifti_affine(label))
    return not inside.all()


# ----------------------------------------------------------------------------------------------------------
# 3. Writing the dataset folder.


def _place(source, target):
    """Put the NIfTI `source` at `target` (.nii.gz): a hard link, else a copy; a .nii source is gzipped
    byte for byte, so header, voxels and affine are those of the original."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not str(source).endswith(".gz"):
        with open(source, "rb") as f, gzip.open(target, "wb", compresslevel=6) as out:
            shutil.copyfileobj(f, out, 1 << 20)
        return
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed there
        shutil.copyfile(source, target)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """'Dataset501_Liver' for (501, 'Liver'); nnU-Net numbers datasets 1..999 and finds them by that number."""
    if not (re.fullmatch(r"\d{1,3}", str(dataset_id)) and 1 <= int(dataset_id) <= 999):
        raise ValueError(f"--export-nnunet {dataset_id}: an nnU-Net dataset id is a number 1..999")
    number = int(dataset_id)
    if not DATASET_NAME.fullmatch(str(name)):
        raise ValueError(f"dataset name {name!r}: use letters, digits, '_' and '-' (e.g. Liver)")
    return f"Dataset{number:03d}_{name}"


def _out_root(out_root):
    """The nnU-Net raw folder: `out_root`, else $nnUNet_raw."""
    out_root = out_root or os.environ.get("nnUNet_raw")
    if not out_root:
        raise ValueError("no folder for the nnU-Net dataset: set $nnUNet_raw (nnU-Net's raw data folder) "
                         "or pass out_root")
    return Path(out_root)


def _check_target(folder, overwrite):
    """Refuse an existing dataset folder unless overwrite, and a dataset id that nnU-Net already knows by
    another name in any of its folders (nnU-Net then cannot tell which one is meant)."""
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder}: exists already; choose another dataset id, or pass --overwrite "
                              "(overwrite=True) to replace it")
    prefix = folder.name.split("_")[0] + "_"  # Dataset501_
    roots = [folder.parent] + [Path(os.environ[v]) for v in ("nnUNet_preprocessed", "nnUNet_results")
                               if os.environ.get(v)]
    taken = sorted(str(p) for r in roots if r.is_dir() for p in r.glob(prefix + "*")
                   if p.is_dir() and p.name != folder.name)
    if taken:
        raise FileExistsError(f"dataset id {int(prefix[7:10])} is taken by {taken}; nnU-Net finds datasets by id, "
                              "so choose another id or remove those folders")


def _check_cases(cases, train_ids, val_ids):
    """Every exported case is known and labeled, training and validation do not overlap."""
    unknown = [c for c in train_ids + val_ids if c not in cases]
    unlabeled = [c for c in train_ids + val_ids if c in cases and not cases[c].get("label")]
    both = sorted(set(train_ids) & set(val_ids))
    if unknown:
        raise ValueError(f"cases {unknown} are not in the data folder; export from the data the run used (--data)")
    if unlabeled:
        raise ValueError(f"cases {unlabeled} have no label file yet; annotate them (labelsTr/) before exporting")
    if both:
        raise ValueError(f"cases {both} are in both the training and the validation split")
    if not train_ids:
        raise ValueError("no training cases to export")


def _dataset_json(labels, n_training, name, provenance, partial=False):
    """nnU-Net v2 dataset.json: labels name -> int, label 0 named 'background' as nnU-Net requires. partial: some
    labels may get the ignore label, whose name no class may have."""
    by_name = {("background" if k == 0 else str(v)): int(k) for k, v in sorted(labels.items())}
    if len(by_name) != len(labels) or sorted(labels) != list(range(len(labels))):
        raise ValueError(f"labels {labels}: need classes 0..C-1 with distinct names")
    if partial and "ignore" in by_name:
        raise ValueError(f"labels {labels}: class {by_name['ignore']} is named 'ignore', nnU-Net's name for the "
                         "unannotated voxels of partial labels; rename the class in the data folder's dataset.json")
    info = {"name": name, "channel_names": CHANNEL_NAMES, "labels": by_name, "numTraining": n_training,
            "file_ending": FILE_ENDING}
    return {**info, "proxy_al": provenance} if provenance else info


def preprocessed_splits_path(folder_name: str) -> Path | None:
    """$nnUNet_preprocessed/<folder_name>/splits_final.json, where nnUNetv2_train reads the folds; None if unset."""
    root = os.environ.get("nnUNet_preprocessed")
    return Path(root) / folder_name / "splits_final.json" if root else None


def export_dataset(cases: dict | list, train_ids: list[str], val_ids: list[str], labels: dict, dataset_id: int,
                   name: str, out_root: str | Path | None = None, overwrite: bool = False,
                   provenance: dict | None = None, boxes: dict | None = None, grids=None) -> Path:
    """Write the nnU-Net v2 raw dataset out_root/Dataset<id:03d>_<name>/ and return its path.

    cases: {id: {"image", "label"}} or read_msd's list; train_ids / val_ids: fold 0 of splits_final.json
    (also written to $nnUNet_preprocessed/<folder>/ when that is set); labels: {int: name}; out_root:
    default $nnUNet_raw. Images go to imagesTr/<case>_0000.nii.gz, labels to labelsTr/<case>.nii.gz.
    boxes: {training case: [(start, size)]} of the cases annotated only inside boxes of their training grids
    (grids: the run's cases.Cases): their labels are partial (write_partial_label), and dataset.json names
    the ignore label when one holds it. The folder is built under a temporary name and renamed when complete.
    """
    cases = {c["id"]: c for c in cases} if isinstance(cases, list) else cases
    train_ids, val_ids, boxes = list(train_ids), list(val_ids), boxes or {}
    folder_name = dataset_folder_name(dataset_id, name)
    out_root = _out_root(out_root)
    folder = out_root / folder_name
    _check_target(folder, overwrite)
    _check_cases(cases, train_ids, val_ids)
    info = _dataset_json(labels, len(train_ids) + len(val_ids), name, provenance, partial=bool(boxes))
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.", dir=out_root))
    try:
        for cid in train_ids + val_ids:
            _place(cases[cid]["image"], tmp / "imagesTr" / f"{cid}_0000{FILE_ENDING}")
            target = tmp / "labelsTr" / f"{cid}{FILE_ENDING}"
            if cid not in boxes:
                _place(cases[cid]["label"], target)
            elif write_partial_label(grids, cid, boxes[cid], len(labels), target):
                info["labels"]["ignore"] = len(labels)          # nnU-Net: the highest label value
        atomic_write_json(tmp / "dataset.json", info)
        atomic_write_json(tmp / "splits_final.json", [{"train": train_ids, "val": val_ids}])
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left over when something failed
    splits = preprocessed_splits_path(folder_name)
    if splits:  # nnU-Net keeps an existing one there, so a re-export must replace it
        atomic_write_json(splits, [{"train": train_ids, "val": val_ids}])
    return folder


# ----------------------------------------------------------------------------------------------------------
# 4. The run's export action: selection + dataset + what to type next.


def labeled_after(st, train_ids: list, has_label) -> tuple[list, list]:
    """The units a state acquired after the training set train_ids (its 'labeled' beyond them: in annotation mode
    the last iteration asks for k more), split into (those labeled now, those still waiting) by has_label(unit)."""
    later = st.labeled[len(train_ids):]
    return [u for u in later if has_label(u)], [u for u in later if not has_label(u)]


def labeled_now(run_dir, cases: dict, queries=None):
    """has_label(unit) for labeled_after: its case has a label file. In annotation mode with boxes a box also
    needs the run's confirmation that it is labeled (to_annotate/asked.json "done", annotate.AskedBoxes, written
    by the rerun after the annotator saved it): the case's file holds its boxes labeled before as well."""
    has_file = lambda u: bool(cases.get(u.case, {}).get("label"))
    if queries is None or not queries.patch or not queries.cases.annotation:   # every label file holds it all
        return has_file
    done = confirmed_boxes(run_dir)
    return lambda u: has_file(u) and (u.whole or str(u) in done)


def confirmed_boxes(run_dir) -> set[str]:
    """The boxes an annotation run has confirmed labeled: "done" in its to_annotate/asked.json (none without one)."""
    path = Path(run_dir) / ASKED
    if not path.exists():
        return set()
    asked = read_json(path, lambda a: None if isinstance(a, dict) and isinstance(a.get("boxes", {}), dict) else
                      "not a JSON object of boxes", "rerun the run's command (it asks for the boxes again), then "
                      "export")
    return {u for u, entry in asked.get("boxes", {}).items() if isinstance(entry, dict) and entry.get("done")}


def training_cases(units: list, queries=None) -> tuple[list[str], dict]:
    """(the case ids of `units` in the order first labeled, {case: [(start, size)]} of those labeled only in
    boxes, on their training grids). A case labeled whole (a Volume, e.g. annotation mode's given cases) keeps its
    whole label. Volume mode: the units' cases, no boxes."""
    ids, whole = list(dict.fromkeys(u.case for u in units)), {u.case for u in units if u.whole}
    return ids, queries.boxes([u for u in units if u.case not in whole]) if queries is not None else {}


def export_run(run_dir: str | Path, cases: dict | list, states: dict, split: dict, labels: dict, dataset_id: int,
               name: str, out_root: str | Path | None = None, strategy: str | None = None,
               seed: int | str | None = None, iteration: int | None = None, overwrite: bool = False,
               log=print, queries=None) -> Path:
    """Export one (strategy, seed) of the run in run_dir with the run's validation cases (split.json "val") as
    fold 0's validation split. By default the training cases are every labeled case of the run: the training
    set of its last finished iteration and the cases acquired after it that have a label file now (annotation
    mode's last round); with `iteration`, the training set of that iteration. queries: the run's
    queries.Queries, needed for --query patch: its boxes become partial labels. Returns the dataset folder."""
    cases = {c["id"]: c for c in cases} if isinstance(cases, list) else cases
    strategy, seed, j, train_ids = selection(states, strategy, seed, iteration)
    later, waiting = labeled_after(states[str(seed)][strategy], train_ids, labeled_now(run_dir, cases, queries)) \
        if iteration is None else ([], [])
    outside = [str(u) for u in train_ids + later if u.case not in split["pool"]]
    if outside:
        raise ValueError(f"{Path(run_dir) / 'split.json'}: cases {outside} of the run state are not in its pool; "
                         "the state and split.json are from different runs")
    provenance = {"run": str(Path(run_dir).resolve()), "strategy": strategy, "seed": seed, "iteration": j}
    if iteration is None:
        provenance["labeled_after_iteration"] = list(map(str, later))
    ids, boxes = training_cases(train_ids + later, queries)
    folder = export_dataset(cases, ids, list(split["val"]), labels, dataset_id, name, out_root, overwrite,
                            provenance, boxes, queries.cases if boxes else None)
    what = f"iteration {j}" if iteration is not None else \
        f"every labeled {'box or ' * bool(boxes)}case: the {len(train_ids)} of iteration {j} and {len(later)} " \
        "labeled after it"
    log(f"{folder}: {len(ids)} training + {len(split['val'])} validation cases ({strategy}, seed {seed}, {what})")
    state_file = Path(run_dir) / "state" / f"seed{seed}_{strategy}.json"
    log(f"training {'boxes and ' * bool(boxes)}cases: {', '.join(map(str, train_ids))} (trained on at iteration "
        f"{j}, {state_file})" + (f"; {', '.join(map(str, later))} (acquired after iteration {j}, labels from "
                                 f"{', '.join(sorted({str(Path(cases[u.case]['label']).parent) for u in later}))})"
                                 if later else ""))
    _log_rest(log, folder, cases, j, waiting, boxes, len(labels), bool(queries and queries.patch))
    return folder


def _log_rest(log, folder, cases, j, waiting, boxes, ignore, patch):
    """export_run's last lines: the partial labels (boxes, the ignore value), the units acquired after iteration j
    not exported (waiting; boxes when `patch`), where splits_final.json is, and the nnU-Net commands to type next."""
    if boxes:
        log(f"partial labels: {sum(map(len, boxes.values()))} boxes in {len(boxes)} cases ({', '.join(boxes)}), "
            f"nnU-Net's ignore label {ignore} outside them; every other case's label is whole")
    if waiting and patch:
        log(f"not exported: {', '.join(map(str, waiting))} (acquired after iteration {j}, not confirmed labeled: "
            f"{_few_paths(cases, waiting)}); label them, rerun the run's command (it confirms them), and export again")
    elif waiting:
        log(f"not exported: {', '.join(map(str, waiting))} (acquired after iteration {j}, no label file yet: "
            f"{_few_paths(cases, waiting)}); label them and export again")
    number = int(folder.name[7:10])                     # Dataset501_Liver
    splits = preprocessed_splits_path(folder.name)
    log(f"splits_final.json (fold 0 = the run's split): {splits}" if splits else
        f"splits_final.json is in {folder}; nnUNetv2_plan_and_preprocess copies it to "
        f"$nnUNet_preprocessed/{folder.name}/ (if your nnU-Net does not, copy it there before training)")
    log(f"next: nnUNetv2_plan_and_preprocess -d {number} --verify_dataset_integrity && "
        f"nnUNetv2_train {number} 3d_fullres 0")


def _few_paths(cases, units, n=3):
    """Where the cases of the first n of `units` get their labels (label_to), for messages."""
    paths = list(dict.fromkeys(cases[u.case].get("label_to") or u.case for u in units if u.case in cases))
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")
