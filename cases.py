"""The cases of one run: the data folder's images and labels (file names until voxels are needed), the pool /
validation split (split.json), the crop of each case, preprocessing into the cache, and the label checks
before any training. Volumes come from the cache on the run's grid, cut to the case's box.
"""
import json
import os
import warnings
from pathlib import Path

import numpy as np

import data
from annotate import ASKED
from data import foreground_index
import folders
from files import ProxyAlError, atomic_write_json, few, fingerprint, read_json
from folders import natural_key
from phantom import make_phantom_dataset

MSD_TASKS = {"MSD_Task03": "Task03_Liver", "MSD_Task08": "Task08_HepaticVessel"}
# Paper splits: Task03 105 pool / 26 validation; Task08 242 pool / 61 validation.
PAPER_N_VAL = {"Task03_Liver": 26, "Task08_HepaticVessel": 61}


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
    if cfg.data not in MSD_TASKS and not Path(cfg.data).is_dir() and folders.NNUNET_NAME.fullmatch(cfg.data):
        try:
            return folders.nnunet_raw_path(cfg.data)
        except (OSError, ValueError) as err:
            raise ProxyAlError(f"--data {err}") from None
    path = root / MSD_TASKS[cfg.data] if cfg.data in MSD_TASKS else Path(cfg.data)
    if not path.is_dir():
        raise ProxyAlError(f"--data {cfg.data}: no folder at {path.resolve()}. Download the task from "
                           f"http://medicaldecathlon.com (e.g. Task03_Liver.tar), unpack it under {root.resolve()} "
                           f"(or set --data-root / MSD_DATA_ROOT), or pass the task folder itself.")
    return path


def read_task(root):
    """(task info, {case id: case}) of a data folder (folders.read_task_info, folders.read_msd), or ProxyAlError."""
    try:
        task, cases = folders.read_task_info(root), {c["id"]: c for c in folders.read_msd(root)}
    except (OSError, ValueError) as err:
        raise ProxyAlError(str(err)) from None
    if len(cases) < 2:
        raise ProxyAlError(f"{root}: {len(cases)} case; active learning needs at least 2 cases (a pool to select "
                           "from, and validation cases)")
    if task["num_classes"] < 2:
        raise ProxyAlError(f"{root}/dataset.json: the task has {task['num_classes']} class; segmentation needs "
                           "background and at least one foreground class in 'labels'")
    return task, cases


# ----------------------------------------------------------------------------- the pool / validation split
# Fixed by seed and saved, so every strategy and repeat sees the same split.


def default_n_val(task_name: str, n_cases: int) -> int:
    """Validation size: the paper's for Task03 (26) and Task08 (61) when the set is big enough, else 20 %.

    Always leaves at least one pool case and one validation case.
    """
    if n_cases < 2:
        raise ValueError(f"need at least 2 cases for a pool / validation split, got {n_cases}")
    task = data.match_task(task_name)
    if task and n_cases > PAPER_N_VAL[task]:
        return PAPER_N_VAL[task]
    return int(min(max(1, round(0.2 * n_cases)), n_cases - 1))


def _resolve_n_val(n_val, n_cases):
    """n_val as a count: int as given, or a float in (0, 1) taken as a fraction of n_cases."""
    if isinstance(n_val, bool) or not isinstance(n_val, (int, float, np.integer, np.floating)):
        raise ValueError(f"n_val must be an int or a fraction in (0, 1), got {n_val!r}")
    if isinstance(n_val, (float, np.floating)):
        if not 0 < n_val < 1:
            raise ValueError(f"n_val as a fraction must lie in (0, 1), got {n_val}")
        n_val = min(max(1, round(n_val * n_cases)), n_cases - 1)
    if not 0 <= n_val <= n_cases - 1:
        raise ValueError(f"n_val={n_val} must leave at least one of the {n_cases} cases in the pool")
    return int(n_val)


