"""Warm-start active learning for 3D CT segmentation: Algorithm 1 of the paper, end to end.

    python al_loop.py                          # built-in phantom data, demo preset, a few minutes on a CPU
    python al_loop.py --data MSD_Task03 --k 5  # MSD Task03 Liver under ./data (or $MSD_DATA_ROOT), paper preset
    torchrun --nproc-per-node 8 al_loop.py --data MSD_Task03 --out runs/t03   # the same study on 8 workers

`proxy_model` and `proxy_score` are Algorithm 1's lines 1-3, `run_strategy` its lines 4-13; `plan` lists
a study's units of work. Everything a rerun with the same --out needs to continue is in state/ (a file per
seed and strategy), scores/, split.json and checkpoints/.
"""
import dataclasses
import json
import os
import shutil
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import checks
import data
from losses import dice_per_class
from phantom import make_phantom_dataset
from report import pseudo_label_report, report_run, write_csv, write_reports
from proxy_al import (PatchStream, Progress, batches, evaluate, fmt_s, lr_schedule, make_optimizer, mc_scores,
                      noisy_label, pick_device, pseudo_label, semi_loss, sliding_window_predict, supervised_loss,
                      train_proxy, train_steps)
from unet import UNet, load_backbone
from world import World

STRATEGIES = ["rand", "var", "ent", "var_semi", "ent_semi", "rand_semi", "proxyrank", "proxyrank_semi",
              "proxyrank_var", "proxyrank_var_semi", "proxyrank_ent", "proxyrank_ent_semi"]  # supp. Table 1
# Beyond the paper: mutual information (BALD), among the strongest scores for 3D segmentation (nnActive, 2025).
EXTENDED = STRATEGIES + ["bald", "bald_semi", "proxyrank_bald", "proxyrank_bald_semi"]
MSD_TASKS = {"MSD_Task03": "Task03_Liver", "MSD_Task08": "Task08_HepaticVessel"}


