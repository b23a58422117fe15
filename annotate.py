"""The annotator's side: for the cases selected for annotation, a pre-segmentation to correct and an
uncertainty map, both on the scan's own grid (its shape and affine), and to_annotate.csv listing them.
With --query patch, to_annotate.csv lists boxes, and a mask per case marks them on the scan's grid.
--save-maps writes the uncertainty maps of the top-ranked cases of each scoring the same way.
"""
import os
import warnings

import numpy as np
import torch

import data
import files
from proxy_al import mc_scores, sliding_window_predict
from regions import unit_case
from report import write_csv
from run_folder import ASKED
from keys import stage_seed
from study import NeedLabels


def require_labels(study, state, seed, strategy):
    """Annotation mode: stop with to_annotate.csv until every selected case has a label in labelsTr/. Each
    selected case gets a pre-segmentation to correct and an uncertainty map, from the model that selected it."""
    if study.queries.patch:                 # simulated (every label there): the boxes' labels are read as needed
        return require_box_labels(study, state, seed, strategy) if study.cases.annotation else None
    pending = [c for c in state.labeled if not study.cases.files[unit_case(c)]["label"]]
    if not pending:
        return
    folder = study.out / "to_annotate"
    missing = [c for c in pending if not (folder / f"{c}_pred.nii.gz").exists()]
    model = selecting_model(study, state, seed, strategy) if missing else None
    for cid in missing if model else ():
        write_maps(study, model, cid, folder)
    found = lambda c, kind: str(folder / f"{c}_{kind}.nii.gz") if (folder / f"{c}_{kind}.nii.gz").exists() else ""
    rank = lambda c: state.labeled.index(c) - len(state.given) + 1       # among the selected cases
    rows = [(c, study.cases.files[c]["image"], f"{state.scores[c]:.6g}", rank(c), found(c, "pred"),
             found(c, "uncertainty"), study.cases.files[c]["label_to"]) for c in pending]
    write_csv(study.out / "to_annotate.csv", ["case", "image", "score", "rank", "prediction", "uncertainty",
                                              "save_label_as"], rows)
    raise NeedLabels(f"{len(pending)} case(s) need labels: see {study.out / 'to_annotate.csv'}.\n"
                     f"Open each scan with its pre-segmentation and uncertainty map from {folder} (on the scan's "
                     f"grid), correct it, save it as labelsTr/<case>{_ending(study.cases.files[pending[0]]['label_to'])} in "
                     f"{study.cases.root}, and rerun the same command (to_annotate.csv: save_label_as).")


def _ending(path):
    return ".nii.gz" if path.endswith(".nii.gz") else ".nii"


def selecting_model(study, state, seed, strategy):
    """The model whose scores made the last selection: the proxy for line 5 (its class 1, foreground),
    else the last iteration's Msemi or Ms. None for a random first pool (no model has seen the data yet)."""
    if not state.iterations:
        return study.proxy(seed).eval() if strategy.proxy else None
    return study.final_model(seed, strategy, len(state.iterations) - 1, state.iterations[-1])


def save_maps(study, model, scores, name):
    """MC variance maps of the --save-maps cases of highest variance, as NIfTI on each scan's own grid (its
    shape and affine): they overlay the scan in ITK-SNAP or 3D Slicer."""
    folder = study.out / "maps" / name.replace("/", "_")   # name: a stage's key
    ids = sorted(scores, key=lambda c: -scores[c]["variance"])[:study.cfg.save_maps]
    for cid in ids:
        write_maps(study, model, cid, folder, prediction=False)
    study.log(f"uncertainty maps of {len(ids)} top-ranked case(s) -> {folder}")


def write_maps(study, model, cid, folder, prediction=True):
    """<case>_uncertainty.nii.gz (per-voxel MC variance, float32) and with `prediction` <case>_pred.nii.gz
    (the model's segmentation, uint8 class values of dataset.json), on the image file's own grid."""
    cfg, image, path = study.cfg, study.cases.image(cid), study.cases.files[cid]["image"]
    torch.manual_seed(stage_seed(folder.name, cid, "map"))
    var = mc_scores(model, image, cfg.mc_passes, cfg.roi_vox, cfg.overlap, return_map=True,
                    variance_classes=cfg.variance_classes)["variance_map"]
    var = study.cases.uncrop(cid, var)                                  # the body box back on the scan's grid
    data.write_native(folder / f"{cid}_uncertainty.nii.gz", var, path, cfg.spacing_mm, nearest=False)
    if prediction:
        seg = sliding_window_predict(model, image, cfg.roi_vox, cfg.overlap).argmax(0).astype(np.uint8)
        seg = study.cases.uncrop(cid, seg)                              # background outside the body box
        data.write_native(folder / f"{cid}_pred.nii.gz", seg, path, cfg.spacing_mm, nearest=True)


