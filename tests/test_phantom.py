"""The built-in demo data set: MSD layout, plausible CT, one population of cases."""
import json
import os

import nibabel as nib
import numpy as np

import data
from phantom import PHASES, make_phantom_dataset
from proxy_al import pseudo_label
import folders


def test_phantom_dataset_in_msd_layout(tmp_path):
    root = make_phantom_dataset(tmp_path / "ph", 4, seed=0)
    info = json.loads((root / "dataset.json").read_text())
    assert info["name"] == "Phantom" and info["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert info["numTraining"] == 4 and info["training"][0]["image"] == "./imagesTr/phantom_0.nii.gz"
    cases = folders.read_msd(root)
    assert [c["id"] for c in cases] == [f"phantom_{i}" for i in range(4)]
    values = set()
    for case in cases:
        img = nib.load(case["image"])
        assert img.get_data_dtype() == np.int16 and nib.aff2axcodes(img.affine) == ("L", "P", "S")
        assert np.allclose(img.header.get_zooms(), (2.5, 2.5, 4.0))
        hu, spacing_mm = data.load_ct(case["image"])
        label = np.asarray(nib.load(case["label"]).dataobj)[::-1, ::-1, :]  # stored LPS -> RAS
        values |= set(np.unique(label).tolist())
        assert hu.min() < -900 and hu.max() > 300  # air and bone
        centre_x = (np.argwhere(label == 1)[:, 0].mean() + 0.5) / label.shape[0]
        assert centre_x > 0.5  # liver on the patient's right = high RAS x
        about = info["phantom_cases"][case["id"]]
        lo, hi = PHASES[about["phase"]][1]
        assert lo - 15 < np.median(hu[label == 1]) < hi + 15       # the phase's liver level, blurred at the edges
    assert values == {0, 1, 2}


def test_phantom_population_varies_like_a_cohort(tmp_path):
    """Every contrast phase occurs; the paper's band fails where the liver is not enhanced; tumour sizes vary."""
    root = make_phantom_dataset(tmp_path / "ph", 24, seed=0, shape_vox=(29, 29, 18), spacing_mm=(5.0, 5.0, 8.0))
    about = json.loads((root / "dataset.json").read_text())["phantom_cases"]
    phases = [a["phase"] for a in about.values()]
    assert set(phases) == set(PHASES) and phases.count("portal-venous") > len(phases) / 2   # a minority is unusual
    radii = [r for a in about.values() for r in a["tumour_radii_mm"]]
    assert min(radii) < 6 and max(radii) > 15
    for case in folders.read_msd(root):
        hu, _ = data.load_ct(case["image"])
        liver = data.load_ct(case["label"])[0] == 1
        found = pseudo_label(hu, (100, 150)).astype(bool)
        overlap = (found & liver).sum() / max(found.sum(), 1)
        if about[case["id"]]["phase"] == "unenhanced":
            assert overlap < 0.2, case["id"]          # the band finds something, but not the liver


def test_phantom_is_idempotent_and_seeded(tmp_path):
    root = make_phantom_dataset(tmp_path / "ph", 1, seed=3)
    stamp = os.stat(root / "imagesTr" / "phantom_0.nii.gz").st_mtime_ns
    make_phantom_dataset(tmp_path / "ph", 1, seed=3)
    assert os.stat(root / "imagesTr" / "phantom_0.nii.gz").st_mtime_ns == stamp
    first = np.asarray(nib.load(root / "imagesTr" / "phantom_0.nii.gz").dataobj)
    make_phantom_dataset(tmp_path / "ph", 1, seed=4)
    assert not np.array_equal(first, np.asarray(nib.load(root / "imagesTr" / "phantom_0.nii.gz").dataobj))