def opt(default, help):
    """A Config field: its default and the one line of --help that documents it."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    data: str = opt("demo", "task folder, MSD_Task03 / MSD_Task08 (under --data-root), or demo")
    data_root: str = opt("data", "where MSD task folders and the demo data live (default: env MSD_DATA_ROOT)")
    out: str = opt("", "run folder; empty -> runs/<data>-<timestamp>; rerun with it to resume")
    strategy: str = opt("all", "NAME[,NAME...], all (the paper's 12 of supp. Table 1) or extended (+4 BALD)")
    seeds: tuple = opt((0, 1, 2), "repeats (paper: 3 seeds, mean +- std)")
    k: int = opt(5, "volumes acquired per iteration (paper: 5)")
    iterations: int = opt(4, "active iterations (paper: 4; 8 in the supplementary run)")
    n_val: float = opt(0.0, "validation cases, a count or a fraction < 1; 0 -> Task03 26, Task08 61, else 20 %")
    spacing_mm: tuple = opt((1.5, 1.5, 2.0), "resampling grid in mm (paper: 1.5 x 1.5 x 2.0)")
    window_hu: tuple = opt((), "HU window LO,HI; empty -> by task: Task03 -21,189, Task08 -3,243")
    hu_band: str = opt("100,150", "pseudo-label HU band LO,HI (paper: W:50 L:125), or auto (per-case level)")
    patch_vox: tuple = opt((96, 96, 96), "training patch in voxels (paper: 96^3)")
    roi_vox: tuple = opt((96, 96, 96), "sliding-window ROI for inference and MC scoring")
    overlap: float = opt(0.25, "sliding-window overlap")
    batch_size: int = opt(2, "patches per training step")
    steps: int = opt(2000, "supervised training steps per active iteration (paper: 2,000)")
    semi_steps: int = opt(2000, "semi-supervised fine-tuning steps per active iteration (paper: 2,000)")
    proxy_epochs: int = opt(100, "proxy training epochs on the pseudo labels (paper: 100)")
    proxy_val_every: int = opt(5, "validate the proxy every N epochs and keep the best (paper: 5)")
    proxy_patches_per_case: int = opt(2, "patches per pool case and epoch of proxy training")
    mc_passes: int = opt(10, "MC-dropout passes m (paper: 10)")
    dropout: float = opt(0.2, "dropout probability p (paper: 0.2)")
    channels: tuple = opt((16, 32, 64, 128, 256), "U-Net widths, one per level (paper: 5 levels)")
    lr: float = opt(1e-4, "Adam learning rate (paper: 1e-4)")
    lr_decay: str = opt("constant", "lr over each training stage: constant (paper) or cosine (decays to 0)")
    warmup_steps: int = opt(0, "linear lr warm-up steps at the start of each training stage")
    head_init: str = opt("new", "head of a task with more classes than the proxy: new (paper) or proxy (its rows)")
    tau: float = opt(0.9, "noisy-label confidence threshold (paper: 0.9)")
    alpha: float = opt(1.0, "weight of the supervised term in semi-supervised fine-tuning (paper: 1)")
    beta: float = opt(0.001, "weight of the consistency term (paper: 0.001)")
    fg_fraction: float = opt(0.5, "share of supervised patches centred on foreground (paper: 1:1)")
    semi_fg_fraction: float = opt(0.9, "share of semi-supervised patches centred on foreground (paper: 9:1)")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    workers: int = opt(-1, "patch loader processes; -1 -> none on the CPU (patches are cheap there), 6 on CUDA")
    save_maps: int = opt(0, "write MC variance maps of the N top-ranked cases as NIfTI")
    phantom_cases: int = opt(20, "demo: number of phantom cases")
    cache_dir: str = opt("", "preprocessed cache, shared by runs; empty -> <data-root>/.cache")
    preset: str = opt("", "demo or paper; empty -> demo without --data, paper with it")
    rebuild_state: bool = opt(False, "set aside unreadable state files and rebuild them from the checkpoints")
    report: bool = opt(False, "only write the reports of --out from its state so far (also while it runs)")


PAPER = Config()
# demo: the same code on a laptop CPU in minutes, on 24 phantom cases (16 pool, 8 validation) at 3 mm, where
# a case is 48^3 voxels: one 48^3 window. Where a budget of minutes forces it, it departs from the paper:
#  - a smaller network, 32^3 patches, 3 cases acquired per iteration, 2 iterations, m = 4, one seed;
#  - 160 supervised and 80 semi-supervised steps that end trained: lr 5e-3, a 20-step warm-up and a cosine
#    decay to 0 (the paper's 1e-4, constant, needs thousands of steps to train from random weights);
#  - the 3-class head starts from the proxy's 2-class head: a random one did not always train in time;
#  - a proxy trained to the end (16 epochs), so that its ranking repeats from seed to seed.
DEMO = dataclasses.replace(
    PAPER, data="demo", strategy="rand,proxyrank,proxyrank_var_semi", seeds=(0,), k=3, iterations=2, n_val=8,
    spacing_mm=(3.0, 3.0, 3.0), patch_vox=(32, 32, 32), roi_vox=(48, 48, 48), steps=160, semi_steps=80,
    proxy_epochs=16, proxy_val_every=4, mc_passes=4, channels=(8, 16, 32, 64, 128), lr=5e-3, lr_decay="cosine",
    warmup_steps=20, head_init="proxy", phantom_cases=24)
PRESETS = {"paper": PAPER, "demo": DEMO}

# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    """Config from the command line: unset flags keep the preset's value."""
    p = checks.config_parser(Config, PRESETS, __doc__)
    p.add_argument("--resume", action="store_true", help="continue the run in --out (also what a rerun does)")
    args = vars(p.parse_args(argv))
    resume = args.pop("resume")
    given = checks.config_values(Config, args, p)
    if "data_root" not in given and os.environ.get("MSD_DATA_ROOT"):
        given["data_root"] = os.environ["MSD_DATA_ROOT"]
    if resume and not given.get("out"):
        p.error("--resume needs --out pointing at the run to continue")
    preset = given.pop("preset", "") or ("paper" if given.get("data", "demo") != "demo" else "demo")
    if preset not in PRESETS:
        p.error(f"--preset {preset}: choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], preset=preset, **given)

# ----------------------------------------------------------------------------- the study: data, state, models


def stage_seed(*parts):
    """A seed per stage, so each stage is reproducible on its own (resume needs no saved RNG streams)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def measure(acquisition):
    """The score a strategy ranks by where it needs an uncertainty (lines 3 and 8): its own, else variance."""
    return acquisition if acquisition in ("entropy", "bald") else "variance"


def parse_strategy(name):
    """'proxyrank_var_semi' -> (proxy=True, acquisition='variance', semi=True)."""
    proxy, semi = name.startswith("proxyrank"), name.endswith("_semi")
    acq = {"var": "variance", "ent": "entropy", "bald": "bald", "rand": "random"}
    core = name.removeprefix("proxyrank").removesuffix("_semi").strip("_")
    return proxy, (acq[core] if core else "proxy"), semi


def resolve_data(cfg):
    """Path of the task folder named by --data; the demo phantom set is generated once under data_root."""
    root = Path(cfg.data_root)
    if cfg.data == "demo":
        return Path(make_phantom_dataset(root / "phantom", cfg.phantom_cases, seed=0))
    path = root / MSD_TASKS[cfg.data] if cfg.data in MSD_TASKS else Path(cfg.data)
    if not path.is_dir():
        raise SystemExit(f"--data {cfg.data}: no folder at {path.resolve()}. Download the task from "
                         f"http://medicaldecathlon.com (e.g. Task03_Liver.tar), unpack it under {root.resolve()} "
                         f"(or set --data-root / MSD_DATA_ROOT), or pass the task folder itself.")
    return path


@dataclass
class Proxy:
    """What Algorithm 1's lines 1-3 give every proxyrank strategy of a seed."""
    weights: dict      # Mp's state dict: the pre-trained weights of line 6
    scores: dict       # {case: {"variance", "entropy", "bald"}}: MC-dropout scores of the pool under Mp


class NeedLabels(Exception):
    """Annotation mode: the selected cases need labels before the loop can go on."""


class Study:
    """Everything one run shares: config, cases and split, device, state; images and labels on demand."""

    def __init__(self, cfg, world=None):
        self.cfg, self.t0, self.world = cfg, time.time(), world or World()
        self.root = resolve_data(cfg)
        self.out = Path(cfg.out)                  # made and locked by checks.run_folder
        self.cache = Path(cfg.cache_dir or Path(cfg.data_root) / ".cache")
        self.task, self.cases = checks.read_task(self.root)                # headers and file names only
        self.num_classes = self.task["num_classes"]
        self.window_hu = data.task_window(self.task["name"], tuple(cfg.window_hu) or None)
        self.device = pick_device(self.world.device(cfg.device))
        Progress.prefix, Progress.poll = (f"[rank {self.world.rank}]", self.world.check) if self.world.size > 1 else ("", None)
        self.workers = cfg.workers if cfg.workers >= 0 else (6 if self.device.type == "cuda" else 0)
        self.state = checks.read_states(self.out, cfg.rebuild_state)
        self.left_out = {}                                                 # case: why (unreadable files)
        labeled = [cid for cid, c in self.cases.items() if c["label"]]
        self.annotation = len(labeled) < len(self.cases)                  # some scans await annotation
        split = self.load_split(labeled if self.annotation else list(self.cases))
        self.pool, self.val = split["pool"], split["val"]
        self.total = 0                                                     # active iterations, for the ETA
        self.proxies, self.proxy_model, self.scoring = {}, (None, None), {}  # proxies by seed; pool scoring

    def load_split(self, val_candidates):
        """split.json of the run: drawn once (validation from `val_candidates`, seed 0), then reloaded."""
        path = self.out / "split.json"
        if not path.exists() and (self.state or (self.out / "checkpoints").exists()):
            raise SystemExit(f"{path}: missing, but this run has finished work; a new draw could move annotated "
                             f"or trained-on cases into validation. Restore the file, or start a new --out")
        try:
            n_val = self.cfg.n_val or data.default_n_val(self.task["name"], len(self.cases))
            if len(val_candidates) < 2:         # annotation mode with fewer than 2 labeled cases: no validation
                n_val = 0
            elif n_val >= 1:
                n_val = min(int(n_val), len(val_candidates) - 1)       # keep a case for the pool
            return data.split_cases(list(self.cases), n_val, 0, path, val_candidates)
        except ValueError as err:
            raise SystemExit(str(err))

    def log(self, msg):
        rank = f"rank {self.world.rank} " if self.world.size > 1 else ""
        print(f"[{rank}{fmt_s(time.time() - self.t0)}] {msg}", flush=True)

    def progress(self, count=0):
        """Count finished active iterations (all ranks); rank 0 prints the study's progress and ETA."""
        done = self.world.add("iterations", count)
        if self.world.rank == 0 and done and (count or done != getattr(self, "shown", 0)):
            self.shown, eta = done, (time.time() - self.t0) / done * (self.total - done)
            self.log(f"study: {done}/{self.total} active iterations done, ETA {fmt_s(eta)}")

    def save_state(self, seed, strategy):
        """One (seed, strategy)'s state, in one atomic write: its records and the cases they acquired."""
        checks.atomic_write_json(checks.state_file(self.out, seed, strategy), self.state[str(seed)][strategy])

    def image(self, cid):
        """Windowed image (X, Y, Z) float32 in [0, 1] on the cached, resampled grid."""
        return data.window(self.image_hu(cid), *self.window_hu)

    def image_hu(self, cid):
        return data.cached_case(self.cases[cid], self.cache, self.cfg.spacing_mm, with_label=False)[0]

    def label(self, cid):
        """The annotation of a case. Read only for selected pool cases and validation cases (oracle mode);
        a label that does not fit the task stops the run (finished iterations are saved)."""
        try:
            return data.cached_case(self.cases[cid], self.cache, self.cfg.spacing_mm, num_classes=self.num_classes)[1]
        except (OSError, ValueError, data.CacheError) as err:
            raise SystemExit(f"case {cid}: {err}") from None

    def labeled_volume(self, cid, label=None):
        """(image_hu, label, foreground index) for a PatchStream; label defaults to the annotation."""
        label = self.label(cid) if label is None else label
        return self.image_hu(cid), label, data.foreground_index(label)

    def new_model(self, out_channels, *seed_parts):
        torch.manual_seed(stage_seed(*seed_parts))
        return UNet(1, out_channels, tuple(self.cfg.channels), self.cfg.dropout).to(self.device)

    def load_checkpoint(self, name, model, cases):
        """Weights of a finished stage into `model`; returns the checkpoint dict, or None to redo the stage
        (a stage restarts from its beginning with its own seed, so its results are all a resume needs).
        `cases`: the ids the stage trains on; a checkpoint trained on others is redone."""
        path = self.out / "checkpoints" / f"{name}.pt"
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=False)
            if ckpt.get("cases") != list(cases):
                warnings.warn(f"{path}: trained on other cases than this stage's {len(cases)}; redoing that stage")
                return None
            model.load_state_dict(ckpt["model"])    # after the check: a rejected one leaves `model` untouched
            return ckpt
        except FileNotFoundError:
            return None
        except Exception as err:  # a damaged checkpoint is redone, never trusted
            warnings.warn(f"{path}: unreadable checkpoint ({err}); redoing that stage")
            return None

    def save_checkpoint(self, name, model, cases, **results):
        ckpt = {"model": model.state_dict(), "cases": list(cases), "config": dataclasses.asdict(self.cfg), **results}
        checks.atomic_write(self.out / "checkpoints" / f"{name}.pt", lambda f: torch.save(ckpt, f))


