"""The built-in demo data set: synthetic abdominal CT written exactly like MSD data (imagesTr/, labelsTr/,
dataset.json, int16 HU in gzip NIfTI with an LPS-like affine), so the demo runs the same code as a real task.
"""
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from data import write_nifti
from files import atomic_write_json

PHANTOM_VERSION = 3  # bump when the generator changes; existing phantom folders are then rewritten

# Contrast phases (textbook CT attenuation, HU): (share of cases, liver, spleen, kidney, aorta). The paper's
# pseudo-label band (100-150 HU) finds the liver in the portal-venous phase, the spleen in the arterial phase
# (the liver is still dark there) and nothing but partial-volume rims of bone in an unenhanced scan.
# Fat -100, muscle 50, bone 400-700 and hypodense tumours (liver - 30 to 60 HU) in every phase.
PHASES = {"portal-venous": (0.75, (100, 130), (100, 125), (150, 180), (140, 170)),
          "arterial": (0.15, (75, 95), (115, 145), (180, 220), (230, 290)),
          "unenhanced": (0.10, (50, 65), (40, 50), (30, 40), (35, 45))}


def _phantom_affine(shape_vox, spacing_mm):
    """LPS-like storage affine diag(-sx, -sy, sz) with a table offset, as DICOM converters write it."""
    affine = np.diag([-spacing_mm[0], -spacing_mm[1], spacing_mm[2], 1.0])
    centre_vox = (np.asarray(shape_vox) - 1) / 2
    affine[:3, 3] = np.array([-8.0, 20.0, -450.0]) - affine[:3, :3] @ centre_vox  # volume centre in world mm
    return affine


def _phantom_grid_mm(shape_vox, affine, shift_mm):
    """RAS mm of voxel centres relative to the patient centre, as broadcastable (X,1,1), (1,Y,1), (1,1,Z) arrays."""
    centre = affine[:3, :3] @ ((np.asarray(shape_vox) - 1) / 2) + affine[:3, 3] + shift_mm
    axes = [(affine[d, d] * np.arange(n) + affine[d, 3] - centre[d]).astype(np.float32)
            for d, n in enumerate(shape_vox)]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def _ellipsoid(grid, centre, radii):
    """Normalised squared distance sum(((p - centre) / radii)^2) on the grid; <= 1 inside the ellipsoid."""
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))


