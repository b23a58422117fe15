"""The run folder (--out): everything a rerun needs to go on is in it. Its lock and marker, config.json, the
state file of each (seed, strategy), the proxy's pool scores, checkpoints and saved arrays. Nothing here knows
the method; a file that cannot be used ends in ProxyAlError naming it and the fix.

    out/.proxy-al-run, .lock                  the marker (a rerun recognises its own folder) and the lock
    out/config.json, split.json               the settings; pool and validation (cases.py)
    out/state/seed<S>_<strategy>.json         a RunState
    out/scores/seed<S>/<case>.json            MC-dropout scores of a pool case under the seed's proxy
    out/checkpoints/<key>.pt                  the weights a finished stage saved
    out/<name>.<hash of what made it>.npy     saved arrays (pseudo labels)
    out/to_annotate/asked.json                annotation mode with boxes: each box's label when asked (CRC-32)
    out/times/<start>-<pid>.json              the wall seconds of each stage, per process (summary.md sums them)
"""
import json
import os
import shutil
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import files
from files import ProxyAlError, few, read_json
from state import RunState
from strategies import MC_MEASURES


try:
    import fcntl
except ImportError:
    fcntl = None

MARKER = ".proxy-al-run"     # written first into every run folder: a rerun recognises its own folder by it
RUN_KEYS = {"data", "strategy", "seeds", "k", "iterations", "mc_passes", "hu_band"}   # config.json of an older run
# A rerun may change what extends or runs the study; every other setting made its saved stages (pseudo labels,
# checkpoints, scores, the split), so a change would mix two studies under one config.json.
MAY_CHANGE = ("strategy", "seeds", "iterations", "k", "device", "workers", "save_maps", "out", "cache_dir", "data",
              "data_root", "preset")


def state_file(out, seed, strategy):
    return Path(out) / "state" / f"seed{seed}_{strategy}.json"


def read_states(out, rebuild=False):
    """{seed: {strategy: state.RunState}} from out/state/. An invalid file stops the run naming it; with `rebuild`
    it is set aside (.bad) and that run restarts, reloading its finished stages from the checkpoints."""
    states, fix = {}, ("rerun with --rebuild-state to set it aside and rebuild it from the checkpoints "
                       "(training is not redone), or restore it from a backup")
    if (Path(out) / "state.json").exists() and not (Path(out) / "state").exists():
        warnings.warn(f"{out}/state.json is from an older proxy-al: finished stages are reloaded from the checkpoints")
    for path in sorted((Path(out) / "state").glob("seed*_*.json")):
        seed, strategy = path.stem[4:].split("_", 1)
        try:
            states.setdefault(seed, {})[strategy] = read_state(path, fix)
        except ProxyAlError:
            if not rebuild:
                raise
            os.replace(path, path.with_suffix(".bad"))
            warnings.warn(f"{path}: invalid, moved to {path.with_suffix('.bad').name}; rebuilding it")
    return states


def read_state(path, fix):
    """The RunState of one state file, or ProxyAlError naming the file, what is wrong and the fix."""
    obj = read_json(path, lambda o: None, fix)
    try:
        return RunState.from_json(obj)
    except ValueError as err:
        raise ProxyAlError(f"{path}: {err}; {fix}") from None


