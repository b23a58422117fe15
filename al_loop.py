"""Warm-start active learning for 3D CT segmentation: Algorithm 1 of the paper, end to end.

    python al_loop.py                          # built-in phantom data, demo preset, a few minutes on a CPU
    python al_loop.py --data MSD_Task03 --k 5  # MSD Task03 Liver under ./data (or $MSD_DATA_ROOT), paper preset

`run_strategy` is Algorithm 1; `proxy_stage` is its lines 1-3. Everything a rerun with the same --out
needs to continue is in state.json and the checkpoints next to it.
"""
import argparse
import csv
import dataclasses
import io
import json
import os
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import data
from proxy_al import (PatchStream, Progress, batches, evaluate, fmt_s, make_optimizer, mc_scores, noisy_label,
                      pick_device, pseudo_label, semi_loss, sliding_window_predict, supervised_loss, train_proxy,
                      train_steps)
from unet import UNet, load_backbone

STRATEGIES = ["rand", "var", "ent", "var_semi", "ent_semi", "rand_semi", "proxyrank", "proxyrank_semi",
              "proxyrank_var", "proxyrank_var_semi", "proxyrank_ent", "proxyrank_ent_semi"]  # supp. Table 1
MSD_TASKS = {"MSD_Task03": "Task03_Liver", "MSD_Task08": "Task08_HepaticVessel"}


@dataclass
class Config:
    data: str = "demo"                     # task folder, MSD_Task03 / MSD_Task08 (under data_root), or demo
    data_root: str = "data"                # where MSD_TaskNN and the demo data live (default: env MSD_DATA_ROOT)
    out: str = ""                          # run folder; "" -> runs/<data>-<timestamp>; rerun with it to resume
    strategy: str = "all"                  # NAME[,NAME...] or all (12 strategies, supplementary Table 1)
    seeds: tuple = (0, 1, 2)               # paper: 3 seeds, mean +- std
    k: int = 5                             # paper: 5 volumes acquired per iteration
    iterations: int = 4                    # paper: 4 active iterations (8 in the supplementary run)
    n_val: float = 0.0                     # validation cases (a count, or a fraction < 1); 0 -> Task03 26, Task08 61, else 20 %
    spacing_mm: tuple = (1.5, 1.5, 2.0)    # paper: 1.5 x 1.5 x 2.0 mm
    window_hu: tuple = ()                  # () -> by task: Task03 [-21, 189], Task08 [-3, 243]
    hu_band: str = "100,150"               # pseudo-label band (paper "W:50 L:125"), or auto (per-case soft-tissue level)
    patch_vox: tuple = (96, 96, 96)        # paper: 96^3 training patches
    roi_vox: tuple = (96, 96, 96)          # sliding-window ROI for inference and MC scoring
    overlap: float = 0.25                  # sliding-window overlap
    batch_size: int = 2                    # patches per training step
    steps: int = 2000                      # paper: 2,000 steps per active iteration (supervised and semi)
    proxy_epochs: int = 100                # paper: 100 epochs on the pseudo labels
    proxy_val_every: int = 5               # paper: validate every 5 epochs, keep the best
    proxy_patches_per_case: int = 2        # patches per pool case and epoch of proxy training
    mc_passes: int = 10                    # paper: m = 10 MC-dropout passes
    dropout: float = 0.2                   # paper: p = 0.2
    channels: tuple = (16, 32, 64, 128, 256)  # paper: 5 levels
    lr: float = 1e-4                       # paper: Adam, lr 1e-4
    tau: float = 0.9                       # paper: noisy-label confidence threshold
    alpha: float = 1.0                     # paper: weight of the supervised term in semi-supervised fine-tuning
    beta: float = 0.001                    # paper: weight of the consistency term
    fg_fraction: float = 0.5               # paper: supervised patches fg:bg 1:1
    semi_fg_fraction: float = 0.9          # paper: semi-supervised ROI patches 9:1
    device: str = "auto"                   # auto, cpu, cuda, cuda:1
    workers: int = -1                      # patch loader processes; -1 -> 1 on the CPU, 6 on CUDA
    save_maps: int = 0                     # write uncertainty maps of the top N ranked cases (NIfTI)
    phantom_cases: int = 20                # demo: size of the phantom data set
    cache_dir: str = ""                    # preprocessed cache, shared by runs; "" -> <data_root>/.cache
    preset: str = ""                       # demo or paper; "" -> demo without --data, paper otherwise