def choose_strategies(study):
    """The strategies to run; annotation mode with the preset's choice runs the paper's best, one seed."""
    cfg = study.cfg
    if study.annotation and cfg.strategy == PRESETS[cfg.preset].strategy:
        cfg.seeds = cfg.seeds[:1]
        study.log(f"annotation mode ({sum(not c['label'] for c in study.cases.values())} unlabeled cases): "
                  f"strategy proxyrank_var_semi, seed {cfg.seeds[0]} (set --strategy/--seeds to change)")
        return ["proxyrank_var_semi"]
    named = {"all": STRATEGIES, "extended": EXTENDED}
    return named.get(cfg.strategy) or [s.strip() for s in cfg.strategy.split(",") if s.strip()]


def start(study, strategies):
    """Warn about changed settings, save config.json, and count the iterations ahead (for the ETA)."""
    cfg = study.cfg
    if not study.val:
        warnings.warn("no labeled validation case: validation Dice is skipped (results will show nan)")
    path = study.out / "config.json"
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))
    old = json.loads(path.read_text()) if path.exists() else new
    same = ("strategy", "seeds", "device", "workers", "save_maps", "rebuild_state", "out", "cache_dir", "report")
    changed = [k for k in new if k not in same and old.get(k) != new[k]]
    if changed and study.world.rank == 0:  # a rerun into an existing --out with other settings mixes results
        warnings.warn(f"{path}: this rerun changes {', '.join(changed)}; finished stages keep their old settings "
                      f"(use a new --out for a clean run)")
    if study.world.rank == 0:
        checks.atomic_write_json(path, new)
    study.total = sum(cfg.iterations - len(study.state.get(str(seed), {}).get(s, {}).get("iterations", []))
                      for seed in cfg.seeds for s in strategies)
    study.log(f"{study.task['name']}: {len(study.pool)} pool, {len(study.val)} validation cases; "
              f"{len(strategies)} strategies x {len(cfg.seeds)} seeds; device {study.device}; out {study.out}"
              + (f"; {study.world.size} ranks" if study.world.size > 1 else ""))

