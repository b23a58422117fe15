"""The annotator's side: for the cases selected for annotation, a pre-segmentation to correct and an
uncertainty map, both on the scan's own grid (its shape and affine), and to_annotate.csv listing them.
With --query patch, to_annotate.csv lists boxes, and a mask per case marks them on the scan's grid.
--save-maps writes the uncertainty maps of the top-ranked cases of each scoring the same way.
"""
import os
import warnings
import zlib

import numpy as np
import torch

import data
import files
import strategies
from files import ProxyAlError, few
from keys import map_seed
from proxy_al import mc_scores, sliding_window_predict
from report import write_csv

ASKED = "to_annotate/asked.json"      # with boxes: what was asked, and the label inside each box then (AskedBoxes)


class NeedLabels(Exception):
    """Annotation mode: the selected cases need labels before the loop can go on (the run stops, exit 0)."""


def require_labels(study, state, seed, strategy):
    """Annotation mode: stop with to_annotate.csv until every selected case has a label in labelsTr/. Each
    selected case gets a pre-segmentation to correct and an uncertainty map, from the model that selected it."""
    if study.queries.patch:                 # simulated (every label there): the boxes' labels are read as needed
        return require_box_labels(study, state, seed, strategy) if study.cases.annotation else None
    cases, folder = study.cases, study.out / "to_annotate"
    pending = [u for u in state.labeled if not cases.files[u.case]["label"]]
    if not pending:
        return
    missing = [u.case for u in pending if not (folder / f"{u.case}_pred.nii.gz").exists()]
    model = selecting_model(study, state, seed, strategy) if missing else None
    for cid in missing if model else ():
        write_maps(study, model, cid, folder)
    found = lambda c, kind: str(folder / f"{c}_{kind}.nii.gz") if (folder / f"{c}_{kind}.nii.gz").exists() else ""
    rank = lambda u: state.labeled.index(u) - len(state.given) + 1       # among the selected cases
    rows = [(u.case, cases.files[u.case]["image"], f"{state.scores[u]:.6g}", rank(u), found(u.case, "pred"),
             found(u.case, "uncertainty"), cases.files[u.case]["label_to"]) for u in pending]
    write_csv(study.out / "to_annotate.csv", ["case", "image", "score", "rank", "prediction", "uncertainty",
                                              "save_label_as"], rows)
    raise NeedLabels(f"{len(pending)} case(s) need labels: see {study.out / 'to_annotate.csv'}.\n"
                     f"Open each scan with its pre-segmentation and uncertainty map from {folder} (on the scan's "
                     f"grid), correct it, save it as labelsTr/<case>{_ending(cases.files[pending[0].case]['label_to'])}"
                     f" in {cases.root}, and rerun the same command (to_annotate.csv: save_label_as).")


def _ending(path):
    return ".nii.gz" if path.endswith(".nii.gz") else ".nii"


def selecting_model(study, state, seed, strategy):
    """The model whose scores made the last selection: the proxy for line 5 (its class 1, foreground),
    else the last iteration's Msemi or Ms. None for a random first pool (no model has seen the data yet)."""
    if not state.iterations:
        return study.proxy(seed).eval() if strategy.proxy else None
    return study.final_model(seed, strategy, len(state.iterations) - 1, state.iterations[-1])


def save_maps(study, model, scores, key):
    """MC variance maps of the --save-maps cases of highest variance, as NIfTI on each scan's own grid (its
    shape and affine): they overlay the scan in ITK-SNAP or 3D Slicer. key: the stage's keys.Key."""
    folder = study.out / "maps" / key.folder
    ids = sorted(scores, key=lambda c: -scores[c]["variance"])[:study.cfg.save_maps]
    for cid in ids:
        write_maps(study, model, cid, folder, prediction=False)
    study.log(f"uncertainty maps of {len(ids)} top-ranked case(s) -> {folder}")


def write_maps(study, model, cid, folder, prediction=True):
    """<case>_uncertainty.nii.gz (per-voxel MC variance, float32) and with `prediction` <case>_pred.nii.gz
    (the model's segmentation, uint8 class values of dataset.json), on the image file's own grid."""
    cfg, image, path = study.cfg, study.cases.image(cid), study.cases.files[cid]["image"]
    torch.manual_seed(map_seed(folder.name, cid))
    var = mc_scores(model, image, cfg.mc_passes, cfg.roi_vox, cfg.overlap, return_map=True,
                    variance_classes=cfg.variance_classes)["variance_map"]
    var = study.cases.uncrop(cid, var)                                  # the body box back on the scan's grid
    data.write_native(folder / f"{cid}_uncertainty.nii.gz", var, path, cfg.spacing_mm, nearest=False)
    if prediction:
        seg = sliding_window_predict(model, image, cfg.roi_vox, cfg.overlap).argmax(0).astype(np.uint8)
        seg = study.cases.uncrop(cid, seg)                              # background outside the body box
        data.write_native(folder / f"{cid}_pred.nii.gz", seg, path, cfg.spacing_mm, nearest=True)