PAPER = Config()
# demo: the same code on a laptop CPU in minutes. Smaller grid, network, patches and budgets; lr 1e-3
# (not the paper's 1e-4) because 100 steps at 1e-4 leave the liver Dice near 0.2, at 1e-3 near 0.8.
DEMO = dataclasses.replace(
    PAPER, data="demo", strategy="rand,proxyrank,proxyrank_var_semi", seeds=(0,), k=2, iterations=2,
    spacing_mm=(3.0, 3.0, 3.0), patch_vox=(32, 32, 32), roi_vox=(64, 64, 64), steps=100, proxy_epochs=6,
    proxy_val_every=3, mc_passes=4, channels=(8, 16, 32, 64, 128), lr=1e-3, phantom_cases=16)
PRESETS = {"paper": PAPER, "demo": DEMO}


class NeedLabels(Exception):
    """Annotation mode: the selected cases need labels before the loop can go on."""

# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    """Config from the command line: every field is a flag; unset flags keep the preset's value."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        default = getattr(PAPER, f.name)
        kind = "LIST" if isinstance(default, tuple) else type(default).__name__.upper()
        show = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else v
        p.add_argument("--" + f.name.replace("_", "-"), default=None, metavar=kind,
                       help=f"{comment_of(f.name)} [paper: {show(default)}, demo: {show(getattr(DEMO, f.name))}]"
                       .replace("%", "%%"))
    p.add_argument("--resume", action="store_true", help="continue the run in --out (also what a rerun does)")
    args = vars(p.parse_args(argv))
    resume = args.pop("resume")
    given = {k: convert(getattr(PAPER, k), v, k) for k, v in args.items() if v is not None}
    if "data_root" not in given and os.environ.get("MSD_DATA_ROOT"):
        given["data_root"] = os.environ["MSD_DATA_ROOT"]
    if resume and not given.get("out"):
        p.error("--resume needs --out pointing at the run to continue")
    preset = given.get("preset") or ("paper" if given.get("data", "demo") != "demo" else "demo")
    if preset not in PRESETS:
        p.error(f"--preset {preset}: choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], preset=preset, **{k: v for k, v in given.items() if k != "preset"})


def convert(default, text, name):
    try:
        if isinstance(default, tuple):
            return tuple(float(x) if "." in x else int(x) for x in text.split(",") if x.strip())
        return type(default)(text)
    except ValueError:
        raise SystemExit(f"--{name.replace('_', '-')} {text!r}: expected {type(default).__name__}")


def comment_of(name):
    """The comment on the Config field (the one documentation of each default)."""
    for line in Path(__file__).read_text().splitlines():
        if line.strip().startswith(name + ":") and "#" in line:
            return line.split("#", 1)[1].strip()
    return ""

# ----------------------------------------------------------------------------- the study: data, state, models


def stage_seed(*parts):
    """A seed per stage, so each stage is reproducible on its own (resume needs no saved RNG streams)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def parse_strategy(name):
    """'proxyrank_var_semi' -> (proxy=True, acquisition='variance', semi=True)."""
    proxy, semi = name.startswith("proxyrank"), name.endswith("_semi")
    acq = {"var": "variance", "ent": "entropy", "rand": "random"}
    core = name.removeprefix("proxyrank").removesuffix("_semi").strip("_")
    return proxy, (acq[core] if core else "proxy"), semi


def resolve_data(cfg):
    """Path of the task folder named by --data; the demo phantom set is generated once into the cache."""
    root = Path(cfg.data_root)
    if cfg.data == "demo":
        return Path(data.make_phantom_dataset(root / "phantom", cfg.phantom_cases, seed=0))
    path = root / MSD_TASKS[cfg.data] if cfg.data in MSD_TASKS else Path(cfg.data)
    if not path.is_dir():
        raise SystemExit(f"--data {cfg.data}: no folder at {path.resolve()}. Download the task from "
                         f"http://medicaldecathlon.com (e.g. Task03_Liver.tar), unpack it under {root.resolve()} "
                         f"(or set --data-root / MSD_DATA_ROOT), or pass the task folder itself.")
    return path


class Study:
    """Everything one run shares: config, cases, split, device, state.json; images and labels on demand."""

    def __init__(self, cfg):
        self.cfg, self.t0 = cfg, time.time()
        self.root = resolve_data(cfg)
        self.out = Path(cfg.out or f"runs/{Path(cfg.data).name}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = Path(cfg.cache_dir or Path(cfg.data_root) / ".cache")
        self.task = data.read_task_info(self.root)
        self.num_classes = self.task["num_classes"]
        self.window_hu = data.task_window(self.task["name"], tuple(cfg.window_hu) or None)
        self.device = pick_device(cfg.device)
        self.workers = cfg.workers if cfg.workers >= 0 else (6 if self.device.type == "cuda" else 1)
        self.state_path = self.out / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def log(self, msg):
        print(f"[{fmt_s(time.time() - self.t0)}] {msg}", flush=True)

    def iteration_done(self):
        """Count finished active iterations and print the run's ETA from their pace."""
        self.done += 1
        elapsed = time.time() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        self.log(f"{self.done}/{self.total} iterations of this run done, ETA {fmt_s(eta)}")

    def save_state(self):
        data.atomic_write_json(self.state_path, self.state)

    def image(self, cid):
        """Windowed image (X, Y, Z) float32 in [0, 1] on the cached, resampled grid."""
        return data.window(self.image_hu(cid), *self.window_hu)

    def image_hu(self, cid):
        return data.cached_case(self.cases[cid], self.cache, self.cfg.spacing_mm, with_label=False)[0]

    def label(self, cid):
        """The annotation of a case. Read only for selected pool cases and validation cases (oracle mode)."""
        return data.cached_case(self.cases[cid], self.cache, self.cfg.spacing_mm,
                                num_classes=self.num_classes)[1]

    def new_model(self, out_channels, *seed_parts):
        torch.manual_seed(stage_seed(*seed_parts))
        return UNet(1, out_channels, tuple(self.cfg.channels), self.cfg.dropout).to(self.device)

    def train_kwargs(self):
        c = self.cfg
        return dict(patch_vox=c.patch_vox, batch_size=c.batch_size, window_hu=self.window_hu, lr=c.lr,
                    workers=self.workers, roi=c.roi_vox)

    def load_checkpoint(self, name, model):
        """Weights of a finished stage into `model`; returns the checkpoint dict, or None to redo the stage.

        A stage always restarts from its beginning with its own seed, so its finished weights, its
        results and the config are all a resume needs.
        """
        path = self.out / "checkpoints" / f"{name}.pt"
        if not path.exists():
            return None
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=False)
            model.load_state_dict(ckpt["model"])
            return ckpt
        except Exception as err:  # a damaged checkpoint is redone, never trusted
            warnings.warn(f"{path}: unreadable checkpoint ({err}); redoing that stage")
            return None

    def save_checkpoint(self, name, model, **results):
        path = self.out / "checkpoints" / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "config": dataclasses.asdict(self.cfg), **results}, tmp)
        os.replace(tmp, path)