def read_times(out):
    """The stage times of every process that worked on the run (out/times/*.json: ranks, reruns), summed:
    {"wall": seconds, "stages": {stage: seconds}, "processes": n}; None before any was written."""
    total = {"wall": 0.0, "stages": {}, "processes": 0}
    for path in sorted((Path(out) / "times").glob("*.json")):
        try:
            part = json.loads(path.read_text(encoding="utf-8"))
            wall, stages = float(part["wall"]), {str(k): float(v) for k, v in part["stages"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue                        # a damaged record loses its seconds, nothing else
        total["wall"] += wall
        total["processes"] += 1
        for stage, seconds in stages.items():
            total["stages"][stage] = total["stages"].get(stage, 0.0) + seconds
    return total if total["processes"] else None


def stage_name(identity):
    """The short name of a stage several strategies share (same_stage's identity): its file, its store key."""
    return f"{zlib.crc32(json.dumps(identity).encode()):08x}"


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
        raise ProxyAlError(f"--out {out}: holds {len(others)} file(s) or folder(s) ({few(others)}) and is no "
                           f"proxy-al run folder (it has no {MARKER} and no config.json of a run); a run writes only "
                           f"into a new or empty folder, or its own run folder. Choose a new --out, e.g. {out / 'run'}")


@contextmanager
def locked(out):
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
                                   f"{f.read().strip() or 'unknown'}); wait for it to end, or choose another --out"
                                   ) from None
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


def check_rerun_settings(out, settings, moot=()):
    """A rerun into a run folder keeps every setting its saved stages were made with (all but MAY_CHANGE, and
    the `moot` ones: settings that mean nothing in this run, such as --query-vox with --query volume).
    settings: the config as a dict."""
    path = Path(out) / "config.json"
    if not path.exists():
        return
    old = read_json(path, lambda c: None if isinstance(c, dict) else "not a JSON object",
                    "restore it from a backup, or start a new --out")
    new = json.loads(json.dumps(settings))
    show = lambda v: ",".join(map(show, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)
    changed = [f"--{k.replace('_', '-')} {show(new[k])} (the run has {show(old[k])})"
               for k in new if k not in MAY_CHANGE and k not in moot and k in old and old[k] != new[k]]
    if changed:
        raise ProxyAlError(f"{path}: this rerun asks for {'; '.join(changed)}. The run's saved stages (pseudo labels, "
                           "checkpoints, scores, split) were made with its own values, and a rerun may change only "
                           "--strategy, --seeds, --iterations, --k (for the acquisitions still to come), --device, "
                           "--workers, --save-maps and --cache-dir. Rerun with the run's values, or start a new --out")
    older = [k for k in new if k not in MAY_CHANGE and k not in old]
    if older:
        warnings.warn(f"{path}: made by an older proxy-al without {', '.join(older)}; taking this rerun's values")


class RunFolder:
    """The files of one run folder, read and written by name. `saved`: the state files as read at the start
    ({seed: {strategy: RunState}}); `state()` gives the RunState a strategy's loop updates, `save_state()` writes
    it."""

    def __init__(self, path, rebuild_state=False):
        self.path = Path(path)
        self.saved = read_states(self.path, rebuild_state)
        self._states = {}                               # (seed, strategy): RunState

    def saved_state(self, seed, strategy):
        """The RunState of (seed, strategy name) as read at the start (or as updated since), or None."""
        return self._states.get((str(seed), strategy)) or self.saved.get(str(seed), {}).get(strategy)

    def selected(self):
        """Every case any (seed, strategy) of the run has labeled (whole, or a box of it)."""
        return {u.case for by_s in self.saved.values() for st in by_s.values() for u in st.labeled}

    def has_finished_work(self):
        return bool(self.saved) or (self.path / "checkpoints").exists()

    def state(self, seed, strategy, given, first):
        """The RunState of (seed, strategy name), kept here so that every call returns the same object. A new
        one starts from `given` (annotation mode: the pool cases labeled when the run began). Tl is given +
        line 5's selection ("initial"; a state of an older proxy-al has none: its first `first` units after
        given) + every record's acquisitions, each unit once, whatever --k a rerun has."""
        key = (str(seed), strategy)
        if key not in self._states:
            saved = self.saved.get(key[0], {}).get(strategy)
            if saved is None:
                self._states[key] = RunState(given=list(given), labeled=list(given))
                return self._states[key]
            old, given = saved.labeled, saved.given
            initial = old[len(given):len(given) + first] if saved.initial is None else saved.initial
            labeled = list(dict.fromkeys(given + initial + [u for r in saved.iterations for u in r.acquired or []]))
            if old and labeled != old:        # only a hand-edited or foreign state gets here
                warnings.warn(f"{state_file(self.path, seed, strategy)}: 'labeled' disagrees with the iteration "
                              f"records; following the records ({len(labeled)} cases)")
            self._states[key] = RunState(given=given, initial=initial, labeled=labeled if old else old,
                                         iterations=saved.iterations, scores=saved.scores)
        return self._states[key]

    def drop_scores(self, seed):
        """Forget the pool's scores under the seed's proxy (they were made by an older one)."""
        shutil.rmtree(self.path / "scores" / f"seed{seed}", ignore_errors=True)

    def save_state(self, seed, strategy):
        """One (seed, strategy)'s state, in one atomic write: its records and the cases they acquired."""
        files.atomic_write_json(state_file(self.path, seed, strategy), self._states[(str(seed), strategy)].to_json())

    def write_json(self, name, obj):
        files.atomic_write_json(self.path / name, obj)

    def saved_array(self, name, make, key):
        """out/<name>.<key's hash>.npy (memory-mapped) if it is there and readable, else make() saved there.
        `key`: everything that made the array (settings, source file), so a changed one is never reused."""
        path = self.path / f"{name}.{zlib.crc32(json.dumps(key).encode()):08x}.npy"
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            array = make()
            files.atomic_save_npy(path, array)
            return array

    def scores_file(self, seed, cid):
        return self.path / "scores" / f"seed{seed}" / f"{cid}.json"

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
        """The MC-dropout scores (strategies.MC_MEASURES) of a pool case under the seed's proxy."""
        ok = lambda s: None if isinstance(s, dict) and all(isinstance(s.get(m), (int, float)) for m in
                                                          MC_MEASURES) else "not a scores object"
        return read_json(self.scores_file(seed, cid), ok, fix)

    def load_checkpoint(self, key, model, cases, device, left_out=()):
        """Weights of a finished stage into `model`; returns the checkpoint dict, or None to redo the stage
        (a stage restarts from its beginning with its own seed, so its results are all a resume needs).
        `cases`: the ids the stage trains on; a checkpoint trained on others is redone (cases `left_out` since
        it was saved are not counted)."""
        path = self.path / "checkpoints" / f"{key}.pt"
        try:
            ckpt = torch.load(path, map_location=device, weights_only=False)
            if [c for c in ckpt.get("cases") or [] if c not in left_out] != list(cases):
                warnings.warn(f"{path}: trained on other cases than this stage's {len(cases)}; redoing that stage")
                return None
            model.load_state_dict(ckpt["model"])    # after the check: a rejected one leaves `model` untouched
            return ckpt
        except FileNotFoundError:
            return None
        except Exception as err:  # a damaged checkpoint is redone, never trusted
            warnings.warn(f"{path}: unreadable checkpoint ({err}); redoing that stage")
            return None

    def save_checkpoint(self, key, model, cases, settings, **results):
        ckpt = {"model": model.state_dict(), "cases": list(cases), "config": settings, **results}
        files.atomic_write(self.path / "checkpoints" / f"{key}.pt", lambda f: torch.save(ckpt, f))

    def same_stage(self, identity, device):
        """The checkpoint of a finished stage made from the same `identity` (everything that made it: seed, start
        weights, cases, steps; run_folder's settings are the run's), as another strategy saved it, or None."""
        path = self.path / "checkpoints" / "same" / f"{stage_name(identity)}.json"
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved["identity"] != identity:
                return None
            ckpt = torch.load(self.path / "checkpoints" / f"{saved['checkpoint']}.pt", map_location=device,
                              weights_only=False)
            return ckpt if sorted(ckpt["cases"]) == identity["cases"] else None     # not replaced since
        except Exception:     # none yet, or damaged: the stage is trained (and gives the same weights)
            return None

    def mark_stage(self, identity, key):
        """Record that the checkpoint `key` holds the stage made from `identity` (same_stage finds it)."""
        path = self.path / "checkpoints" / "same" / f"{stage_name(identity)}.json"
        files.atomic_write_json(path, {"identity": identity, "checkpoint": key})

    def checkpoint_weights(self, key, device):
        """The weights a finished stage saved (checkpoints/<key>.pt)."""
        return torch.load(self.path / "checkpoints" / f"{key}.pt", map_location=device, weights_only=False)["model"]