# ----------------------------------------------------------------------------- Algorithm 1, lines 1-3


def pseudo_labels(study, ids):
    """Line 1: HU band + largest 26-connected component for every case, once per run; reported per case,
    with its Dice against the annotated foreground where a validation label exists (pool labels stay unread)."""
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
            checks.atomic_save_npy(path, lab)
            labels[cid] = lab
        dice = dice_per_class(labels[cid], np.asarray(study.label(cid)) > 0, 2)[0] if cid in study.val else None
        report.append((cid, int(labels[cid].sum()), dice))
    study.log(pseudo_label_report(study.out, report, study.cfg.hu_band, study.cfg.spacing_mm))
    return labels


def proxy_model(study, seed):
    """Lines 1-2: pseudo labels and the proxy model Mp trained on them, once per seed (a unit of its own)."""
    cfg = study.cfg
    model = study.new_model(2, seed, "proxy")
    if study.load_checkpoint(f"seed{seed}/proxy", model, study.pool) is None:
        shutil.rmtree(study.out / "scores" / f"seed{seed}", ignore_errors=True)    # scores of an older Mp
        study.log(f"seed {seed}: proxy model on pseudo labels ({cfg.proxy_epochs} epochs)")
        labels = pseudo_labels(study, study.pool + study.val)                                 # line 1
        volumes = [study.labeled_volume(c, labels[c]) for c in study.pool]
        val_cases = (lambda: ((study.image(c), labels[c]) for c in study.val)) if study.val else None
        steps = max(1, len(study.pool) * cfg.proxy_patches_per_case // cfg.batch_size)
        history = train_proxy(model, volumes, val_cases, cfg.proxy_epochs, cfg.proxy_val_every, steps,  # line 2
                              study.device, stage_seed(seed, "proxy"), patch_vox=cfg.patch_vox,
                              batch_size=cfg.batch_size, window_hu=study.window_hu, lr=cfg.lr,
                              workers=study.workers, roi=cfg.roi_vox, warmup_steps=cfg.warmup_steps,
                              cosine=cfg.lr_decay == "cosine")
        study.save_checkpoint(f"seed{seed}/proxy", model, study.pool, history=history)
    study.proxy_model = (seed, model)
    study.world.add(f"proxy{seed}")                             # ready for the pool's scoring


def proxy_score(study, seed, cid):
    """Line 3 for one pool case: its MC-dropout scores under Mp, in a file of its own (a unit: the pool's
    scoring is shared by all ranks, and a restarted run skips the cases already scored)."""
    path = study.out / "scores" / f"seed{seed}" / f"{cid}.json"
    if not path.exists():
        study.world.wait(lambda: study.world.add(f"proxy{seed}", 0), f"the proxy of seed {seed}", study.log)
        checks.atomic_write_json(path, score_cases(study, scoring_model(study, seed), [cid], f"seed{seed}/proxy")[cid])
    done = study.world.add(f"scored{seed}")
    study.scoring.setdefault(seed, Progress(f"seed {seed}: pool scored under the proxy", len(study.pool))).update(done)
    if done == len(study.pool) and study.cfg.save_maps:                           # the last case
        scores = load_proxy(study, seed).scores
        save_maps(study, scoring_model(study, seed), scores, f"seed{seed}/proxy")


def scoring_model(study, seed):
    """Mp of a seed from its checkpoint, kept while this rank scores that seed's cases."""
    if study.proxy_model[0] != seed:
        model = study.new_model(2, seed, "proxy")
        study.load_checkpoint(f"seed{seed}/proxy", model, study.pool)
        study.proxy_model = (seed, model)
    return study.proxy_model[1]


def load_proxy(study, seed):
    """What lines 1-3 give every proxyrank strategy of a seed; waits until the pool is scored."""
    if seed not in study.proxies:
        world = study.world
        world.wait(lambda: world.add(f"scored{seed}", 0) >= len(study.pool), f"the pool scores of seed {seed}", study.log)
        folder = study.out / "scores" / f"seed{seed}"
        scores = {c: json.loads((folder / f"{c}.json").read_text()) for c in study.pool}
        study.proxies[seed] = Proxy(weights=scoring_model(study, seed).state_dict(), scores=scores)
    return study.proxies[seed]


def score_cases(study, model, ids, tag):
    """MC-dropout scores of each case: {id: {"variance", "entropy", "bald"}}. Each case is seeded on its own,
    so its scores do not depend on which rank scores it or on the cases before it."""
    cfg, scores = study.cfg, {}
    progress = Progress(f"MC scoring ({cfg.mc_passes} passes)", len(ids))
    for i, cid in enumerate(ids, 1):
        torch.manual_seed(stage_seed(tag, "mc", cid))
        scores[cid] = mc_scores(model, study.image(cid), cfg.mc_passes, cfg.roi_vox, cfg.overlap)
        progress.update(i)
    return scores


def save_maps(study, model, scores, tag):
    """MC variance maps of the --save-maps cases of highest variance, as NIfTI on each scan's own grid (its
    shape and affine): they overlay the scan in ITK-SNAP or 3D Slicer."""
    folder = study.out / "maps" / tag.replace("/", "_")
    ids = sorted(scores, key=lambda c: -scores[c]["variance"])[:study.cfg.save_maps]
    for cid in ids:
        write_maps(study, model, cid, folder, prediction=False)
    study.log(f"uncertainty maps of {len(ids)} top-ranked case(s) -> {folder}")


def write_maps(study, model, cid, folder, prediction=True):
    """<case>_uncertainty.nii.gz (per-voxel MC variance, float32) and with `prediction` <case>_pred.nii.gz
    (the model's segmentation, uint8 class values of dataset.json), on the image file's own grid."""
    cfg, image, path = study.cfg, study.image(cid), study.cases[cid]["image"]
    torch.manual_seed(stage_seed(folder.name, cid, "map"))
    var = mc_scores(model, image, cfg.mc_passes, cfg.roi_vox, cfg.overlap, return_map=True)["variance_map"]
    data.write_native(folder / f"{cid}_uncertainty.nii.gz", var, path, cfg.spacing_mm, nearest=False)
    if prediction:
        seg = sliding_window_predict(model, image, cfg.roi_vox, cfg.overlap).argmax(0).astype(np.uint8)
        data.write_native(folder / f"{cid}_pred.nii.gz", seg, path, cfg.spacing_mm, nearest=True)

# ----------------------------------------------------------------------------- Algorithm 1, lines 4-13


def run_strategy(study, strategy, seed, proxy):
    """Algorithm 1, lines 4-13, for one strategy and seed; state.json is saved once per iteration."""
    cfg = study.cfg
    use_proxy, acquisition, semi = parse_strategy(strategy)
    st = study.state.setdefault(str(seed), {}).setdefault(strategy, {"labeled": [], "iterations": [], "scores": {}})
    labeled = st["labeled"][:cfg.k] + [c for r in st["iterations"] for c in r.get("acquired", [])]
    if st["labeled"] and labeled != st["labeled"]:        # only a hand-edited or foreign state gets here
        warnings.warn(f"{checks.state_file(study.out, seed, strategy)}: 'labeled' disagrees with the iteration records; "
                      f"following the records ({len(labeled)} cases)")
        st["labeled"] = labeled
    if not st["labeled"]:
        annotate(st, initial_scores(study, seed, use_proxy, acquisition, proxy), cfg.k)       # line 4
        study.save_state(seed, strategy)
    for j in range(len(st["iterations"]), cfg.iterations):                                   # line 5
        require_labels(study, st, seed, strategy, proxy)
        tag, labeled = f"seed{seed}/{strategy}/iter{j}", list(st["labeled"])
        study.log(f"{strategy} seed {seed} iteration {j + 1}/{cfg.iterations}: {len(labeled)} labeled")
        model = supervised(study, labeled, proxy.weights if use_proxy else None, tag)         # line 6: Ms
        record = {"n_labeled": len(labeled)}
        if semi:                                                                             # line 7
            unlabeled = [c for c in study.pool if c not in labeled]
            record["certain"] = most_certain(study, model, unlabeled, len(labeled), acquisition, tag)  # line 8
            model = semi_finetune(study, model, labeled, record["certain"], tag)             # lines 9-10: Msemi
        record.update(validate(study, model))
        study.log(f"{strategy} seed {seed} iteration {j + 1}: validation mean Dice {record['mean_dice']:.4f}")
        if j < cfg.iterations - 1 or study.annotation:
            scores = acquisition_scores(study, model, st, seed, strategy, proxy, j)         # lines 11-12
            record["acquired"], record["scores"] = annotate(st, scores, cfg.k), scores       # line 13
        st["iterations"].append(record)
        study.save_state(seed, strategy)        # the record and the cases it acquired, in one write
        write_reports(study.out, checks.read_states(study.out), study.task, len(study.pool), study.left_out)
        study.progress(1)
    require_labels(study, st, seed, strategy, proxy)


def initial_scores(study, seed, use_proxy, acquisition, proxy):
    """Line 4's ranking of the whole pool: the proxy's scores (by entropy for proxyrank_ent*, BALD for
    proxyrank_bald*, else variance), or without the proxy a seeded random order shared by the seed's others."""
    if use_proxy:
        return {c: proxy.scores[c][measure(acquisition)] for c in study.pool}
    rng = np.random.default_rng(stage_seed(seed, "initial"))
    return dict(zip(study.pool, rng.permutation(len(study.pool)).astype(float)))


def acquisition_scores(study, model, st, seed, strategy, proxy, j):
    """Lines 11-12: a score for every unlabeled pool case under Ms or Msemi; higher is acquired first."""
    _, acquisition, _ = parse_strategy(strategy)
    rest = [c for c in study.pool if c not in st["labeled"]]
    if acquisition == "proxy":                  # the proxy ranking itself, in order
        return {c: proxy.scores[c]["variance"] for c in rest}
    if acquisition == "random":
        rng = np.random.default_rng(stage_seed(seed, strategy, j))
        return dict(zip(rest, rng.permutation(len(rest)).astype(float)))
    mc = score_cases(study, model, rest, f"seed{seed}/{strategy}/iter{j}")
    if study.cfg.save_maps:
        save_maps(study, model, mc, f"seed{seed}/{strategy}/iter{j}")
    return {c: mc[c][acquisition] for c in rest}


def annotate(st, scores, k):
    """Line 13: the k highest-scoring cases not yet labeled join Tl (stable on ties). Returns them."""
    new = sorted((c for c in scores if c not in st["labeled"]), key=lambda c: -scores[c])[:k]
    st["labeled"] += new
    st["scores"].update({c: scores[c] for c in new})
    return new


def require_labels(study, st, seed, strategy, proxy):
    """Annotation mode: stop with to_annotate.csv until every selected case has a label in labelsTr/. Each
    selected case gets a pre-segmentation to correct and an uncertainty map, from the model that selected it."""
    pending = [c for c in st["labeled"] if not study.cases[c]["label"]]
    if not pending:
        return
    folder = study.out / "to_annotate"
    missing = [c for c in pending if not (folder / f"{c}_pred.nii.gz").exists()]
    model = selecting_model(study, st, seed, strategy, proxy) if missing else None
    for cid in missing if model else ():
        write_maps(study, model, cid, folder)
    found = lambda c, kind: str(folder / f"{c}_{kind}.nii.gz") if (folder / f"{c}_{kind}.nii.gz").exists() else ""
    rows = [(c, study.cases[c]["image"], f"{st['scores'][c]:.6g}", st["labeled"].index(c) + 1, found(c, "pred"),
             found(c, "uncertainty")) for c in pending]
    write_csv(study.out / "to_annotate.csv", ["case", "image", "score", "rank", "prediction", "uncertainty"], rows)
    raise NeedLabels(f"{len(pending)} case(s) need labels: see {study.out / 'to_annotate.csv'}.\n"
                     f"Open each scan with its pre-segmentation and uncertainty map from {folder} (on the scan's "
                     f"grid), correct it, save it as labelsTr/<case>.nii.gz in {study.root}, and rerun the same command.")


def selecting_model(study, st, seed, strategy, proxy):
    """The model whose scores made the last selection: the proxy for line 4 (its class 1, foreground),
    else the last iteration's Msemi or Ms. None for a random first pool (no model has seen the data yet)."""
    if not st["iterations"]:
        return scoring_model(study, seed).eval() if proxy is not None else None
    tag = f"seed{seed}/{strategy}/iter{len(st['iterations']) - 1}"
    path = study.out / "checkpoints" / f"{tag}_{'semi' if parse_strategy(strategy)[2] else 'sup'}.pt"
    model = study.new_model(study.num_classes, tag)
    model.load_state_dict(torch.load(path, map_location=study.device, weights_only=False)["model"])
    return model.eval()


def supervised(study, labeled, init_state, tag):
    """Line 6: train Ms on Tl for a fixed number of steps, from Mp's weights (new head) or from scratch."""
    cfg = study.cfg
    model = study.new_model(study.num_classes, tag, "init")
    if study.load_checkpoint(tag + "_sup", model, labeled) is None:
        if init_state is not None:
            load_backbone(model, init_state, head_from_proxy=cfg.head_init == "proxy")
        stream = PatchStream([study.labeled_volume(c) for c in labeled], cfg.patch_vox, cfg.fg_fraction,
                             study.window_hu, stage_seed(tag, "sup"))
        optimizer, scaler = make_optimizer(model, cfg.lr, study.device)
        schedule = lr_schedule(optimizer, cfg.steps, cfg.warmup_steps, cfg.lr_decay == "cosine")
        torch.manual_seed(stage_seed(tag, "dropout"))
        stats = train_steps(model, optimizer, scaler, supervised_loss,
                            batches(stream, cfg.batch_size, study.workers, study.device), cfg.steps, study.device,
                            tag="supervised", schedule=schedule)
        study.save_checkpoint(tag + "_sup", model, labeled, stats=stats)
    return model


def most_certain(study, model, ids, n, acquisition, tag):
    """Line 8: the n most certain cases of U under Ms (by the strategy's own measure, else variance)."""
    scores = score_cases(study, model, ids, tag + "/certain")
    return sorted(ids, key=lambda c: scores[c][measure(acquisition)])[:n]


def semi_finetune(study, model, labeled, certain, tag):
    """Lines 9-10: noisy labels of Un from Ms (tau), then Msemi = Ms fine-tuned on {Tl, Un}."""
    cfg = study.cfg
    if study.load_checkpoint(tag + "_semi", model, labeled + certain) is not None:
        return model
    model.eval()
    noisy = {c: noisy_label(sliding_window_predict(model, study.image(c), cfg.roi_vox, cfg.overlap), cfg.tau)
             for c in certain}                                                                   # line 9
    sup = PatchStream([study.labeled_volume(c) for c in labeled], cfg.patch_vox, cfg.fg_fraction,
                      study.window_hu, stage_seed(tag, "semi-sup"))
    two = PatchStream([study.labeled_volume(c, noisy[c]) for c in certain], cfg.patch_vox, cfg.semi_fg_fraction,
                      study.window_hu, stage_seed(tag, "semi-unl"), two_views=True)
    workers = max(study.workers // 2, 1) if study.workers else 0
    pairs = zip(batches(sup, cfg.batch_size, workers, study.device), batches(two, cfg.batch_size, workers, study.device))
    optimizer, scaler = make_optimizer(model, cfg.lr, study.device)
    schedule = lr_schedule(optimizer, cfg.semi_steps, cfg.warmup_steps, cfg.lr_decay == "cosine")
    torch.manual_seed(stage_seed(tag, "semi-dropout"))
    stats = train_steps(model, optimizer, scaler, lambda m, b: semi_loss(m, b, cfg.alpha, cfg.beta), pairs,   # line 10
                        cfg.semi_steps, study.device, tag="semi-supervised", schedule=schedule)
    study.save_checkpoint(tag + "_semi", model, labeled + certain, stats=stats)
    return model


def validate(study, model):
    """Validation Dice per foreground class: mean over cases, and per case (for significance tests)."""
    if not study.val:
        return {"dice": [float("nan")] * (study.num_classes - 1), "mean_dice": float("nan"), "per_case": {}}
    per_case = evaluate(model, ((study.image(c), study.label(c)) for c in study.val), study.num_classes,
                        study.cfg.roi_vox, study.cfg.overlap)
    return {"dice": per_case.mean(0).tolist(), "mean_dice": float(per_case.mean()),
            "per_case": {c: row.tolist() for c, row in zip(study.val, per_case)}}

# ----------------------------------------------------------------------------- main


def plan(study, strategies):
    """The units of work in the order the queue hands them out: a proxy training per seed (one rank each),
    the proxies' pool scoring by case (all ranks), then the (seed, strategy) runs, costliest first:
    semi-supervised before supervised, MC acquisition before random and proxy order."""
    proxy_seeds = [seed for seed in study.cfg.seeds if any(parse_strategy(s)[0] for s in strategies)]
    cost = lambda s: 2 * parse_strategy(s)[2] + (parse_strategy(s)[1] in ("variance", "entropy", "bald"))
    runs = sorted(((seed, s) for seed in study.cfg.seeds for s in strategies), key=lambda u: -cost(u[1]))
    return ([("proxy", seed, None) for seed in proxy_seeds] + [("score", seed, c) for seed in proxy_seeds
                                                               for c in study.pool] + [("run", *u) for u in runs])


def run_unit(study, kind, seed, what):
    """One unit of plan(): a proxy training, one pool case's scores under a proxy, or a (seed, strategy) run."""
    if kind == "proxy":
        proxy_model(study, seed)
    elif kind == "score":
        proxy_score(study, seed, what)
    else:
        run_strategy(study, what, seed, load_proxy(study, seed) if parse_strategy(what)[0] else None)


def main(argv=None):
    cfg = parse_args(argv)
    checks.check_options(cfg)                   # every check before the long work
    if cfg.report:
        return report_only(cfg)
    world = World()
    try:
        if world.rank == 0:                     # rank 0 holds the run folder for the group
            cfg.out = cfg.out or f"runs/{Path(cfg.data).name}-{time.strftime('%Y%m%d-%H%M%S')}"
            with checks.run_folder(cfg.out):
                world.set("out", cfg.out)
                return run_study(cfg, world)
        world.wait(lambda: world.store.check(["out"]), "rank 0 to lock the run folder", print)
        cfg.out = world.get("out")
        return run_study(cfg, world)
    except NeedLabels as stop:
        print(stop)
        return 0
    except BaseException as err:
        world.fail(f"rank {world.rank}: {err!r}"[:2000])
        raise
    finally:
        world.close()


def run_study(cfg, world):
    """Every unit of the study this rank gets from the queue; rank 0 then waits for all and writes the reports."""
    study = Study(cfg, world)
    strategies = choose_strategies(study)
    checks.check_request(study, strategies, EXTENDED)
    checks.preprocess_all(study)
    checks.check_request(study, strategies, EXTENDED)            # again: unreadable cases may have left the pool
    checks.check_labels(study)
    start(study, strategies)
    world.work(plan(study, strategies), lambda *unit: run_unit(study, *unit))
    world.add("finished")
    if world.rank:
        return 0
    world.wait(lambda: study.progress() or world.add("finished", 0) == world.size, "the other ranks", study.log)
    print(write_reports(study.out, checks.read_states(study.out), study.task, len(study.pool), study.left_out))
    study.log(f"done: results.csv, per_case_dice.csv, summary.md in {study.out}")
    return 0


def report_only(cfg):
    """--report: the reports of --out from its state files so far, without touching a running study."""
    saved = checks.read_json(Path(cfg.out) / "config.json", lambda c: None, "give --out a run folder")
    print(report_run(cfg.out, resolve_data(dataclasses.replace(cfg, **{k: saved[k] for k in (
        "data", "data_root", "phantom_cases")}))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