def prepare(study):
    """Cases and the pool / validation split (cheap: headers and file names only)."""
    study.cases = {c["id"]: c for c in data.read_msd(study.root)}
    if study.num_classes < 2:
        raise SystemExit(f"{study.root}/dataset.json: the task has {study.num_classes} class; segmentation needs "
                         f"background and at least one foreground class in 'labels'")
    labeled = [cid for cid, c in study.cases.items() if c["label"]]
    study.annotation = len(labeled) < len(study.cases)
    split = load_split(study, labeled if study.annotation else list(study.cases))
    study.val = [cid for cid in split["val"] if cid in study.cases]
    study.pool = [cid for cid in split["pool"] if cid in study.cases]
    return study


def preprocess_all(study):
    """Resample every image into the cache once; an unreadable case is left out with a warning."""
    progress = Progress("preprocess", len(study.cases))
    for i, (cid, case) in enumerate(list(study.cases.items()), 1):
        try:
            data.cached_case(case, study.cache, study.cfg.spacing_mm, with_label=False)
        except (OSError, ValueError) as err:
            warnings.warn(f"case {cid} left out: {err}")
            del study.cases[cid]
        progress.update(i)
    if not study.cases:
        raise SystemExit(f"{study.root}: no readable case")
    study.val = [c for c in study.val if c in study.cases]
    study.pool = [c for c in study.pool if c in study.cases]
    return study