def _smooth_field(rng, shape, sigma_vox):
    """Zero-mean, unit-sd, spatially smooth random field (X, Y, Z) float32."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _paint_body(hu, grid, body, aorta_hu):
    """Air outside, skin fat ring, muscle wall, visceral fat inside; spine and aorta. Returns the inside mask."""
    x, y, _ = grid
    r = np.broadcast_to((x / body[0]) ** 2 + (y / body[1]) ** 2, hu.shape)
    hu[r <= 1.0] = -100.0                        # subcutaneous fat
    hu[r <= 0.88] = 50.0                         # abdominal wall muscle
    inside = r <= 0.72
    hu[inside] = -100.0                          # visceral fat
    spine = np.broadcast_to((x / (0.16 * body[0])) ** 2 + ((y + 0.6 * body[1]) / (0.2 * body[1])) ** 2, hu.shape)
    hu[spine <= 1.0] = 700.0                     # cortical bone
    hu[spine <= 0.55] = 400.0                    # cancellous bone
    aorta = np.broadcast_to(((x + 0.1 * body[0]) / 6.0) ** 2 + ((y + 0.3 * body[1]) / 6.0) ** 2, hu.shape)
    hu[aorta <= 1.0] = aorta_hu
    return inside & (spine > 1.0) & (aorta > 1.0)


def _paint_organs(hu, rng, grid, body, half_z, inside, phase):
    """Kidneys, spleen and the liver at the phase's HU; returns the liver mask (X, Y, Z) bool.

    Positions and radii are fractions of the body half-axes (rx, ry) and the half field of view in z. The
    liver varies in size (each axis 0.8-1.2), position (up to a tenth of the body) and lobe proportions.
    """
    _, liver_hu, spleen_hu, kidney_hu, _ = PHASES[phase]
    unit = np.array((body[0], body[1], half_z))
    for side in (-1.0, 1.0):  # +x is the patient's right (RAS)
        kidney = _ellipsoid(grid, unit * (side * 0.42, -0.35, -0.35), unit * (0.13, 0.2, 0.3))
        hu[(kidney <= 1.0) & inside] = rng.uniform(*kidney_hu)
    spleen_size = rng.uniform(0.7, 1.5)  # includes splenomegaly
    spleen = _ellipsoid(grid, unit * (-0.55, -0.2, 0.3), unit * spleen_size * (0.17, 0.28, 0.35))
    hu[(spleen <= 1.0) & inside] = rng.uniform(*spleen_hu)
    size, shift = rng.uniform(0.8, 1.2, 3), unit * rng.uniform(-0.1, 0.1, 3)
    left = rng.uniform(0.6, 1.3)                                 # left-lobe size relative to the right lobe
    right_lobe = _ellipsoid(grid, shift + unit * (0.35, 0.0, 0.2), unit * size * (0.4, 0.55, 0.6))
    left_lobe = _ellipsoid(grid, shift + unit * (0.0, 0.3, 0.4), unit * size * left * (0.3, 0.25, 0.3))
    lumps = _smooth_field(rng, hu.shape, 3.0)
    liver = (np.minimum(right_lobe, left_lobe) + 0.2 * lumps <= 1.0) & inside
    hu[liver] = rng.uniform(*liver_hu) + 6.0 * (lumps[liver] - lumps[liver].mean())  # perfusion heterogeneity
    return liver


def _paint_tumours(hu, rng, grid, liver, liver_hu):
    """0-4 hypodense tumours of radius 3-25 mm (log-uniform: many small, some large) inside the liver.
    Returns the tumour mask and the radii in mm."""
    tumour, radii = np.zeros(hu.shape, dtype=bool), []
    liver_voxels = np.flatnonzero(liver)
    n_tumours = 0 if rng.random() < 0.25 or liver_voxels.size == 0 else int(rng.integers(1, 5))
    for _ in range(n_tumours):
        centre_vox = np.unravel_index(liver_voxels[rng.integers(liver_voxels.size)], hu.shape)
        centre_mm = [float(g.ravel()[i]) for g, i in zip(grid, centre_vox)]
        radii.append(float(np.exp(rng.uniform(np.log(3.0), np.log(25.0)))))
        sphere = (_ellipsoid(grid, centre_mm, (radii[-1],) * 3) <= 1.0) & liver
        hu[sphere] = liver_hu - rng.uniform(30, 60)
        tumour |= sphere
    return tumour, radii


def _phantom_case(rng, shape_vox, spacing_mm):
    """One synthetic case: image int16 HU (X, Y, Z), label uint8 (0 background, 1 liver, 2 tumour), affine,
    and what makes it the case it is ({"phase", "liver_hu", "tumour_radii_mm", "noise_hu"})."""
    affine = _phantom_affine(shape_vox, spacing_mm)
    half_fov_mm = np.asarray(shape_vox) * np.asarray(spacing_mm) / 2
    grid = _phantom_grid_mm(shape_vox, affine, rng.uniform(-0.04, 0.04, 3) * half_fov_mm)
    body = half_fov_mm[:2] * np.array((0.85, 0.65)) * rng.uniform(0.9, 1.05)  # (rx, ry) mm
    names, shares = list(PHASES), [p[0] for p in PHASES.values()]
    phase = names[rng.choice(len(names), p=shares)]
    hu = np.full(shape_vox, -1000.0, dtype=np.float32)  # air
    inside = _paint_body(hu, grid, body, rng.uniform(*PHASES[phase][4]))
    liver = _paint_organs(hu, rng, grid, body, half_fov_mm[2], inside, phase)
    liver_hu = float(np.median(hu[liver])) if liver.any() else float("nan")
    tumour, radii = _paint_tumours(hu, rng, grid, liver, liver_hu)
    hu = ndimage.gaussian_filter(hu, 0.6)  # partial-volume blur at organ edges
    noise_hu = rng.uniform(8, 25)          # noise sd, mildly correlated like reconstructed CT noise
    hu += noise_hu * _smooth_field(rng, shape_vox, 0.7)
    label = liver.astype(np.uint8)
    label[tumour] = 2
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)  # 12-bit CT range
    about = {"phase": phase, "liver_hu": round(liver_hu, 1), "tumour_radii_mm": [round(r, 1) for r in radii],
             "noise_hu": round(float(noise_hu), 1)}
    return image, label, affine, about


def _phantom_complete(root, params):
    """True if root holds a finished phantom written with exactly these parameters."""
    try:
        with open(root / "dataset.json", encoding="utf-8") as f:
            info = json.load(f)
        files = [root / e[k] for e in info["training"] for k in ("image", "label")]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return info.get("phantom") == params and all(p.is_file() for p in files)


def make_phantom_dataset(root, n_cases, seed=0, shape_vox=(58, 58, 36), spacing_mm=(2.5, 2.5, 4.0)):
    """Write the built-in demo data set: n_cases synthetic abdominal CTs in MSD layout under root.

    imagesTr/phantom_{i}.nii.gz (int16 HU, LPS-like affine, native spacing_mm), labelsTr/ same names
    (uint8: 0 background, 1 liver, 2 tumour) and dataset.json, whose "phantom_cases" says what each case is
    (contrast phase, liver HU, tumour radii, noise). Case i depends only on (seed, i). The default field of
    view, 145 x 145 x 144 mm, is 48^3 voxels on the demo's 3 mm grid.
    Idempotent: a complete folder made with the same parameters is left as is. Returns root (Path).
    """
    if int(n_cases) < 1 or len(shape_vox) != 3 or len(spacing_mm) != 3 or min(shape_vox) < 8:
        raise ValueError(f"make_phantom_dataset: need n_cases >= 1, 3 sizes >= 8 and 3 spacings; got "
                         f"{n_cases}, {shape_vox}, {spacing_mm}")
    root = Path(root)
    params = {"version": PHANTOM_VERSION, "n_cases": int(n_cases), "seed": int(seed),
              "shape_vox": [int(s) for s in shape_vox], "spacing_mm": [float(s) for s in spacing_mm]}
    if _phantom_complete(root, params):
        return root
    training, cases = [], {}
    for i in range(int(n_cases)):
        image, label, affine, about = _phantom_case(np.random.default_rng([int(seed), i]), params["shape_vox"],
                                                    spacing_mm)
        write_nifti(root / "imagesTr" / f"phantom_{i}.nii.gz", image, affine)
        write_nifti(root / "labelsTr" / f"phantom_{i}.nii.gz", label, affine)
        training.append({"image": f"./imagesTr/phantom_{i}.nii.gz", "label": f"./labelsTr/phantom_{i}.nii.gz"})
        cases[f"phantom_{i}"] = about
    atomic_write_json(root / "dataset.json", {  # written last: its presence marks a complete folder
        "name": "Phantom", "description": "Synthetic abdominal CT in three contrast phases (proxy-al demo)",
        "reference": "proxy-al make_phantom_dataset", "licence": "CC0", "release": "1.0",
        "tensorImageSize": "3D", "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "numTraining": int(n_cases), "numTest": 0, "training": training, "test": [], "phantom": params,
        "phantom_cases": cases})
    return root
