"""The annotator's side: for the cases selected for annotation, a pre-segmentation to correct and an
uncertainty map, both on the scan's own grid (its shape and affine), and to_annotate.csv listing them.
--save-maps writes the uncertainty maps of the top-ranked cases of each scoring the same way.
"""
import numpy as np
import torch

import data
from proxy_al import mc_scores, sliding_window_predict
from regions import unit_case
from report import write_csv
from study import NeedLabels, stage_seed


def require_labels(study, state, seed, strategy):
    """Annotation mode: stop with to_annotate.csv until every selected case has a label in labelsTr/. Each
    selected case gets a pre-segmentation to correct and an uncertainty map, from the model that selected it."""
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