def load_split(study, val_candidates):
    """split.json of the run: made once (validation drawn from `val_candidates`, seed 0), then reloaded."""
    path = study.out / "split.json"
    if not path.exists():
        n_val = study.cfg.n_val or data.default_n_val(study.task["name"], len(study.cases))
        n_val = n_val if n_val < 1 else min(int(n_val), len(val_candidates) - 1)  # keep a case for the pool
        val = data.split_cases(val_candidates, n_val, 0, study.out / ".split_val.json")["val"] if n_val > 0 else []
        data.atomic_write_json(path, {"pool": [c for c in study.cases if c not in val], "val": val})
        (study.out / ".split_val.json").unlink(missing_ok=True)
    split = json.loads(path.read_text())
    if not isinstance(split, dict) or not {"pool", "val"} <= set(split):
        raise SystemExit(f"{path}: not a split file (needs 'pool' and 'val'); delete it to draw a new split")
    return split


def warn_changed_config(study):
    """A rerun into an existing --out with other settings mixes results: say which settings changed."""
    path = study.out / "config.json"
    if not path.exists():
        return
    old, new = json.loads(path.read_text()), json.loads(json.dumps(dataclasses.asdict(study.cfg)))
    changed = [k for k in new if k not in ("strategy", "seeds", "device", "workers", "save_maps") and old.get(k) != new[k]]
    if changed:
        warnings.warn(f"{path}: this rerun changes {', '.join(changed)}; finished stages keep their old settings "
                      f"(use a new --out for a clean run)")


def check_request(study, strategies):
    """Every user mistake that can be seen before the long work starts."""
    cfg = study.cfg
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"--strategy: unknown {', '.join(unknown)}; choose from all, {', '.join(STRATEGIES)}")
    need = cfg.k * cfg.iterations
    if cfg.k < 1 or need > len(study.pool):
        raise SystemExit(f"--k {cfg.k} x --iterations {cfg.iterations} needs {need} pool cases, the pool has "
                         f"{len(study.pool)}; lower --k or --iterations")
    if study.annotation and (len(strategies) > 1 or len(cfg.seeds) > 1):
        raise SystemExit("annotation mode (pool cases without labels): choose one --strategy and one --seeds, "
                         "e.g. --strategy proxyrank_var_semi --seeds 0")
    if any(s % 16 for s in tuple(cfg.patch_vox) + tuple(cfg.roi_vox)):
        raise SystemExit(f"--patch-vox {cfg.patch_vox} / --roi-vox {cfg.roi_vox}: sides must be multiples of 16")

# ----------------------------------------------------------------------------- Algorithm 1, lines 1-3


def pseudo_labels(study, ids):
    """Line 1: HU band + largest 26-connected component for every case, once per run; reported per case."""
    band = "auto" if study.cfg.hu_band == "auto" else tuple(float(x) for x in study.cfg.hu_band.split(","))
    folder = study.out / "pseudo_labels"
    folder.mkdir(exist_ok=True)
    report, labels = [], {}
    for cid in ids:
        path = folder / f"{cid}.npy"
        try:
            labels[cid] = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an empty band is reported in the table below instead
                lab = pseudo_label(study.image_hu(cid), band, cid)
            data.atomic_save_npy(path, lab)
            labels[cid] = lab
        report.append((cid, int(labels[cid].sum()), int(labels[cid].sum()) * np.prod(study.cfg.spacing_mm) / 1000))
    write_csv(study.out / "pseudo_labels.csv", ["case", "voxels", "volume_ml"], report)
    empty = [r[0] for r in report if r[1] == 0]
    study.log(f"pseudo labels (band {study.cfg.hu_band} HU): median {np.median([r[2] for r in report]):.0f} ml, "
              f"{len(empty)} empty{': ' + ', '.join(empty[:10]) if empty else ''} -> pseudo_labels.csv")
    if empty:
        warnings.warn(f"{len(empty)} case(s) have no voxel in the pseudo-label band; try --hu-band auto")
    return labels


