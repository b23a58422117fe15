"""One run of a study, around the method in al_loop.py: its folder and lock, its cases and split, its state
files and checkpoints, the data checks before any training, and the queue of units on one or many ranks.

Everything a rerun with the same --out needs to continue is on disk: state/ (a file per seed and strategy),
scores/, split.json and checkpoints/. A mistake a user can make ends in ProxyAlError with a message naming the
option or file and what to do, never in a traceback.
"""
import dataclasses
import json
import errno
import os
import re
import signal
import threading
import time
import warnings
import zlib
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path

import numpy as np
import torch

import data
import files
import strategies
from files import ProxyAlError, read_json
from phantom import make_phantom_dataset
from report import write_reports
from train import Progress, fmt_s, pick_device
from unet import UNet
from world import World

try:
    import fcntl
except ImportError:
    fcntl = None

MSD_TASKS = {"MSD_Task03": "Task03_Liver", "MSD_Task08": "Task08_HepaticVessel"}
NNUNET_NAME = re.compile(r"Dataset\d{3}_[\w-]+")


class NeedLabels(Exception):
    """Annotation mode: the selected cases need labels before the loop can go on."""


def stage_seed(*parts):
    """A seed per stage, so each stage is reproducible on its own (resume needs no saved RNG streams)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def default_cache():
    """The preprocessed cache when --cache-dir is not given: the user's cache folder ($XDG_CACHE_HOME or
    ~/.cache)/proxy-al, shared by every run (entries are named by their source file and grid)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "proxy-al"


def resolve_data(cfg):
    """Path of the data folder named by --data: demo (the phantom set, generated once under data_root), an MSD
    task under data_root, a folder, or an nnU-Net dataset name (Dataset003_Liver) under $nnUNet_raw."""
    root = Path(cfg.data_root)
    if cfg.data == "demo":
        return Path(make_phantom_dataset(root / "phantom", cfg.phantom_cases, seed=0))
    if cfg.data not in MSD_TASKS and not Path(cfg.data).is_dir() and NNUNET_NAME.fullmatch(cfg.data):
        try:
            return data.nnunet_raw_path(cfg.data)
        except (OSError, ValueError) as err:
            raise ProxyAlError(f"--data {err}") from None
    path = root / MSD_TASKS[cfg.data] if cfg.data in MSD_TASKS else Path(cfg.data)
    if not path.is_dir():
        raise ProxyAlError(f"--data {cfg.data}: no folder at {path.resolve()}. Download the task from "
                         f"http://medicaldecathlon.com (e.g. Task03_Liver.tar), unpack it under {root.resolve()} "
                         f"(or set --data-root / MSD_DATA_ROOT), or pass the task folder itself.")
    return path

# ----------------------------------------------------------------------------- the run folder and its files


MARKER = ".proxy-al-run"     # written first into every run folder: a rerun recognises its own folder by it
RUN_KEYS = {"data", "strategy", "seeds", "k", "iterations", "mc_passes", "hu_band"}   # config.json of an older run


def is_run_folder(out):
    """Whether `out` is a run folder this project made: its marker, or (made before the marker) a config.json
    with the project's keys."""
    if (out / MARKER).is_file():
        return True
    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and RUN_KEYS <= saved.keys()


def check_own_folder(out):
    """A run writes only into a new or empty folder, or into a run folder of its own: never into a user's."""
    if out.exists() and not out.is_dir():
        raise ProxyAlError(f"--out {out}: is a file; give a folder for the run")
    others = sorted(p.name for p in out.iterdir() if p.name not in (".lock", MARKER)) if out.is_dir() else []
    if others and not is_run_folder(out):
        raise ProxyAlError(f"--out {out}: holds {len(others)} file(s) or folder(s) ({data._few(others)}) and is no "
                         f"proxy-al run folder (it has no {MARKER} and no config.json of a run); a run writes only "
                         f"into a new or empty folder, or its own run folder. Choose a new --out, e.g. {out / 'run'}")