def box_content(study, unit):
    """(CRC-32 of the label inside the box, whether it holds a labeled voxel) on the training grid; a case
    without a label file reads as background there."""
    cid, start, size = study.queries.box(unit)
    inside = tuple(slice(a, a + b) for a, b in zip(start, size))
    if study.cases.files[cid]["label"]:
        label = np.ascontiguousarray(np.asarray(study.cases.label(cid)[study.cases.box(cid)])[inside])
    else:
        label = np.zeros(tuple(int(n) for n in size), np.uint8)
    return zlib.crc32(label.tobytes()), bool(label.any())


class AskedBoxes:
    """to_annotate/asked.json: for each box asked for, the label inside it when it was asked (CRC-32) and whether
    it counts as labeled; and the round of each case's maps. A box counts as labeled once its voxels in its
    case's label file differ from when it was asked, or the user says so (--boxes-done): never because a file
    was touched, copied or restored. A lost or damaged file loses only those answers: every box not yet trained
    on is asked again."""

    def __init__(self, study):
        self.study, self.path = study, study.out / ASKED
        self.entries, self.maps, self.newly = {}, {}, []
        if self.path.exists():
            try:
                saved = files.read_json(self.path, _asked_problem, "")
                self.entries, self.maps = saved.get("boxes", {}), saved.get("maps", {})
            except ProxyAlError:
                os.replace(self.path, self.path.with_suffix(".bad"))
                warnings.warn(f"{self.path}: damaged, set aside as {self.path.with_suffix('.bad').name}; every box "
                              "not yet trained on is asked again (confirm the ones already labeled with "
                              "--boxes-done CASE)")
        self.shown = set(self.entries)          # asked before this run: the boxes --boxes-done can answer for

    def labeled(self, unit, done=False):
        """Whether a box of Tl not yet trained on counts as labeled (recorded as asked now if it is new here);
        `done`: the user says it is (--boxes-done)."""
        crc, _ = box_content(self.study, unit)
        entry = self.entries.get(str(unit))
        if entry is None or "crc" not in entry:     # asked now, or by an older proxy-al (a file stamp): as asked now
            entry = self.entries[str(unit)] = {"crc": crc, "done": bool(entry and entry.get("done"))}
        has_file = bool(self.study.cases.files[unit.case]["label"])
        now = has_file and (entry["done"] or (done and str(unit) in self.shown) or crc != entry["crc"])
        if now and not entry["done"]:
            self.newly.append(unit)
        entry["done"] = bool(now)
        return entry["done"]

    def save(self):
        files.atomic_write_json(self.path, {"boxes": self.entries, "maps": self.maps})


def _asked_problem(asked):
    ok = isinstance(asked, dict) and all(isinstance(asked.get(k, {}), dict) for k in ("boxes", "maps"))
    return None if ok and all(isinstance(e, dict) for e in asked.get("boxes", {}).values()) else "not asked.json"


def pending_boxes(study, asked, state, done=()):
    """(the boxes of Tl still to label, trained-on boxes whose label file is gone): the boxes acquired since the
    last training that do not count as labeled yet, and those trained on whose case's label file is gone (asked
    again). `done`: cases (or "all") whose boxes the user says are labeled as saved."""
    trained = state.trained
    gone = [u for u in trained if u not in state.given and not study.cases.files[u.case]["label"]]
    for u in gone:
        asked.entries.pop(str(u), None)         # what the file held is unknown: it must hold the box again
    later = gone + [u for u in state.labeled[len(trained):] if u not in state.given]
    says = lambda u: "all" in done or u.case in done
    return [u for u in later if not asked.labeled(u, says(u))], gone


def require_box_labels(study, state, seed, strategy):
    """Annotation mode with boxes (--query patch): stop with to_annotate.csv, one row per box still to label
    (AskedBoxes says when a box counts as labeled): this strategy's, then those the seed's other strategies
    still wait for. The label file is read only inside the boxes asked for (Queries.volumes); labels outside
    them are ignored, with a warning giving the count."""
    cases, asked = study.cases, AskedBoxes(study)
    unknown = [c for c in study.boxes_done if c != "all" and c not in cases.pool]
    if unknown:
        raise ProxyAlError(f"--boxes-done {','.join(unknown)}: not pool cases of this run; name the cases of "
                           f"to_annotate.csv (column case), or all")
    pending, gone = pending_boxes(study, asked, state, study.boxes_done)
    for cid in dict.fromkeys(u.case for u in gone):
        warnings.warn(f"{cases.files[cid]['label_to']}: missing, but the run trained on boxes of {cid}; they are "
                      "asked again: restore the file from a backup, or label them again")
    units = [u for u in state.labeled if u not in state.given and u not in pending]
    for cid in dict.fromkeys(u.case for u in asked.newly):
        warn_outside(study, cid, [u for u in units if u.case == cid])
    if not pending:
        asked.save()
        return
    write_box_rows(study, state, seed, strategy, asked, pending)
    asked.save()
    ending = _ending(cases.files[pending[0].case]["label_to"])
    held = [c for c in dict.fromkeys(u.case for u in pending) if any(box_content(study, u)[1] for u in pending
                                                                     if u.case == c)]
    held = (f" The label files of {few(held)} already hold labels inside boxes asked now (saved before they were "
            "asked, or spilled over from a neighbouring box): if they are right there, confirm them with "
            f"--boxes-done {','.join(held)}." if held else "")
    raise NeedLabels(f"{len(pending)} box(es) in {len({u.case for u in pending})} case(s) need labels: see "
                     f"{study.out / 'to_annotate.csv'}.\nOpen each scan with its boxes mask (box n has value n), "
                     f"pre-segmentation and uncertainty map from {study.out / 'to_annotate'} (on the scan's grid), "
                     f"label the voxels inside each box (only the boxes are read), save the case's label as "
                     f"labelsTr/<case>{ending} in {cases.root} (keeping any boxes labeled before), and rerun the "
                     "same command (to_annotate.csv: voxels_ijk are the file's voxel indices, first to last; *_mm "
                     "their world coordinates from its affine). A box counts once a voxel inside it changes; for a "
                     "box that is truly all background add --boxes-done CASE[,CASE...] (or all) to the rerun." + held)