def proxy_stage(study, seed):
    """Lines 1-3: pseudo labels, proxy model Mp on them, MC-dropout scores of the pool under Mp.

    Done once per seed and shared by every proxyrank strategy. Returns (Mp's weights, scores).
    """
    cfg = study.cfg
    model = study.new_model(2, seed, "proxy")
    ckpt = study.load_checkpoint(f"seed{seed}/proxy", model)
    if ckpt is None:
        study.log(f"seed {seed}: proxy model on pseudo labels ({cfg.proxy_epochs} epochs)")
        labels = pseudo_labels(study, study.pool + study.val)
        volumes = [(study.image_hu(c), labels[c], data.foreground_index(labels[c])) for c in study.pool]
        val_cases = (lambda: ((study.image(c), labels[c]) for c in study.val)) if study.val else None
        steps = max(1, len(study.pool) * cfg.proxy_patches_per_case // cfg.batch_size)
        history = train_proxy(model, volumes, val_cases, cfg.proxy_epochs,
                              cfg.proxy_val_every, steps, study.device, stage_seed(seed, "proxy"),
                              **study.train_kwargs())
        scores = score_cases(study, model, study.pool, f"seed{seed}/proxy")
        study.save_checkpoint(f"seed{seed}/proxy", model, scores=scores, history=history)
    else:
        scores = ckpt["scores"]
    return {k: v.clone() for k, v in model.state_dict().items()}, scores


def score_cases(study, model, ids, tag):
    """MC-dropout variance and entropy of each case: {id: {"variance", "entropy"}}."""
    cfg, scores = study.cfg, {}
    torch.manual_seed(stage_seed(tag, "mc"))
    progress = Progress(f"MC scoring ({cfg.mc_passes} passes)", len(ids))
    for i, cid in enumerate(ids, 1):
        scores[cid] = mc_scores(model, study.image(cid), cfg.mc_passes, cfg.roi_vox, cfg.overlap)
        progress.update(i)
    if cfg.save_maps:
        save_maps(study, model, sorted(ids, key=lambda c: -scores[c]["variance"])[:cfg.save_maps], tag)
    return scores


def save_maps(study, model, ids, tag):
    """Variance maps (and the resampled image, same grid) as NIfTI, to view in ITK-SNAP or 3D Slicer."""
    folder = study.out / "maps" / tag.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag(list(study.cfg.spacing_mm) + [1.0])  # RAS grid of the preprocessed volume
    for cid in ids:
        res = mc_scores(model, study.image(cid), study.cfg.mc_passes, study.cfg.roi_vox, study.cfg.overlap,
                        return_map=True)
        data.write_nifti(folder / f"{cid}_variance.nii.gz", res["variance_map"], affine)
        data.write_nifti(folder / f"{cid}_image.nii.gz", np.asarray(study.image_hu(cid)), affine)
    study.log(f"uncertainty maps of {len(ids)} top-ranked case(s) -> {folder}")

# ----------------------------------------------------------------------------- Algorithm 1, lines 4-13


def run_strategy(study, strategy, seed, proxy):
    """Algorithm 1 for one strategy and seed; state.json is saved after every iteration."""
    cfg = study.cfg
    use_proxy, acquisition, semi = parse_strategy(strategy)
    st = study.state.setdefault(str(seed), {}).setdefault(strategy, {"labeled": [], "iterations": [], "scores": {}})
    if not st["labeled"]:
        acquire(study, st, seed, strategy, proxy, None)                                      # line 4
    for j in range(len(st["iterations"]), cfg.iterations):                                   # line 5
        tag, labeled = f"seed{seed}/{strategy}/iter{j}", list(st["labeled"])
        require_labels(study, st)
        study.log(f"{strategy} seed {seed} iteration {j + 1}/{cfg.iterations}: {len(labeled)} labeled")
        model = supervised(study, labeled, proxy[0] if use_proxy else None, tag)             # line 6
        record = {"n_labeled": len(labeled)}
        if semi:                                                                             # line 7
            rest = [c for c in study.pool if c not in labeled]
            record["certain"] = most_certain(study, model, rest, len(labeled), acquisition, tag)   # line 8
            model = semi_finetune(study, model, labeled, record["certain"], tag)             # lines 9-10
        record.update(validate(study, model))
        study.log(f"{strategy} seed {seed} iteration {j + 1}: validation mean Dice {record['mean_dice']:.4f}")
        if j < cfg.iterations - 1 or study.annotation:                                        # lines 11-13
            record["acquired"], record["scores"] = acquire(study, st, seed, strategy, proxy, model, j)
        st["iterations"].append(record)
        study.save_state()
        write_reports(study)
        study.iteration_done()
    require_labels(study, st)


def acquire(study, st, seed, strategy, proxy, model, j=-1):
    """Add the next k pool cases to st["labeled"] (line 4 when model is None, else line 13)."""
    cfg = study.cfg
    use_proxy, acquisition, _ = parse_strategy(strategy)
    rest = [c for c in study.pool if c not in st["labeled"]]
    if use_proxy and (model is None or acquisition == "proxy"):    # the proxy ranking itself, in order
        key = "entropy" if acquisition == "entropy" else "variance"
        scores = {c: proxy[1][c][key] for c in rest}
    elif model is None or acquisition == "random":                 # seeded draw; line 4 shared by all non-proxy
        rng = np.random.default_rng(stage_seed(seed, "initial") if model is None else stage_seed(seed, strategy, j))
        scores = dict(zip(rest, rng.permutation(len(rest)).astype(float)))
    else:                                                          # lines 11-12: score U with Ms or Msemi
        mc = score_cases(study, model, rest, f"seed{seed}/{strategy}/iter{j}")
        scores = {c: mc[c][acquisition] for c in rest}
    new = sorted(rest, key=lambda c: -scores[c])[:cfg.k]           # the k most uncertain (stable on ties)
    st["labeled"] += new
    st["scores"].update({c: scores[c] for c in new})
    study.save_state()
    return new, scores


def require_labels(study, st):
    """Annotation mode: stop with to_annotate.csv until every selected case has a label in labelsTr/."""
    pending = [c for c in st["labeled"] if not study.cases[c]["label"]]
    if not pending:
        return
    rows = [(c, study.cases[c]["image"], f"{st['scores'][c]:.6g}", st["labeled"].index(c) + 1) for c in pending]
    write_csv(study.out / "to_annotate.csv", ["case", "image", "score", "rank"], rows)
    raise NeedLabels(f"{len(pending)} case(s) need labels: see {study.out / 'to_annotate.csv'}.\n"
                     f"Segment them, save each label as labelsTr/<case>.nii.gz in {study.root} (same grid as the "
                     f"image), then rerun with --out {study.out} to continue.")


def supervised(study, labeled, init_state, tag):
    """Line 6: train Ms on Tl for a fixed number of steps, from Mp's weights (new head) or from scratch."""
    cfg = study.cfg
    model = study.new_model(study.num_classes, tag, "init")
    if study.load_checkpoint(tag + "_sup", model) is None:
        if init_state is not None:
            load_backbone(model, init_state)
        volumes = [labeled_volume(study, c) for c in labeled]
        optimizer, scaler = make_optimizer(model, cfg.lr, study.device)
        stream = PatchStream(volumes, cfg.patch_vox, cfg.fg_fraction, study.window_hu, stage_seed(tag, "sup"))
        torch.manual_seed(stage_seed(tag, "dropout"))
        stats = train_steps(model, optimizer, scaler, supervised_loss,
                            batches(stream, cfg.batch_size, study.workers, study.device), cfg.steps, study.device,
                            tag="supervised")
        study.save_checkpoint(tag + "_sup", model, stats=stats)
    return model


def labeled_volume(study, cid):
    label = study.label(cid)
    return study.image_hu(cid), label, data.foreground_index(label)


def most_certain(study, model, ids, n, acquisition, tag):
    """Line 8: the n most certain cases of U under Ms (variance unless the strategy acquires by entropy)."""
    key = "entropy" if acquisition == "entropy" else "variance"
    scores = score_cases(study, model, ids, tag + "/certain")
    return sorted(ids, key=lambda c: scores[c][key])[:n]


def semi_finetune(study, model, labeled, certain, tag):
    """Lines 9-10: noisy labels of Un from Ms (tau), then Msemi = Ms fine-tuned on {Tl, Un}."""
    cfg = study.cfg
    if study.load_checkpoint(tag + "_semi", model) is not None:
        return model
    model.eval()
    unl = []
    for c in certain:
        image = study.image(c)
        noisy = noisy_label(sliding_window_predict(model, image, cfg.roi_vox, cfg.overlap), cfg.tau)
        unl.append((study.image_hu(c), noisy, data.foreground_index(noisy)))
    sup = PatchStream([labeled_volume(study, c) for c in labeled], cfg.patch_vox, cfg.fg_fraction,
                      study.window_hu, stage_seed(tag, "semi-sup"))
    two = PatchStream(unl, cfg.patch_vox, cfg.semi_fg_fraction, study.window_hu, stage_seed(tag, "semi-unl"),
                      two_views=True)
    workers = max(study.workers // 2, 1) if study.workers else 0
    pairs = zip(batches(sup, cfg.batch_size, workers, study.device), batches(two, cfg.batch_size, workers, study.device))
    optimizer, scaler = make_optimizer(model, cfg.lr, study.device)
    torch.manual_seed(stage_seed(tag, "semi-dropout"))
    stats = train_steps(model, optimizer, scaler, lambda m, b: semi_loss(m, b, cfg.alpha, cfg.beta), pairs,
                        cfg.steps, study.device, tag="semi-supervised")
    study.save_checkpoint(tag + "_semi", model, stats=stats)
    return model


def validate(study, model):
    """Validation Dice per foreground class: mean over cases, and per case (for significance tests)."""
    if not study.val:
        return {"dice": [float("nan")] * (study.num_classes - 1), "mean_dice": float("nan"), "per_case": {}}
    per_case = evaluate(model, ((study.image(c), study.label(c)) for c in study.val), study.num_classes,
                        study.cfg.roi_vox, study.cfg.overlap)
    return {"dice": per_case.mean(0).tolist(), "mean_dice": float(per_case.mean()),
            "per_case": {c: row.tolist() for c, row in zip(study.val, per_case)}}

# ----------------------------------------------------------------------------- results


def write_csv(path, header, rows):
    text = io.StringIO()
    csv.writer(text).writerows([header] + [list(r) for r in rows])
    data.atomic_write_bytes(path, text.getvalue().encode())


def results_rows(study):
    """One row per strategy, seed and iteration from state.json."""
    names = [study.task["labels"].get(c, f"class{c}") for c in range(1, study.num_classes)]
    rows = []
    for seed, by_strategy in study.state.items():
        for strategy, st in by_strategy.items():
            for j, rec in enumerate(st["iterations"]):
                pct = 100.0 * rec["n_labeled"] / max(len(study.pool), 1)
                rows.append([strategy, seed, j + 1, rec["n_labeled"], round(pct, 2)]
                            + [round(d, 4) for d in rec["dice"]] + [round(rec["mean_dice"], 4)])
    return ["strategy", "seed", "iteration", "n_labeled", "pct_labeled"] + [f"dice_{n}" for n in names] + ["mean_dice"], rows


def last_per_case(study):
    """{strategy: {case: mean foreground Dice at the last iteration, averaged over seeds}}."""
    out = {}
    for by_strategy in study.state.values():
        for strategy, st in by_strategy.items():
            if st["iterations"]:
                for c, d in st["iterations"][-1]["per_case"].items():
                    out.setdefault(strategy, {}).setdefault(c, []).append(float(np.mean(d)))
    return {s: {c: float(np.mean(v)) for c, v in cases.items()} for s, cases in out.items()}


def write_reports(study):
    """results.csv, per_case_dice.csv, summary.md (and dice_curve.png with matplotlib). Returns the summary."""
    header, rows = results_rows(study)
    write_csv(study.out / "results.csv", header, rows)
    per_case = [[s, seed, j + 1, c] + [round(x, 4) for x in d]
                for seed, by_s in study.state.items() for s, st in by_s.items()
                for j, rec in enumerate(st["iterations"]) for c, d in rec["per_case"].items()]
    write_csv(study.out / "per_case_dice.csv", ["strategy", "seed", "iteration", "case"] + header[5:-1], per_case)
    summary = summary_table(study, header, rows) + "\n" + wilcoxon_table(study)
    data.atomic_write_bytes(study.out / "summary.md", summary.encode())
    plot_curves(study, header, rows)
    return summary


def summary_table(study, header, rows):
    """Mean +- std over seeds of the last iteration's validation Dice, per strategy (the paper's Table 1)."""
    lines = [f"# {study.task['name']}: validation Dice at the last iteration (mean +- std over seeds)", "",
             "| strategy | seeds | n_labeled | " + " | ".join(header[5:]) + " |",
             "|---" * (len(header) - 2) + "|"]
    for strategy in dict.fromkeys(r[0] for r in rows):
        last = max(r[2] for r in rows if r[0] == strategy)
        sel = np.array([r[5:] for r in rows if r[0] == strategy and r[2] == last], float)
        n_lab = [r[3] for r in rows if r[0] == strategy and r[2] == last][0]
        cells = [f"{m:.4f} +- {s:.4f}" for m, s in zip(sel.mean(0), sel.std(0))]
        lines.append(f"| {strategy} | {len(sel)} | {n_lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def wilcoxon_table(study):
    """Wilcoxon signed-rank p-values of every strategy against the best one, on per-case Dice (scipy)."""
    from scipy.stats import wilcoxon
    per_case = last_per_case(study)
    if len(per_case) < 2:
        return ""
    means = {s: np.mean(list(v.values())) for s, v in per_case.items()}
    best = max(means, key=means.get)
    lines = [f"## Wilcoxon signed-rank test against {best} (per-case mean foreground Dice, last iteration)", "",
             "| strategy | mean Dice | p-value |", "|---|---|---|"]
    for s in sorted(means, key=lambda s: -means[s]):
        common = sorted(set(per_case[s]) & set(per_case[best]))
        a, b = [per_case[s][c] for c in common], [per_case[best][c] for c in common]
        diff = np.subtract(a, b)
        p = 1.0 if s == best or not np.any(diff) else float(wilcoxon(a, b).pvalue)
        lines.append(f"| {s} | {means[s]:.4f} | {'-' if s == best else f'{p:.3g}'} |")
    return "\n".join(lines) + "\n"


def plot_curves(study, header, rows):
    """Dice against percent labeled: solid supervised, dashed semi-supervised (the paper's Fig. 2)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not getattr(study, "_told_no_plot", False):
            study.log("matplotlib is not installed: no dice_curve.png (pip install matplotlib for the plot)")
            study._told_no_plot = True
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in dict.fromkeys(r[0] for r in rows):
        pts = {}
        for r in rows:
            if r[0] == strategy:
                pts.setdefault(r[4], []).append(r[-1])
        x = sorted(pts)
        ax.plot(x, [np.mean(pts[p]) for p in x], "--" if strategy.endswith("_semi") else "-", marker="o", label=strategy)
    ax.set_xlabel("% of pool labeled")
    ax.set_ylabel("validation mean Dice")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study.out / "dice_curve.png.tmp.png")
    os.replace(study.out / "dice_curve.png.tmp.png", study.out / "dice_curve.png")
    plt.close(fig)

# ----------------------------------------------------------------------------- main


def main(argv=None):
    cfg = parse_args(argv)
    study = prepare(Study(cfg))
    strategies = STRATEGIES if cfg.strategy == "all" else [s.strip() for s in cfg.strategy.split(",") if s.strip()]
    if study.annotation and cfg.strategy == PRESETS[cfg.preset].strategy:
        strategies, cfg.seeds = ["proxyrank_var_semi"], cfg.seeds[:1]
        study.log(f"annotation mode ({sum(not c['label'] for c in study.cases.values())} unlabeled cases): "
                  f"strategy proxyrank_var_semi, seed {cfg.seeds[0]} (set --strategy/--seeds to change)")
    check_request(study, strategies)            # before any long work
    preprocess_all(study)
    check_request(study, strategies)            # again: unreadable cases may have left the pool
    if not study.val:
        warnings.warn("no labeled validation case: validation Dice is skipped (results will show nan)")
    warn_changed_config(study)
    data.atomic_write_json(study.out / "config.json", dataclasses.asdict(cfg))
    study.log(f"{study.task['name']}: {len(study.pool)} pool, {len(study.val)} validation cases; "
              f"{len(strategies)} strategies x {len(cfg.seeds)} seeds; device {study.device}; out {study.out}")
    study.done, study.total = 0, sum(cfg.iterations - len(study.state.get(str(seed), {}).get(s, {}).get(
        "iterations", [])) for seed in cfg.seeds for s in strategies)
    try:
        for seed in cfg.seeds:
            proxy = proxy_stage(study, seed) if any(parse_strategy(s)[0] for s in strategies) else None
            for strategy in strategies:
                run_strategy(study, strategy, seed, proxy)
    except NeedLabels as stop:
        print(stop)
        return 0
    print(write_reports(study))
    study.log(f"done: results.csv, per_case_dice.csv, summary.md in {study.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