def stamp(path):
    """(mtime_ns, size) of a label file, or None while there is none: a box is labeled once its case's label
    file differs from what it was when the box was asked for."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_mtime_ns, st.st_size]


def require_box_labels(study, state, seed, strategy):
    """Annotation mode with boxes (--query patch): stop with to_annotate.csv, one row per box still to label,
    until each box's case has a label file saved after the box was asked for. The file is read only inside
    the boxes asked for (Queries.volumes); labels outside them are ignored, with a warning giving the count.
    to_annotate/asked.json remembers each box's label file stamp when asked, and the round of each case's maps."""
    cases, folder = study.cases, study.out / "to_annotate"
    path = study.out / ASKED
    asked = files.read_json(path, lambda a: None if isinstance(a, dict) else "not a JSON object",
                            "delete it to ask for the pending boxes again") if path.exists() else {}
    boxes, maps = asked.setdefault("boxes", {}), asked.setdefault("maps", {})
    units = [u for u in state.labeled if u not in state.given]
    pending, done = [], []
    for u in units:
        now = stamp(cases.files[unit_case(u)]["label_to"])
        entry = boxes.setdefault(u, {"stamp": now, "done": False, "round": len(state.iterations)})
        if not entry["done"] and now is not None and now != entry["stamp"] and cases.files[unit_case(u)]["label"]:
            entry["done"] = True
            done.append(u)
        if not entry["done"]:
            pending.append(u)
    for cid in dict.fromkeys(map(unit_case, done)):
        warn_outside(study, cid, [u for u in units if unit_case(u) == cid and boxes[u]["done"]])
    if not pending:
        if done:
            files.atomic_write_json(path, asked)
        return
    by_case = study.queries.boxes(pending)
    stale = [c for c in by_case if maps.get(c) != len(state.iterations) or not (folder / f"{c}_pred.nii.gz").exists()]
    model = selecting_model(study, state, seed, strategy) if stale else None
    rows = []
    for cid, cid_boxes in by_case.items():
        if model is not None and cid in stale:
            write_maps(study, model, cid, folder)
            maps[cid] = len(state.iterations)
        ours = [u for u in pending if unit_case(u) == cid]
        native, affine = write_box_mask(study, cid, cid_boxes, folder / f"{cid}_boxes.nii.gz")
        for number, u in enumerate(ours, 1):
            where = np.nonzero(native == number)
            first, last = [int(a.min()) for a in where], [int(a.max()) for a in where]
            mm = lambda v: ",".join(f"{x:.1f}" for x in (affine @ [*v, 1])[:3])
            rows.append((cid, number, ",".join(f"{a}-{b}" for a, b in zip(first, last)), mm(first), mm(last),
                         f"{state.scores[u]:.6g}", units.index(u) + 1, str(folder / f"{cid}_boxes.nii.gz"),
                         str(folder / f"{cid}_pred.nii.gz"), str(folder / f"{cid}_uncertainty.nii.gz"),
                         cases.files[cid]["label_to"]))
    write_csv(study.out / "to_annotate.csv", ["case", "box", "voxels_ijk", "first_voxel_mm", "last_voxel_mm", "score",
                                              "rank", "boxes_mask", "prediction", "uncertainty", "save_label_as"], rows)
    files.atomic_write_json(path, asked)
    raise NeedLabels(f"{len(pending)} box(es) in {len(by_case)} case(s) need labels: see {study.out / 'to_annotate.csv'}.\n"
                     f"Open each scan with its boxes mask (box n has value n), pre-segmentation and uncertainty map "
                     f"from {folder} (on the scan's grid), label the voxels inside each box (only the boxes are "
                     f"read), save the case's label as labelsTr/<case>{_ending(cases.files[unit_case(pending[0])]['label_to'])} "
                     f"in {cases.root} (keeping any boxes labeled before), and rerun the same command "
                     "(to_annotate.csv: voxels_ijk are the file's voxel indices, first to last; *_mm their "
                     "world coordinates from its affine).")


def write_box_mask(study, cid, boxes, path):
    """<case>_boxes.nii.gz on the scan's own grid, box n (of `boxes`, (start, size) on image(cid)) with value n.
    Returns the mask as written (file's axis order) and the file's affine."""
    cases = study.cases
    mask = np.zeros(cases.image_hu(cid).shape, np.uint8)
    for number, (start, size) in enumerate(boxes, 1):
        mask[tuple(slice(a, a + b) for a, b in zip(start, size))] = number
    native = data.to_native_grid(cases.uncrop(cid, mask), cases.files[cid]["image"], study.cfg.spacing_mm, nearest=True)
    affine = data.nifti_affine(cases.files[cid]["image"])
    data.write_nifti(path, native, affine)
    return native, affine


def warn_outside(study, cid, units):
    """Warn once a label file arrives: its labeled voxels outside the boxes asked for are not read."""
    label = np.asarray(study.cases.label(cid))
    inside = np.zeros(label.shape, bool)
    offset = [s.start for s in study.cases.box(cid)]
    for start, size in study.queries.boxes(units)[cid]:
        inside[tuple(slice(o + a, o + a + b) for o, a, b in zip(offset, start, size))] = True
    outside = int(((label > 0) & ~inside).sum())
    if outside:
        warnings.warn(f"{study.cases.files[cid]['label']}: {outside} labeled voxel(s) (on the {study.cfg.spacing_mm} "
                      f"mm grid) lie outside the {len(units)} box(es) asked for in {cid}; they are ignored")