def write_box_rows(study, state, seed, strategy, asked, pending):
    """to_annotate.csv and to_annotate/<case>_boxes.nii.gz for this strategy's pending boxes and those the seed's
    other strategies still wait for (numbered per case in that order), with fresh maps for this strategy's."""
    cases, folder = study.cases, study.out / "to_annotate"
    rows_of = {strategy.name: (state, pending)}
    for name in sorted(study.run.saved.get(str(seed), {})):
        if name not in rows_of:
            other = study.run_state(seed, strategies.parse(name))
            rows_of[name] = (other, pending_boxes(study, asked, other)[0])
    by_case = {}
    for name, (st, units) in rows_of.items():
        for u in units:
            by_case.setdefault(u.case, {}).setdefault(u, (name, st))
    stale = [c for c in dict.fromkeys(u.case for u in pending)
             if asked.maps.get(c) != len(state.iterations) or not (folder / f"{c}_pred.nii.gz").exists()]
    model = selecting_model(study, state, seed, strategy) if stale else None
    rows = []
    for cid, units in by_case.items():
        if model is not None and cid in stale:
            write_maps(study, model, cid, folder)
            asked.maps[cid] = len(state.iterations)
        native, affine = write_box_mask(study, cid, [study.queries.box(u)[1:] for u in units],
                                        folder / f"{cid}_boxes.nii.gz")
        for number, (u, (name, st)) in enumerate(units.items(), 1):
            where = np.nonzero(native == number)
            first, last = [int(a.min()) for a in where], [int(a.max()) for a in where]
            mm = lambda v: ",".join(f"{x:.1f}" for x in (affine @ [*v, 1])[:3])
            found = lambda kind: str(p) if (p := folder / f"{cid}_{kind}.nii.gz").exists() else ""
            rows.append((cid, number, ",".join(f"{a}-{b}" for a, b in zip(first, last)), mm(first), mm(last),
                         f"{st.scores[u]:.6g}", st.labeled.index(u) - len(st.given) + 1,
                         str(folder / f"{cid}_boxes.nii.gz"), found("pred"), found("uncertainty"),
                         cases.files[cid]["label_to"], name))
    write_csv(study.out / "to_annotate.csv", ["case", "box", "voxels_ijk", "first_voxel_mm", "last_voxel_mm", "score",
                                              "rank", "boxes_mask", "prediction", "uncertainty", "save_label_as",
                                              "strategy"], rows)


def box_mask(cases, cid, boxes, onto=None, numbered=True) -> np.ndarray:
    """The boxes of case cid (cases: Cases) on the voxel grid of the NIfTI file `onto` (default: its image), in
    that file's axis order: uint8, box n of `boxes` valued n (`numbered`; else every box 1), 0 elsewhere. boxes:
    (start, size) voxel triples on image(cid); a file voxel is in a box when its nearest grid voxel is
    (data.to_native_grid)."""
    if numbered and len(boxes) > 255:
        raise ValueError(f"case {cid}: {len(boxes)} boxes; a uint8 mask numbers at most 255")
    mask = np.zeros(cases.image_hu(cid).shape, np.uint8)
    for number, (start, size) in enumerate(boxes, 1):
        mask[tuple(slice(a, a + b) for a, b in zip(start, size))] = number if numbered else 1
    return data.to_native_grid(cases.uncrop(cid, mask), onto or cases.files[cid]["image"], cases.spacing_mm,
                               nearest=True)


def write_box_mask(study, cid, boxes, path):
    """<case>_boxes.nii.gz on the scan's own grid, box n (of `boxes`, (start, size) on image(cid)) with value n.
    Returns the mask as written (file's axis order) and the file's affine."""
    native, affine = box_mask(study.cases, cid, boxes), data.nifti_affine(study.cases.files[cid]["image"])
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
