"""Helpers shared by the test files (the fixtures are in conftest.py): the arguments of a tiny phantom study that
runs in seconds and of its two-strategy form, comparing two runs' results, reading a run's states, to_annotate.csv
and results.csv, a user's own scans, NIfTI and MSD folders written by hand, and a tiny U-Net with its data."""
import csv
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import al_loop
import folders
import run_folder
import units
from unet import UNet


K = 2


def args(root, out, *extra):
    """al_loop arguments of a study that runs in seconds: k 2, 2 iterations, seed 0, 2 validation cases; 16^3
    training patches and sliding windows on a phantom of 20 x 20 x 16 voxels at 6 mm (four windows, overlapping),
    a U-Net of channels 2, 4, 8; every iteration's Ms from the start weights (the paper's line 7)."""
    return ["--data", str(root), "--out", str(out), "--cache-dir", str(Path(out).parent / "cache"),
            "--preset", "demo", "--k", str(K), "--iterations", "2", "--seeds", "0", "--spacing-mm", "6.0,6.0,6.0",
            "--patch-vox", "16,16,16", "--roi-vox", "16,16,16", "--steps", "2", "--semi-steps", "2",
            "--proxy-epochs", "2", "--proxy-val-every", "1", "--proxy-patches-per-case", "1", "--mc-passes", "2",
            "--channels", "2,4,8", "--workers", "0", "--n-val", "2", "--warm-start", "none", *extra]


def read_states(out, rebuild=False):
    """The run's states in their file form (run_folder.read_states, each RunState as its JSON object): what the
    tests compare."""
    return {seed: {name: st.to_json() for name, st in by_s.items()}
            for seed, by_s in run_folder.read_states(out, rebuild).items()}


def states_of(out):
    return read_states(out)["0"]


def own_scans(phantom, tmp_path, labeled=3):
    """The user's folder: all scans, labels for the first `labeled` cases, a dataset.json whose other
    entries have no "label" (as a user writes it for unlabeled scans)."""
    root = tmp_path / "mine"
    shutil.copytree(phantom, root)
    info = json.loads((root / "dataset.json").read_text())
    for i, entry in enumerate(sorted(info["training"], key=lambda e: folders.natural_key(e["image"]))):
        if i >= labeled:
            (root / entry.pop("label")).unlink()
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def to_annotate(out):
    with open(out / "to_annotate.csv") as f:
        return list(csv.DictReader(f))


def messages(record):
    return [str(w.message) for w in record]


def snapshot(folder):
    """Every file under `folder` with its size and modification time."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in Path(folder).rglob("*") if p.is_file())

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("--strategy", "rand,proxyrank_var_semi")
WITH_FULL = ("--strategy", "rand,proxyrank_var_semi,full")     # and the all-data reference
NNUNET_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def tiny_args(root, out, *extra):
    return args(root, out, *STRATEGIES, *extra)


def run(root, out, *extra):
    assert al_loop.main(tiny_args(root, out, *extra)) == 0
    return read_states(out)


def same_results(a, b, exact=False):
    """Two runs' states (read_states): the same (seed, strategy) runs, the same cases labeled and the
    same Dice (NaN where a class is absent from every validation label); exact: bit for bit."""
    tolerance = dict(rel=0, abs=0) if exact else {}
    assert a.keys() == b.keys()
    for seed in a:
        assert a[seed].keys() == b[seed].keys(), seed
        for name in a[seed]:
            assert a[seed][name]["labeled"] == b[seed][name]["labeled"], (seed, name)
            assert [r["mean_dice"] for r in a[seed][name]["iterations"]] == pytest.approx(
                [r["mean_dice"] for r in b[seed][name]["iterations"]], nan_ok=True, **tolerance), (seed, name)


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LPS_AFFINE = np.array([[-0.8, 0, 0, 40.0], [0, -0.9, 0, 60.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])


def save(path, array, affine=LPS_AFFINE, slope_inter=None):
    """Write a NIfTI (gzip when the name says so) with nibabel, as a scanner export would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=float))
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    nib.save(img, str(path))
    return str(path)