def read_split(path) -> dict:
    """A saved split {"pool": [ids], "val": [ids]}, checked: lists of case ids, each once. ValueError naming
    the file otherwise."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        pool, val = list(saved["pool"]), list(saved["val"])
        if not all(isinstance(c, str) for c in pool + val):
            raise TypeError("pool and val must be lists of case ids")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid split file ({e}); restore it from a backup, or start a new run "
                         "folder (a new split would move cases between pool and validation)") from e
    if len(set(pool + val)) != len(pool) + len(val):
        raise ValueError(f"{path}: a case appears twice in pool/val; delete the split file to make a new one")
    extra = {k: saved[k] for k in ("test", "given") if k in saved}
    if not all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in extra.values()):
        raise ValueError(f"{path}: 'test' and 'given' must be lists of case ids; restore the file from a backup")
    if set(extra.get("test", [])) & set(pool + val):
        raise ValueError(f"{path}: a test case is also in pool or val; restore the file from a backup")
    return {"pool": pool, "val": val, **extra}


def _reload_split(path, case_ids):
    """Read a saved split and check it names only known cases."""
    split = read_split(path)
    unknown = sorted(set(split["pool"] + split["val"]) - set(case_ids))
    if unknown:
        raise ValueError(f"{path}: names cases not in the data set: {unknown[:10]}; "
                         "delete the split file or point to the data set it was made for")
    missing = set(case_ids) - set(split["pool"] + split["val"])
    if missing:
        warnings.warn(f"{path}: {len(missing)} cases of the data set are in neither pool nor val ({few(missing)}); "
                      "they are unused")
    return split


def split_cases(case_ids: list, n_val, seed: int, path, candidates: list | None = None, n_test=0) -> dict:
    """Split case ids into {"pool": [ids], "val": [ids]} (and "test": [ids] with n_test), deterministic by seed.

    If `path` exists the saved split is reloaded (and checked against case_ids); otherwise n_val validation
    cases are drawn from `candidates` (default: all; in annotation mode, the labeled cases) by a
    np.random.default_rng(seed) permutation of the naturally sorted ids, then n_test test cases next in that
    order; the rest of case_ids is the pool, and the split is written atomically as JSON. n_val, n_test: int
    counts, or floats in (0, 1) for a fraction of the candidates.
    """
    case_ids = sorted(set(case_ids), key=natural_key)
    if path is not None and Path(path).is_file():
        return _reload_split(path, case_ids)
    candidates = case_ids if candidates is None else sorted(set(candidates), key=natural_key)
    n_val = _resolve_n_val(n_val, len(candidates)) if n_val else 0
    n_test = _resolve_n_val(n_test, len(candidates) - n_val) if n_test else 0
    order = np.random.default_rng(int(seed)).permutation(len(candidates))
    val = sorted((candidates[i] for i in order[:n_val]), key=natural_key)
    test = sorted((candidates[i] for i in order[n_val:n_val + n_test]), key=natural_key)
    pool = [c for c in case_ids if c not in set(val + test)]
    split = {"pool": pool, "val": val, **({"test": test} if n_test else {})}
    if path is not None:
        atomic_write_json(path, {"seed": int(seed), "n_val": n_val, **split})
    return split


def load_split(run, task_name, case_ids, val_candidates, n_val, n_test=0):
    """(split, new): the run's split.json if it has one (new False), else a split drawn now (validation from
    `val_candidates`, seed 0) that start() writes once every check has passed (new True)."""
    path = run.path / "split.json"
    if path.exists():
        try:
            return read_split(path), False
        except ValueError as err:
            raise ProxyAlError(str(err)) from None
    if run.has_finished_work():
        raise ProxyAlError(f"{path}: missing, but this run has finished work; a new draw could move annotated "
                           f"or trained-on cases into validation. Restore the file, or start a new --out")
    n_val = n_val or default_n_val(task_name, len(case_ids))
    if len(val_candidates) < 2:         # annotation mode with fewer than 2 labeled cases: no validation
        n_val = 0
    elif n_val >= 1:
        n_val = min(int(n_val), len(val_candidates) - 1)       # keep a case for the pool
    n_test = int(n_test) if n_test >= 1 else n_test              # a count, or a fraction of the candidates
    if n_test and n_val + (n_test if n_test >= 1 else 1) > len(val_candidates) - 1:
        raise ProxyAlError(f"--n-test {n_test:g}: with {n_val} validation cases it leaves no labeled case of the "
                           f"{len(val_candidates)} for the pool; lower --n-test or --n-val")
    try:
        return split_cases(list(case_ids), n_val, 0, None, val_candidates, n_test), True
    except ValueError as err:
        raise ProxyAlError(str(err)) from None


def given_cases(cases, split, run):
    """The pool cases labeled when an annotation run began, in Tl of every strategy from the start: from
    split.json, else (an older run) from a state file, else the pool cases with a label file now."""
    if "given" in split:
        return [c for c in split["given"] if c in cases.pool]
    saved = [[u.case for u in st.given] for by_s in run.saved.values() for st in by_s.values()]
    if saved:
        return [c for c in saved[0] if c in cases.pool]
    return [c for c in cases.pool if cases.files[c]["label"]]


class Cases:
    """The run's cases: `files` {id: {"image", "label" (None: not annotated yet), "label_to"}}, the split
    (`pool`, `val`), `left_out` {id: why}, and `annotation` (some cases await a label, or boxes of them were
    asked for). Volumes on demand."""

    def __init__(self, cfg, run):
        self.root, self.spacing_mm, self.crop = resolve_data(cfg), tuple(cfg.spacing_mm), cfg.crop
        self.cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache()
        self.task, self.files = read_task(self.root)                        # headers and file names only
        self.num_classes = self.task["num_classes"]
        self.window_hu = data.task_window(self.task["name"], tuple(cfg.window_hu) or None)
        self.left_out, self._boxes = {}, {}                               # case: why; (case, labeled): its box
        labeled = [cid for cid, c in self.files.items() if c["label"]]
        split, new = load_split(run, self.task["name"], list(self.files),
                                labeled if len(labeled) < len(self.files) else list(self.files), cfg.n_val, cfg.n_test)
        self.pool, self.val, self.test = list(split["pool"]), list(split["val"]), list(split.get("test", []))
        self._follow_split(run.path / "split.json", run.selected())
        # Annotation mode: some case awaits a label, or the run began so ("given" in split.json: a label file of
        # a box case holds only the boxes asked for, so a run stays in annotation mode once every case has one).
        # Older runs without "given": a run that asked for boxes (to_annotate/asked.json) is one too.
        self.annotation = (any(not c["label"] for c in self.files.values()) or "given" in split
                           or (cfg.query == "patch" and (run.path / ASKED).exists()))
        self.given = given_cases(self, split, run) if self.annotation else []   # labeled when the run began
        self.new_split = split if new else None                          # start() writes it once checks pass
        if self.annotation and "given" not in split:
            self.new_split = {**split, "given": self.given}

    def _follow_split(self, path, selected):
        """A rerun on a data folder that changed since split.json was written: images added are not used (the
        split is fixed), a removed pool image that no strategy selected is left out, like an unreadable one; a
        removed validation image, or one a strategy selected, stops the run naming it. One message says it all."""
        split_ids = set(self.pool + self.val + self.test)
        added = [c for c in self.files if c not in split_ids]
        removed = [c for c in self.pool + self.val + self.test if c not in self.files]
        stop = [c for c in removed if c in self.val or c in self.test or c in selected]
        if stop:
            raise ProxyAlError(f"{self.root}/imagesTr: the image(s) of {few(stop)} are gone since this run began, "
                               "but the run validates on them or has selected them (split.json, state/); put the "
                               "files back and rerun, or start a new --out for the data as it is now")
        for c in added:
            del self.files[c]
        for c in removed:
            self.left_out[c] = "image removed from the data folder after the run began (never selected)"
        self.pool = [c for c in self.pool if c not in removed]
        if added or removed:
            misplaced = [c for c in added if any(c.startswith(f"{o}_") for o in split_ids)]
            hint = (f" ({few(misplaced)}: a label saved among the images? A label goes in labelsTr/, named "
                    "as its image)" if misplaced else "")
            warnings.warn(f"{self.root} changed since this run began ({path} fixes its pool and validation): "
                          + (f"{len(added)} image(s) added ({few(added)}) are not used{hint}; " if added else "")
                          + (f"{len(removed)} pool image(s) removed ({few(removed)}), never selected, are "
                             "left out; " if removed else "")
                          + f"the run goes on with {len(self.pool)} pool and {len(self.val)} validation cases. "
                          "A new --out draws a split that uses every case")

    def preprocess(self, ids, progress):
        """Resample the images of `ids` into the cache once. A case whose own file is unreadable is left out
        with a warning (and listed in summary.md); a cache that cannot be written stops the run. `progress`:
        a Progress over len(ids), or None to leave unreadable files to a later pass."""
        for i, cid in enumerate(ids, 1):
            try:
                data.cached_case(self.files[cid], self.cache, self.spacing_mm, with_label=False)
            except data.CacheError as err:
                raise ProxyAlError(str(err)) from None
            except (OSError, ValueError) as err:
                if progress is not None:
                    warnings.warn(f"case {cid} left out: {err}")
                    self.left_out[cid] = str(err)
                    del self.files[cid]
            if progress is not None:
                progress.update(i)
        if not self.files:
            raise ProxyAlError(f"{self.root}: no readable case")
        self.val = [c for c in self.val if c in self.files]
        self.test = [c for c in self.test if c in self.files]
        self.pool = [c for c in self.pool if c in self.files]

    def check_labels(self):
        """Before any training: every label file's grid against its image (headers only), and its values (read
        into the cache; a pool label is still used only once its case is selected). A validation label without
        foreground is named: it is left out of every class's mean (MONAI's rule)."""
        problems = [f"{self.files[c]['label_to']}: missing, but {c} is a validation case of this run (split.json); "
                    "put its label back, or start a new --out" for c in self.val + self.test
                    if not self.files[c]["label"]]
        for case in self.files.values():
            try:
                if case["label"]:
                    data.check_same_grid(case["image"], case["label"])
            except (OSError, ValueError) as err:
                problems.append(str(err))
        if problems:
            raise ProxyAlError(f"{len(problems)} label file(s) are missing or do not fit their image:\n"
                               + "\n".join(problems))
        for cid, case in self.files.items():
            if case["label"] and not self.label(cid).any() and cid in self.val + self.test:
                warnings.warn(f"{case['label']}: validation label without foreground; this case counts in no "
                              "class's Dice (MONAI's rule). Check the file, or relabel it")

    # --- volumes

    def _full(self, cid):
        return data.cached_case(self.files[cid], self.cache, self.spacing_mm, with_label=False)[0]

    def box(self, cid, labeled=False):
        """The voxels the loop works on, three slices into the cached grid: with --crop body the body box
        (data.body_box; with `labeled`, extended to the annotation's foreground), else the whole volume. Once
        per case: every stage of the run sees the same crop."""
        key = (cid, labeled and self.crop == "body")
        if key not in self._boxes:
            full = self._full(cid)
            self._boxes[key] = (tuple(slice(0, n) for n in full.shape) if self.crop == "none" else
                                data.body_box(full, self.window_hu, self.label(cid) if labeled else None))
        return self._boxes[key]

    def image(self, cid, labeled=False):
        """Windowed image (X, Y, Z) float32 in [0, 1] on the cached, resampled grid, cut to box(cid, labeled)."""
        return data.window(self.image_hu(cid, labeled), *self.window_hu)

    def image_hu(self, cid, labeled=False):
        """HU (X, Y, Z) int16 on the cached, resampled grid, cut to box(cid, labeled)."""
        return self._full(cid)[self.box(cid, labeled)]

    def uncrop(self, cid, volume):
        """A volume computed on image(cid) back on the case's cached grid (zeros outside the box)."""
        return data.uncrop(volume, self.box(cid), self._full(cid).shape)

    def label(self, cid):
        """The annotation of a case on the cached grid. Read only for selected pool cases and validation cases
        (oracle mode); a label that does not fit the task stops the run (finished iterations are saved)."""
        try:
            return data.cached_case(self.files[cid], self.cache, self.spacing_mm, num_classes=self.num_classes)[1]
        except (OSError, ValueError, data.CacheError) as err:
            raise ProxyAlError(f"case {cid}: {err}") from None

    def labeled_volume(self, cid, label=None):
        """(image_hu, label, foreground index) for a PatchStream: the annotation on box(cid, labeled=True), or
        `label` made on image(cid) (a pseudo or noisy label)."""
        if label is None:
            image_hu, label = self.image_hu(cid, labeled=True), np.asarray(self.label(cid)[self.box(cid, labeled=True)])
        else:
            image_hu = self.image_hu(cid)
        return image_hu, label, foreground_index(label)

    def labeled_case(self, cid):
        """(image (X, Y, Z) in [0, 1], annotation) on box(cid, labeled=True), for the validation Dice: outside
        the box the label is background, and there a prediction counts as background."""
        return self.image(cid, labeled=True), np.asarray(self.label(cid)[self.box(cid, labeled=True)])


# ----------------------------------------------------------------------------- the files a rerun must find


def sources(cases):
    """{case: {"image": files.fingerprint, "label": fingerprint or None}} of the files every rerun must find as
    they were: each image of the split, and the labels that are not annotations to come (validation labels,
    the cases labeled when an annotation run began, every label of a simulated run)."""
    fixed = set(cases.val + cases.test) | set(cases.given) | (set() if cases.annotation else set(cases.pool))
    return {c: {"image": fingerprint(cases.files[c]["image"]),
                "label": fingerprint(cases.files[c]["label"]) if c in fixed and cases.files[c]["label"] else None}
            for c in cases.pool + cases.val + cases.test}


def check_sources(cases, path):
    """Stop when a file of the split differs from the one the run began with (`path`: sources.json), so that
    another --data folder (a moved or restored copy) is taken only when it holds the same files. Returns the
    sources as they are now, for the file (an older run gets it at its first rerun)."""
    now = sources(cases)
    if not Path(path).exists():
        return now
    saved = read_json(path, lambda s: None if isinstance(s, dict) else "not a JSON object",
                      "restore it from a backup, or delete it to trust the data folder as it is now")
    changed = [f"{c} ({kind})" for c, was in saved.items() if c in now and isinstance(was, dict)
               for kind in ("image", "label") if was.get(kind) and now[c][kind] and was[kind] != now[c][kind]]
    if changed:
        raise ProxyAlError(f"{cases.root}: the files of {few(changed)} differ from those this run began with "
                           f"({path}: size and CRC-32 of each file's ends), so its saved stages do not fit "
                           "them. Point --data to the data this run used (a moved or copied folder with the "
                           "same files is fine), put the files back, or start a new --out")
    return {c: {k: now[c][k] or (saved.get(c) or {}).get(k) for k in now[c]} for c in now}