@contextmanager
def run_folder(out):
    """Make the run folder (or take an empty one, or one this project made) and hold an exclusive lock on
    out/.lock while the block runs (the OS drops it when the process dies, even by SIGKILL): a second process
    on the same folder stops at once, naming the holder's pid. The temporary files an interrupted run left
    behind (named as files.atomic_write names them, nothing else) are deleted. Yields the folder's Path."""
    out = Path(out)
    check_own_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as f:
        if fcntl is not None:   # POSIX; on Windows the folder is not locked
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                raise ProxyAlError(f"{out}: run folder in use by another proxy-al process (pid "
                                 f"{f.read().strip() or 'unknown'}); wait for it to end, or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        (out / MARKER).touch()
        leftovers = [p for p in out.rglob("*") if files.OWN_TMP.fullmatch(p.name) and p.is_file()]
        for p in leftovers:
            p.unlink(missing_ok=True)
        if leftovers:
            warnings.warn(f"{out}: removed {len(leftovers)} temporary file(s) left by an interrupted run")
        yield out


def state_problem(st):
    """What is wrong with one (seed, strategy) state object, or None."""
    if not isinstance(st, dict):
        return f"expected a JSON object, got {type(st).__name__}"
    if not (isinstance(st.get("labeled"), list) and all(isinstance(c, str) for c in st["labeled"])):
        return "'labeled' must be a list of case ids"
    if not (isinstance(st.get("given", []), list) and all(isinstance(c, str) for c in st.get("given", []))):
        return "'given' must be a list of case ids"
    if not (isinstance(st.get("initial", []), list) and all(isinstance(c, str) for c in st.get("initial", []))):
        return "'initial' must be a list of case ids"
    if not isinstance(st.get("scores"), dict):
        return "'scores' must be an object {case: score}"
    iterations = st.get("iterations")
    if not isinstance(iterations, list):
        return "'iterations' must be a list"
    for j, rec in enumerate(iterations):
        if not (isinstance(rec, dict) and isinstance(rec.get("n_labeled"), int) and isinstance(rec.get("dice"), list)
                and isinstance(rec.get("mean_dice"), (int, float)) and isinstance(rec.get("per_case"), dict)
                and isinstance(rec.get("acquired", []), list)):
            return f"iteration {j + 1} is not a record with n_labeled, dice, mean_dice, per_case"
    return None


def state_file(out, seed, strategy):
    return Path(out) / "state" / f"seed{seed}_{strategy}.json"


def read_states(out, rebuild=False):
    """{seed: {strategy: state}} from out/state/. An invalid file stops the run naming it; with `rebuild`
    it is set aside (.bad) and that run restarts, reloading its finished stages from the checkpoints."""
    states, fix = {}, ("rerun with --rebuild-state to set it aside and rebuild it from the checkpoints "
                       "(training is not redone), or restore it from a backup")
    if (Path(out) / "state.json").exists() and not (Path(out) / "state").exists():
        warnings.warn(f"{out}/state.json is from an older proxy-al: finished stages are reloaded from the checkpoints")
    for path in sorted((Path(out) / "state").glob("seed*_*.json")):
        seed, strategy = path.stem[4:].split("_", 1)
        try:
            states.setdefault(seed, {})[strategy] = read_json(path, state_problem, fix)
        except ProxyAlError:
            if not rebuild:
                raise
            os.replace(path, path.with_suffix(".bad"))
            warnings.warn(f"{path}: invalid, moved to {path.with_suffix('.bad').name}; rebuilding it")
    return states


# A rerun may change what extends or runs the study; every other setting made its saved stages (pseudo labels,
# checkpoints, scores, the split), so a change would mix two studies under one config.json.
MAY_CHANGE = ("strategy", "seeds", "iterations", "k", "device", "workers", "save_maps", "out", "cache_dir", "data",
              "data_root", "preset")


def check_rerun_settings(cfg):
    """A rerun into a run folder keeps every setting its saved stages were made with (all but MAY_CHANGE)."""
    path = Path(cfg.out) / "config.json"
    if not path.exists():
        return
    old = read_json(path, lambda c: None if isinstance(c, dict) else "not a JSON object",
                    "restore it from a backup, or start a new --out")
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))
    show = lambda v: ",".join(map(show, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)
    changed = [f"--{k.replace('_', '-')} {show(new[k])} (the run has {show(old[k])})"
               for k in new if k not in MAY_CHANGE and k in old and old[k] != new[k]]
    if changed:
        raise ProxyAlError(f"{path}: this rerun asks for {'; '.join(changed)}. The run's saved stages (pseudo labels, "
                         "checkpoints, scores, split) were made with its own values, and a rerun may change only "
                         "--strategy, --seeds, --iterations, --k (for the acquisitions still to come), --device, "
                         "--workers, --save-maps and --cache-dir. Rerun with the run's values, or start a new --out")
    older = [k for k in new if k not in MAY_CHANGE and k not in old]
    if older:
        warnings.warn(f"{path}: made by an older proxy-al without {', '.join(older)}; taking this rerun's values")


def read_task(root):
    """(task info, {case id: case}) of a data folder (data.read_task_info, data.read_msd), or ProxyAlError."""
    try:
        task, cases = data.read_task_info(root), {c["id"]: c for c in data.read_msd(root)}
    except (OSError, ValueError) as err:
        raise ProxyAlError(str(err)) from None
    if len(cases) < 2:
        raise ProxyAlError(f"{root}: {len(cases)} case; active learning needs at least 2 cases (a pool to select "
                         "from, and validation cases)")
    if task["num_classes"] < 2:
        raise ProxyAlError(f"{root}/dataset.json: the task has {task['num_classes']} class; segmentation needs "
                         "background and at least one foreground class in 'labels'")
    return task, cases

# ----------------------------------------------------------------------------- the study


class Study:
    """Everything one run shares: config, cases and split, device, state; images, labels and models on demand."""

    def __init__(self, cfg, world=None, rebuild_state=False, default_strategy=False):
        self.cfg, self.t0, self.world = cfg, time.time(), world or World()
        self.default_strategy = default_strategy      # --strategy left to the preset: annotation mode picks one
        self.root = resolve_data(cfg)
        self.out = Path(cfg.out)                  # made and locked by run_folder
        self.cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache()
        self.task, self.cases = read_task(self.root)                        # headers and file names only
        self.num_classes = self.task["num_classes"]
        self.window_hu = data.task_window(self.task["name"], tuple(cfg.window_hu) or None)
        self.device = pick_device(self.world.device(cfg.device))
        many = self.world.size > 1
        self.bar = partial(Progress, prefix=f"[rank {self.world.rank}]" if many else "", poll=self.world.check if many else None)
        self.workers = cfg.workers if cfg.workers >= 0 else (6 if self.device.type == "cuda" else 0)
        self.state = read_states(self.out, rebuild_state)
        self.left_out = {}                                                 # case: why (unreadable files)
        labeled = [cid for cid, c in self.cases.items() if c["label"]]
        self.annotation = len(labeled) < len(self.cases)                  # some scans await annotation
        split = self.load_split(labeled if self.annotation else list(self.cases))
        self.pool, self.val = list(split["pool"]), list(split["val"])
        self.follow_split()
        self.annotation = any(not c["label"] for c in self.cases.values())     # over the split's cases
        self.total = 0                                                     # active iterations, for the ETA
        self.proxy_net, self.scoring = (None, None), {}                   # one seed's Mp; pool scoring progress
        self.boxes = {}                                                    # (case, labeled): its crop, see box()

    def load_split(self, val_candidates):
        """The run's split: split.json if the run has one, else drawn (validation from `val_candidates`, seed 0)
        and written by start(), once every check has passed."""
        path = self.out / "split.json"
        self.new_split = None
        if path.exists():
            try:
                return data.read_split(path)
            except ValueError as err:
                raise ProxyAlError(str(err)) from None
        if self.state or (self.out / "checkpoints").exists():
            raise ProxyAlError(f"{path}: missing, but this run has finished work; a new draw could move annotated "
                             f"or trained-on cases into validation. Restore the file, or start a new --out")
        n_val = self.cfg.n_val or data.default_n_val(self.task["name"], len(self.cases))
        if len(val_candidates) < 2:         # annotation mode with fewer than 2 labeled cases: no validation
            n_val = 0
        elif n_val >= 1:
            n_val = min(int(n_val), len(val_candidates) - 1)       # keep a case for the pool
        try:
            self.new_split = data.split_cases(list(self.cases), n_val, 0, None, val_candidates)
        except ValueError as err:
            raise ProxyAlError(str(err)) from None
        return self.new_split

    def follow_split(self):
        """A rerun on a data folder that changed since split.json was written: images added are not used (the
        split is fixed), a removed pool image that no strategy selected is left out, like an unreadable one; a
        removed validation image, or one a strategy selected, stops the run naming it. One message says it all."""
        path, split_ids = self.out / "split.json", set(self.pool + self.val)
        added = [c for c in self.cases if c not in split_ids]
        removed = [c for c in self.pool + self.val if c not in self.cases]
        selected = {c for by_s in self.state.values() for st in by_s.values() for c in st["labeled"]}
        stop = [c for c in removed if c in self.val or c in selected]
        if stop:
            raise ProxyAlError(f"{self.root}/imagesTr: the image(s) of {data._few(stop)} are gone since this run began, "
                             "but the run validates on them or has selected them (split.json, state/); put the "
                             "files back and rerun, or start a new --out for the data as it is now")
        for c in added:
            del self.cases[c]
        for c in removed:
            self.left_out[c] = "image removed from the data folder after the run began (never selected)"
        self.pool = [c for c in self.pool if c not in removed]
        if added or removed:
            misplaced = [c for c in added if any(c.startswith(f"{o}_") for o in split_ids)]
            hint = (f" ({data._few(misplaced)}: a label saved among the images? A label goes in labelsTr/, named "
                    "as its image)" if misplaced else "")
            warnings.warn(f"{self.root} changed since this run began ({path} fixes its pool and validation): "
                          + (f"{len(added)} image(s) added ({data._few(added)}) are not used{hint}; " if added else "")
                          + (f"{len(removed)} pool image(s) removed ({data._few(removed)}), never selected, are "
                             "left out; " if removed else "")
                          + f"the run goes on with {len(self.pool)} pool and {len(self.val)} validation cases. "
                          "A new --out draws a split that uses every case")

    def log(self, msg):
        LAST_LOG[0] = msg
        rank = f"rank {self.world.rank} " if self.world.size > 1 else ""
        print(f"[{rank}{fmt_s(time.time() - self.t0)}] {msg}", flush=True)

    def progress(self, count=0):
        """Count finished active iterations (all ranks); rank 0 prints the study's progress and ETA."""
        done = self.world.add("iterations", count)
        if self.world.rank == 0 and done and (count or done != getattr(self, "shown", 0)):
            self.shown, eta = done, (time.time() - self.t0) / done * (self.total - done)
            self.log(f"study: {done}/{self.total} active iterations done, ETA {fmt_s(eta)}")

    def signal(self, key):
        """Count one more of `key` for the whole group (a proxy trained, a pool case scored); returns the count."""
        return self.world.add(key)

    def wait_for(self, key, count, what):
        """Wait until the group has counted `count` of `key` (another rank may be doing that work)."""
        self.world.wait(lambda: self.world.add(key, 0) >= count, what, self.log)

    # --- state and checkpoints

    def first_pool(self, strategy):
        """How many cases line 5 selects: k, or every pool case for the all-data reference."""
        return len(self.pool) if strategy.reference else self.cfg.k

    def run_state(self, seed, strategy):
        """The state of one (seed, Strategy): labeled ids, iteration records, the scores that selected each case.
        In annotation mode, the pool cases that had labels when the run began ("given") are in Tl from the start:
        only unlabeled cases are ranked, selected and listed for annotation. Tl is given + line 5's selection
        ("initial") + every record's acquisitions, each case once, whatever --k this rerun has."""
        given = [c for c in self.pool if self.cases[c]["label"]] if self.annotation else []
        st = self.state.setdefault(str(seed), {}).setdefault(
            strategy.name, {"given": given, "initial": [], "labeled": list(given), "iterations": [], "scores": {}})
        given = st.setdefault("given", [])
        if "initial" not in st:                  # a state of an older proxy-al: line 5 took the first k
            st["initial"] = st["labeled"][len(given):len(given) + self.first_pool(strategy)]
        labeled = list(dict.fromkeys(given + st["initial"] + [c for r in st["iterations"] for c in r.get("acquired", [])]))
        if st["labeled"] and labeled != st["labeled"]:        # only a hand-edited or foreign state gets here
            warnings.warn(f"{state_file(self.out, seed, strategy.name)}: 'labeled' disagrees with the iteration records; "
                          f"following the records ({len(labeled)} cases)")
            st["labeled"] = labeled
        return st

    def selections_needed(self, seed, strategy):
        """(cases selected so far, cases selected by the end) of one (seed, Strategy) at this rerun's --k and
        --iterations; the selections already made stay as they are."""
        k, iterations = self.cfg.k, strategy.iterations(self.cfg.iterations)
        st = self.state.get(str(seed), {}).get(strategy.name)
        records = st["iterations"] if st else []
        selected = len(st["labeled"]) - len(st.get("given", [])) if st else 0
        still = 0 if selected else self.first_pool(strategy)                               # line 5
        still += k * max(0, iterations - 1 - len(records))                                 # lines 13 / 16 to come
        if records and "acquired" not in records[-1] and len(records) < iterations:         # a finished run extended
            still += k
        return selected, selected + still

    def save_state(self, seed, strategy):
        """One (seed, strategy)'s state, in one atomic write: its records and the cases they acquired."""
        files.atomic_write_json(state_file(self.out, seed, strategy), self.state[str(seed)][strategy])

    def write_reports(self):
        """results.csv, per_case_dice.csv, summary.md from every state file so far (other ranks' too)."""
        return write_reports(self.out, read_states(self.out), self.task, len(self.pool), self.left_out)

    def saved_array(self, name, make, key):
        """out/<name>.<key's hash>.npy (memory-mapped) if it is there and readable, else make() saved there.
        `key`: everything that made the array (settings, source file), so a changed one is never reused."""
        path = self.out / f"{name}.{zlib.crc32(json.dumps(key).encode()):08x}.npy"
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            array = make()
            files.atomic_save_npy(path, array)
            return array

    def scores_file(self, seed, cid):
        return self.out / "scores" / f"seed{seed}" / f"{cid}.json"

    def has_scores(self, seed, cid):
        """Whether a pool case's scores under the seed's proxy are saved and readable (a damaged file is
        removed with a warning, and the case is scored again)."""
        path = self.scores_file(seed, cid)
        if not path.exists():
            return False
        try:
            self.load_scores(seed, cid, fix="scoring that case again")
            return True
        except ProxyAlError as err:
            warnings.warn(str(err))
            path.unlink(missing_ok=True)
            return False

    def save_scores(self, seed, cid, scores):
        files.atomic_write_json(self.scores_file(seed, cid), scores)

    def load_scores(self, seed, cid, fix="delete it, and rerun to score that case again"):
        """{"variance", "entropy", "bald"} of a pool case under the seed's proxy."""
        ok = lambda s: None if isinstance(s, dict) and all(isinstance(s.get(m), (int, float)) for m in
                                                          strategies.MC_MEASURES) else "not a scores object"
        return read_json(self.scores_file(seed, cid), ok, fix)

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
            if [c for c in ckpt.get("cases") or [] if c not in self.left_out] != list(cases):  # left out since: kept
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
        files.atomic_write(self.out / "checkpoints" / f"{name}.pt", lambda f: torch.save(ckpt, f))

    def proxy(self, seed):
        """Mp of a seed from its checkpoint, kept while this rank works on that seed."""
        if self.proxy_net[0] != seed:
            model = self.new_model(2, seed, "proxy")
            self.load_checkpoint(f"seed{seed}/proxy", model, self.pool)
            self.proxy_net = (seed, model)
        return self.proxy_net[1]

    def final_model(self, seed, strategy, j, record):
        """The model iteration j (from 0) ended with, from its checkpoint: Msemi, or Ms where there was none."""
        return self.stage_model(f"seed{seed}/{strategy.name}/iter{j}_{'semi' if record.get('certain') else 'sup'}")

    def stage_model(self, name):
        """The model a finished stage saved (checkpoints/<name>.pt), in eval mode."""
        model = self.new_model(self.num_classes, name)
        path = self.out / "checkpoints" / f"{name}.pt"
        model.load_state_dict(torch.load(path, map_location=self.device, weights_only=False)["model"])
        return model.eval()

    # --- images and labels

    def box(self, cid, labeled=False):
        """The voxels the loop works on, three slices into the cached grid: with --crop body the body box
        (data.body_box; with `labeled`, extended to the annotation's foreground), else the whole volume. Once
        per case: every stage of the run sees the same crop."""
        key = (cid, labeled and self.cfg.crop == "body")
        if key not in self.boxes:
            full = data.cached_case(self.cases[cid], self.cache, self.cfg.spacing_mm, with_label=False)[0]
            self.boxes[key] = (tuple(slice(0, n) for n in full.shape) if self.cfg.crop == "none" else
                               data.body_box(full, self.window_hu, self.label(cid) if labeled else None))
        return self.boxes[key]

    def image(self, cid, labeled=False):
        """Windowed image (X, Y, Z) float32 in [0, 1] on the cached, resampled grid, cut to box(cid, labeled)."""
        return data.window(self.image_hu(cid, labeled), *self.window_hu)

    def image_hu(self, cid, labeled=False):
        """HU (X, Y, Z) int16 on the cached, resampled grid, cut to box(cid, labeled)."""
        full = data.cached_case(self.cases[cid], self.cache, self.cfg.spacing_mm, with_label=False)[0]
        return full[self.box(cid, labeled)]

    def uncrop(self, cid, volume):
        """A volume computed on image(cid) back on the case's cached grid (zeros outside the box)."""
        full = data.cached_case(self.cases[cid], self.cache, self.cfg.spacing_mm, with_label=False)[0]
        return data.uncrop(volume, self.box(cid), full.shape)

    def label(self, cid):
        """The annotation of a case. Read only for selected pool cases and validation cases (oracle mode);
        a label that does not fit the task stops the run (finished iterations are saved)."""
        try:
            return data.cached_case(self.cases[cid], self.cache, self.cfg.spacing_mm, num_classes=self.num_classes)[1]
        except (OSError, ValueError, data.CacheError) as err:
            raise ProxyAlError(f"case {cid}: {err}") from None

    def labeled_volume(self, cid, label=None):
        """(image_hu, label, foreground index) for a PatchStream: the annotation on box(cid, labeled=True), or
        `label` made on image(cid) (a pseudo or noisy label)."""
        if label is None:
            box = self.box(cid, labeled=True)
            image_hu, label = self.image_hu(cid, labeled=True), np.asarray(self.label(cid)[box])
        else:
            image_hu = self.image_hu(cid)
        return image_hu, label, data.foreground_index(label)

    def labeled_case(self, cid):
        """(image (X, Y, Z) in [0, 1], annotation) on box(cid, labeled=True), for the validation Dice: outside
        the box the label is background, and there a prediction counts as background."""
        return self.image(cid, labeled=True), np.asarray(self.label(cid)[self.box(cid, labeled=True)])

# ----------------------------------------------------------------------------- before the long work


def choose_strategies(study):
    """The strategies to run (Strategy values); annotation mode with the preset's choice runs the paper's best,
    one seed."""
    cfg = study.cfg
    if study.annotation and study.default_strategy:
        cfg.seeds = cfg.seeds[:1]
        study.log(f"annotation mode ({sum(not c['label'] for c in study.cases.values())} unlabeled cases): "
                  f"strategy proxyrank_var_semi, seed {cfg.seeds[0]} (set --strategy/--seeds to change)")
        return [strategies.parse("proxyrank_var_semi")]
    try:
        return strategies.choose(cfg.strategy)
    except ValueError as err:
        raise ProxyAlError(str(err)) from None


def check_request(study, chosen):
    """Every mistake in the request that can be seen before the long work starts."""
    cfg = study.cfg
    if study.annotation and study.world.size > 1:
        raise ProxyAlError("annotation mode (pool cases without labels) runs as one process: use python al_loop.py, "
                         "not torchrun")
    if study.annotation and any(s.reference for s in chosen):
        raise ProxyAlError(f"--strategy {strategies.REFERENCE}: the all-data reference needs every pool case labeled; "
                         "run it on a fully labeled data set")
    if study.annotation and (len(chosen) > 1 or len(cfg.seeds) > 1):
        raise ProxyAlError("annotation mode (pool cases without labels): choose one --strategy and one --seeds, "
                         "e.g. --strategy proxyrank_var_semi --seeds 0")
    for seed in cfg.seeds:
        for strategy in chosen:
            selected, need = study.selections_needed(seed, strategy)
            so_far = f" ({selected} selected so far)" if selected else ""
            if study.annotation:
                st = study.state.get(str(seed), {}).get(strategy.name)
                given = st["given"] if st else [c for c in study.pool if study.cases[c]["label"]]
                free = len(study.pool) - len(given)
                if need > free:
                    raise ProxyAlError(f"--k {cfg.k} x --iterations {cfg.iterations} asks for {need} cases to annotate"
                                     f"{so_far}, but the pool has {free} cases besides the {len(given)} labeled when "
                                     "the run began; lower --k or --iterations")
            elif need > len(study.pool):
                raise ProxyAlError(f"--n-val {cfg.n_val:g} leaves {len(study.pool)} pool case{'s' * (len(study.pool) != 1)} "
                                 f"of {len(study.pool) + len(study.val)}, but --k {cfg.k} x --iterations {cfg.iterations} "
                                 f"needs {need}{so_far}; lower --n-val, --k or --iterations")
    need = cfg.k * cfg.iterations
    if any(s.semi for s in chosen) and need >= len(study.pool) and not study.annotation:
        warnings.warn(f"--k {cfg.k} x --iterations {cfg.iterations} labels all {len(study.pool)} pool cases: the "
                      "last iteration of a _semi strategy has no unlabeled case left and skips its fine-tuning")
    unknown = {c for by_s in study.state.values() for st in by_s.values() for c in st["labeled"]} - set(study.pool)
    if unknown:
        why = "; ".join(f"{c}: {study.left_out.get(c, 'not in split.json')}" for c in sorted(unknown)[:5])
        raise ProxyAlError(f"{study.out}/state: this run selected or trained on cases that it cannot read now ({why}). "
                         "Put their files back as they were and rerun, or start a new --out")


def preprocess_all(study):
    """Resample every image into the cache once. A case whose own file is unreadable is left out with a
    warning (and listed in summary.md); a cache that cannot be written stops the run."""
    world = study.world
    if world.size > 1:      # each rank builds its share of the cache, then every rank reads it all
        for case in list(study.cases.values())[world.rank::world.size]:
            try:
                data.cached_case(case, study.cache, study.cfg.spacing_mm, with_label=False)
            except data.CacheError as err:
                raise ProxyAlError(str(err)) from None
            except (OSError, ValueError):
                pass        # reported by the pass below
        world.add("preprocessed")
        world.wait(lambda: world.add("preprocessed", 0) == world.size, "the other ranks' preprocessing", study.log)
    progress = study.bar("preprocess", len(study.cases))
    for i, (cid, case) in enumerate(list(study.cases.items()), 1):
        try:
            data.cached_case(case, study.cache, study.cfg.spacing_mm, with_label=False)
        except data.CacheError as err:
            raise ProxyAlError(str(err)) from None
        except (OSError, ValueError) as err:
            warnings.warn(f"case {cid} left out: {err}")
            study.left_out[cid] = str(err)
            del study.cases[cid]
        progress.update(i)
    if not study.cases:
        raise ProxyAlError(f"{study.root}: no readable case")
    study.val = [c for c in study.val if c in study.cases]
    study.pool = [c for c in study.pool if c in study.cases]
    return study


def check_labels(study):
    """Before any training: every label file's grid against its image (headers only), and its values (read
    into the cache; a pool label is still used only once its case is selected). A validation label without
    foreground is named: it is left out of every class's mean (MONAI's rule)."""
    problems = [f"{study.cases[c]['label_to']}: missing, but {c} is a validation case of this run (split.json); put "
                "its label back, or start a new --out" for c in study.val if not study.cases[c]["label"]]
    for case in study.cases.values():
        try:
            if case["label"]:
                data.check_same_grid(case["image"], case["label"])
        except (OSError, ValueError) as err:
            problems.append(str(err))
    if problems:
        raise ProxyAlError(f"{len(problems)} label file(s) are missing or do not fit their image:\n" + "\n".join(problems))
    for cid, case in study.cases.items():
        if case["label"]:
            label = study.label(cid)
            if cid in study.val and not label.any():
                warnings.warn(f"{case['label']}: validation label without foreground; this case counts in no "
                              "class's Dice (MONAI's rule). Check the file, or relabel it")


def start(study, chosen):
    """Warn about changed settings, save config.json, and count the iterations ahead (for the ETA)."""
    cfg = study.cfg
    if not study.val:
        warnings.warn("no labeled validation case: validation Dice is skipped (results will show nan)")
    if study.world.rank == 0:      # the same settings as the run's (check_rerun_settings), but what may change
        files.atomic_write_json(study.out / "config.json", dataclasses.asdict(cfg))
        if study.new_split:                     # the split is fixed only now that every check has passed
            files.atomic_write_json(study.out / "split.json", {"seed": 0, "n_val": len(study.new_split["val"]),
                                                              **study.new_split})
    study.total = sum(s.iterations(cfg.iterations) - len(study.state.get(str(seed), {}).get(s.name, {}).get("iterations", []))
                      for seed in cfg.seeds for s in chosen)
    study.log(f"{study.task['name']}: {len(study.pool)} pool, {len(study.val)} validation cases; "
              f"{len(chosen)} strategies x {len(cfg.seeds)} seeds; device {study.device}; out {study.out}; "
              f"cache {study.cache}"
              + (f"; {study.world.size} ranks" if study.world.size > 1 else ""))

# ----------------------------------------------------------------------------- the queue


def run(cfg, plan, run_unit, rebuild_state=False, default_strategy=False):
    """The whole study on this process: rank 0 holds the run folder for the group; every rank takes units of
    plan(study, strategies) from the queue and runs run_unit(study, kind, seed, what); rank 0 then waits for
    all and writes the reports. Annotation mode stops (exit 0) once the selected cases need labels."""
    world = World()
    main_thread = threading.current_thread() is threading.main_thread()     # only there can it take signals
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None   # SLURM's preemption
    existed = None
    try:
        if world.rank == 0:
            cfg.out = cfg.out or f"runs/{Path(cfg.data).name}-{time.strftime('%Y%m%d-%H%M%S')}"
            check_out(cfg)
            existed = Path(cfg.out).exists()
            with run_folder(cfg.out):
                world.set("out", cfg.out)
                return _run(cfg, world, plan, run_unit, rebuild_state, default_strategy)
        world.wait(lambda: world.ask("check", ["out"]), "rank 0 to lock the run folder", print)
        cfg.out = world.get("out")
        return _run(cfg, world, plan, run_unit, rebuild_state, default_strategy)
    except NeedLabels as stop:
        print(stop)
        return 0
    except Terminated:
        print(f"SIGTERM: stopped during \"{LAST_LOG[0]}\". Every finished stage is saved in {cfg.out}; rerun the "
              "same command to continue from there.", flush=True)
        world.fail(f"rank {world.rank}: SIGTERM")
        return 128 + signal.SIGTERM
    except BaseException as err:
        world.fail(f"rank {world.rank}: {err!r}"[:2000])
        full = None if isinstance(err, ProxyAlError) else disk_full(err)     # already its own message
        if full:
            raise ProxyAlError(f"{full.filename or cfg.out}: no space left on the disk ({full.strerror}). Free space "
                             f"there (or choose another --out / --cache-dir) and rerun the same command: every "
                             f"finished stage is kept and nothing was corrupted") from None
        raise
    finally:
        if existed is not None and Path(cfg.out).is_dir() and not (Path(cfg.out) / "config.json").exists():  # refused:
            for name in (".lock", MARKER):                                              # no trace
                (Path(cfg.out) / name).unlink(missing_ok=True)
            if not existed:
                with suppress(OSError):
                    Path(cfg.out).rmdir()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        world.close()


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, as KeyboardInterrupt: a handler of a file's errors (`except Exception`)
    must not take it for a damaged file when it lands during a read."""


def _terminated(signum, frame):
    raise Terminated()


LAST_LOG = ["start"]    # the last progress line, for the SIGTERM message


def disk_full(err):
    """The OSError 'no space left' (or quota) somewhere in err's chain (torch.save wraps it), or None."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        err = err.__cause__ or err.__context__
    return None


def check_out(cfg):
    """--out must not be, or lie inside, the data folder: a run never writes into a data set. (A folder that is
    no data set is named as such first.)"""
    root, out = resolve_data(cfg).resolve(), Path(cfg.out).resolve()
    read_task(root)
    if out == root or root in out.parents:
        where = "is the data folder" if out == root else f"lies inside the data folder {root}"
        raise ProxyAlError(f"--out {cfg.out}: {where}; a run writes config.json, split.json, "
                         "state/ and checkpoints there. Choose a folder outside the data set, e.g. runs/<name>")


def _run(cfg, world, plan, run_unit, rebuild_state, default_strategy):
    check_rerun_settings(cfg)
    study = Study(cfg, world, rebuild_state, default_strategy)
    chosen = choose_strategies(study)
    check_request(study, chosen)
    preprocess_all(study)
    check_request(study, chosen)            # again: unreadable cases may have left the pool
    check_labels(study)
    start(study, chosen)
    world.work(plan(study, chosen), lambda *unit: run_unit(study, *unit))
    world.add("finished")
    if world.rank:
        return 0
    world.wait(lambda: study.progress() or world.add("finished", 0) == world.size, "the other ranks", study.log)
    print(study.write_reports())
    study.log(f"done: results.csv, per_case_dice.csv, summary.md in {study.out}")
    return 0


def saved_run(cfg):
    """(data folder, split) of the run folder --out, from its config.json and split.json."""
    out = Path(cfg.out)
    saved = read_json(out / "config.json", lambda c: None, "give --out a run folder")
    root = resolve_data(dataclasses.replace(cfg, **{k: saved[k] for k in ("data", "data_root", "phantom_cases")}))
    return root, read_json(out / "split.json", lambda s: None, "give --out a run folder")


def export_nnunet(cfg, actions):
    """--export-nnunet ID: the cases one (strategy, seed, iteration) of the run had labeled, and the run's
    validation cases, as the nnU-Net raw dataset DatasetID_<task name> (nnunet.export_run)."""
    import nnunet
    root, split = saved_run(cfg)
    task, cases = read_task(root)
    strategy = None if actions.default_strategy else cfg.strategy
    try:
        nnunet.export_run(cfg.out, cases, read_states(cfg.out), split, task["labels"], actions.export_nnunet,
                          re.sub(r"\W+", "", task["name"].title()) or "Selection", actions.export_to or None,
                          strategy, actions.seed, actions.iteration, actions.overwrite)
    except (OSError, ValueError) as err:
        raise ProxyAlError(f"--export-nnunet: {err}") from None
    return 0


def report_only(cfg):
    """--report: the reports of --out from its state files so far, without touching a running study."""
    root, split = saved_run(cfg)
    states = read_states(cfg.out)
    if not any(st["iterations"] for by_s in states.values() for st in by_s.values()):
        print(f"{cfg.out}: no iteration has finished yet ({sum(map(len, states.values()))} (seed, strategy) runs "
              "started), so there is nothing to report; the study writes its reports after each iteration")
        return 0
    print(write_reports(Path(cfg.out), states, data.read_task_info(root), len(split["pool"])))
    return 0