def make_msd(root, names, labelled=None, shape=(9, 11, 7), with_json=True):
    """MSD folder with int16 images and uint8 labels; labelled: names that get a label (default all)."""
    rng = np.random.default_rng(0)
    labelled = names if labelled is None else labelled
    training = []
    for name in names:
        save(root / "imagesTr" / f"{name}.nii.gz", rng.integers(-200, 300, shape).astype(np.int16))
        if name in labelled:
            save(root / "labelsTr" / f"{name}.nii.gz", (rng.random(shape) < 0.3).astype(np.uint8))
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    if with_json:
        info = {"name": "Liver", "labels": {"0": "background", "1": "liver"}, "numTraining": len(names),
                "training": training, "test": ["./imagesTs/x_9.nii.gz"]}
        (root / "dataset.json").write_text(json.dumps(info))
    return root


SMALL = (4, 8, 8, 8, 8)       # five levels, tiny widths: fast on the CPU
ROI = (16, 16, 32)            # the cheapest window the 5-level UNet accepts (not 16 on every side)
WINDOW_HU = (-21, 189)        # Task03 window
CPU = torch.device("cpu")


def tiny_unet(seed=0, dropout=0.0, out_channels=2):
    torch.manual_seed(seed)
    return UNet(channels=SMALL, out_channels=out_channels, dropout=dropout)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def blob_volume(shape=(40, 36, 30), seed=0):
    """HU volume (background -100) with a ~110 HU cube and its label; windowed it is a clear bright cube."""
    rng = np.random.default_rng(seed)
    image_hu = (-100 + 5 * rng.standard_normal(shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[8:24, 10:26, 6:22] = 1
    image_hu[label == 1] = 110 + 5 * rng.standard_normal(int(label.sum()))
    return image_hu, label


def fixed_batch(seed=0, batch_size=2, shape=(16, 16, 32)):
    rng = np.random.default_rng(seed)
    label = np.zeros((batch_size, 1) + shape, np.int64)
    label[:, :, 4:12, 3:11, 8:24] = 1
    image = (0.2 + 0.6 * label + 0.1 * rng.standard_normal(label.shape)).astype(np.float32)
    return torch.from_numpy(image), torch.from_numpy(label)


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def deliver_labels(truth, root, out):
    """The annotator saves a label for every row of to_annotate.csv where it asks (save_label_as)."""
    rows = to_annotate(out)
    for r in rows:
        shutil.copy(truth / "labelsTr" / f"{r['case']}.nii.gz", r["save_label_as"])
    return [r["case"] for r in rows]


def copy_data(root, tmp_path, name="data"):
    dest = tmp_path / name
    shutil.copytree(root, dest)
    return dest


def ijk_ranges(text):
    """to_annotate.csv's voxels_ijk "a-b,c-d,e-f" (first to last, inclusive) -> three slices."""
    return tuple(slice(int(a), int(b) + 1) for a, b in (part.split("-") for part in text.split(",")))


def label_boxes(truth, root, rows):
    """The annotator labels the boxes of to_annotate.csv rows: the true label inside each (truth: a folder with
    every label), the case's file kept elsewhere (created when there is none). Returns the cases of boxes that
    are truly all background (their voxels cannot show the labeling: --boxes-done)."""
    background = set()
    for case in dict.fromkeys(r["case"] for r in rows):
        true = nib.load(truth / "labelsTr" / f"{case}.nii.gz")
        path = Path(next(r["save_label_as"] for r in rows if r["case"] == case))
        label = np.asarray(nib.load(path).dataobj).copy() if path.exists() else np.zeros(true.shape, np.uint8)
        for r in (r for r in rows if r["case"] == case):
            box = ijk_ranges(r["voxels_ijk"])
            label[box] = np.asarray(true.dataobj)[box]
            if not label[box].any():
                background.add(case)
        nib.save(nib.Nifti1Image(label.astype(np.uint8), true.affine, true.header), str(path))
    return sorted(background)


def results_text(path):
    """A report file's text, summary.md without its table of where the time went (it measures the run, not its
    results)."""
    text = Path(path).read_text()
    if path.name != "summary.md":
        return text
    return re.sub(r"\n## Where the time went\n.*?(?=\n## |\Z)", "", text, flags=re.S)


def unit_case(text):
    """The case of a unit in its file form (units.parse: "<case>@x,y,z" or a case id)."""
    return units.parse(text).case


def unit_start(text):
    """The first voxel (3,) int64 of a box in its file form, None for a whole case."""
    unit = units.parse(text)
    return None if unit.whole else np.array(unit.start, np.int64)
