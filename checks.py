"""What keeps a run whole, around the method in al_loop.py: the command line (a flag per Config field, every
option checked before the long work), atomic file writes, one writer per run folder (a lock), no leftover
temporary files, run state files that are either valid or a clear error, and the data checked before any
training (unreadable cases left out and listed, a cache that cannot be written stops the run, label grids).

A mistake a user can make ends in SystemExit with a message naming the option or file and what to do, never
in a traceback.
"""
import argparse
import dataclasses
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:
    fcntl = None


# ----------------------------------------------------------------------------- the command line


def config_parser(cls, presets, description):
    """An argparse parser with one --flag per field of the dataclass `cls` (unset flags parse to None).

    Each flag's help is its field's metadata["help"], followed by its value in every preset.
    Shared with benchmarks/bench.py.
    """
    show = lambda v: fmt(v) if v != "" else '""'
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        values = ", ".join(f"{name}: {show(getattr(preset, f.name))}" for name, preset in presets.items())
        text = f"{f.metadata.get('help', '')} [{values}]".replace("%", "%%")
        if isinstance(f.default, bool):
            p.add_argument("--" + f.name.replace("_", "-"), action="store_true", default=None, help=text)
        else:
            kind = "LIST" if isinstance(f.default, tuple) else type(f.default).__name__.upper()
            p.add_argument("--" + f.name.replace("_", "-"), default=None, metavar=kind, help=text)
    return p


def config_values(cls, args, parser):
    """{field: value} of the flags that were given (args: vars of the parsed namespace), each converted to
    its field's type; a value that does not convert is a parser error naming the flag."""
    kinds = {f.name: f.default for f in dataclasses.fields(cls)}
    given = {}
    for name, text in args.items():
        if name not in kinds or text is None:
            continue
        default = kinds[name]
        try:
            if isinstance(default, tuple):
                given[name] = tuple(float(x) if "." in x else int(x) for x in text.split(",") if x.strip())
            else:
                given[name] = type(default)(text)        # a bool flag arrives as True
        except ValueError:
            parser.error(f"--{name.replace('_', '-')} {text!r}: expected {type(default).__name__}")
    return given


def check_options(cfg):
    """Every option's valid range, all problems in one message (before any data is read)."""
    import torch
    problems = []

    def need(ok, option, valid):
        if not ok:
            problems.append(f"--{option.replace('_', '-')} {fmt(getattr(cfg, option))}: {valid}")

    for name in ("k", "iterations", "batch_size", "steps", "semi_steps", "proxy_epochs", "proxy_val_every",
                 "proxy_patches_per_case", "phantom_cases"):
        need(getattr(cfg, name) >= 1, name, "must be at least 1")
    need(cfg.mc_passes >= 2, "mc_passes", "must be at least 2 (a variance needs two passes)")
    need(0 < cfg.tau <= 1, "tau", "must lie in (0, 1]")
    need(0 <= cfg.overlap < 1, "overlap", "must lie in [0, 1)")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(0 <= cfg.dropout < 1, "dropout", "must lie in [0, 1)")
    need(0 <= cfg.fg_fraction <= 1, "fg_fraction", "must lie in [0, 1]")
    need(0 <= cfg.semi_fg_fraction <= 1, "semi_fg_fraction", "must lie in [0, 1]")
    for name in ("alpha", "beta", "warmup_steps", "save_maps", "n_val"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    need(cfg.workers >= -1, "workers", "must be >= 0, or -1 for the default")
    need(cfg.hu_band == "auto" or _lo_hi(cfg.hu_band.split(",")), "hu_band", "two numbers LO,HI with LO < HI, or auto")
    need(cfg.window_hu == () or _lo_hi(cfg.window_hu), "window_hu", "two numbers LO,HI with LO < HI, or empty")
    need(len(cfg.spacing_mm) == 3 and min(cfg.spacing_mm) > 0, "spacing_mm", "three numbers > 0 (mm)")
    for name in ("patch_vox", "roi_vox"):
        need(len(getattr(cfg, name)) == 3 and all(s > 0 and s % 16 == 0 for s in getattr(cfg, name)), name,
             "three sides, each a positive multiple of 16 (the U-Net halves a patch four times)")
    need(len(cfg.channels) >= 2 and min(cfg.channels) >= 1, "channels", "at least two widths, each >= 1")
    need(len(cfg.seeds) >= 1, "seeds", "at least one seed")
    need(cfg.lr_decay in ("constant", "cosine"), "lr_decay", "constant or cosine")
    need(cfg.head_init in ("new", "proxy"), "head_init", "new or proxy")
    need(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"), "device", "auto, cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {cfg.device}: this PyTorch sees no CUDA device (torch {torch.__version__}, "
                        f"CUDA build {torch.version.cuda}); use --device cpu or auto, or install a CUDA build")
    elif cfg.device.startswith("cuda:") and not (cfg.device[5:].isdigit()
                                                 and int(cfg.device[5:]) < torch.cuda.device_count()):
        problems.append(f"--device {cfg.device}: there are {torch.cuda.device_count()} CUDA devices")
    if problems:
        raise SystemExit("invalid options:\n  " + "\n  ".join(problems))


def fmt(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _lo_hi(values):
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        return False
    return lo < hi


@contextmanager
def run_folder(out):
    """Make the run folder and hold an exclusive lock on out/.lock while the block runs (the OS drops it
    when the process dies, even by SIGKILL): a second process on the same folder stops at once, naming the
    holder's pid. Temporary files an interrupted run left behind are deleted. Yields the folder's Path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out}: is a file; give a folder for the run")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as f:
        if fcntl is not None:   # POSIX; on Windows the folder is not locked
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                raise SystemExit(f"{out}: run folder in use by another proxy-al process (pid "
                                 f"{f.read().strip() or 'unknown'}); wait for it to end, or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        leftovers = [p for p in out.rglob(".*.tmp") if p.is_file()]
        for p in leftovers:
            p.unlink(missing_ok=True)
        if leftovers:
            warnings.warn(f"{out}: removed {len(leftovers)} temporary file(s) left by an interrupted run")
        yield out


def read_json(path, problem_of, fix):
    """A run file's JSON, or SystemExit naming the file, what is wrong (not JSON, or problem_of(obj)) and the fix."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        problem = problem_of(obj)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"not valid JSON ({e})"
    except OSError as e:
        problem = f"cannot be read ({e.strerror})"
    if problem:
        raise SystemExit(f"{path}: {problem}; {fix}")
    return obj


def state_problem(st):
    """What is wrong with one (seed, strategy) state object, or None."""
    if not isinstance(st, dict):
        return f"expected a JSON object, got {type(st).__name__}"
    if not (isinstance(st.get("labeled"), list) and all(isinstance(c, str) for c in st["labeled"])):
        return "'labeled' must be a list of case ids"
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


# ----------------------------------------------------------------------------- files: atomic writes, run state


def atomic_write(path, write_fn):
    """Call write_fn(f) on an open binary file next to `path`, flush it to disk, then move it onto `path`
    in one step: a reader sees the old file or the new one, never half of one. Returns the Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; others sharing a data or cache folder must read them
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_bytes(path, data):
    """Write `data` (bytes) to `path` atomically. Returns the Path."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path, obj):
    """Write `obj` as indented JSON to `path` atomically. Returns the Path."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def atomic_save_npy(path, array):
    """Save `array` as .npy to `path` atomically."""
    return atomic_write(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


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
        except SystemExit:
            if not rebuild:
                raise
            os.replace(path, path.with_suffix(".bad"))
            warnings.warn(f"{path}: invalid, moved to {path.with_suffix('.bad').name}; rebuilding it")
    return states



# ----------------------------------------------------------------------------- the data, before any training


def preprocess_all(study):
    """Resample every image into the cache once. A case whose own file is unreadable is left out with a
    warning (and listed in summary.md); a cache that cannot be written stops the run."""
    import data                         # data.py writes through this module: imported here, not at the top
    from proxy_al import Progress
    world = study.world
    if world.size > 1:      # each rank builds its share of the cache, then every rank reads it all
        for case in list(study.cases.values())[world.rank::world.size]:
            try:
                data.cached_case(case, study.cache, study.cfg.spacing_mm, with_label=False)
            except data.CacheError as err:
                raise SystemExit(str(err)) from None
            except (OSError, ValueError):
                pass        # reported by the pass below
        world.add("preprocessed")
        world.wait(lambda: world.add("preprocessed", 0) == world.size, "the other ranks' preprocessing", study.log)
    progress = Progress("preprocess", len(study.cases))
    for i, (cid, case) in enumerate(list(study.cases.items()), 1):
        try:
            data.cached_case(case, study.cache, study.cfg.spacing_mm, with_label=False)
        except data.CacheError as err:
            raise SystemExit(str(err)) from None
        except (OSError, ValueError) as err:
            warnings.warn(f"case {cid} left out: {err}")
            study.left_out[cid] = str(err)
            del study.cases[cid]
        progress.update(i)
    if not study.cases:
        raise SystemExit(f"{study.root}: no readable case")
    study.val = [c for c in study.val if c in study.cases]
    study.pool = [c for c in study.pool if c in study.cases]
    return study


def read_task(root):
    """(task info, {case id: case}) of a data folder (data.read_task_info, data.read_msd), or SystemExit."""
    import data
    try:
        task, cases = data.read_task_info(root), {c["id"]: c for c in data.read_msd(root)}
    except (OSError, ValueError) as err:
        raise SystemExit(str(err)) from None
    if len(cases) < 2:
        raise SystemExit(f"{root}: {len(cases)} case; active learning needs at least 2 cases (a pool to select "
                         "from, and validation cases)")
    if task["num_classes"] < 2:
        raise SystemExit(f"{root}/dataset.json: the task has {task['num_classes']} class; segmentation needs "
                         "background and at least one foreground class in 'labels'")
    return task, cases


def check_request(study, strategies, known):
    """Every mistake in the request that can be seen before the long work starts; known: strategy names."""
    cfg = study.cfg
    unknown = [s for s in strategies if s not in known]
    if unknown:
        raise SystemExit(f"--strategy: unknown {', '.join(unknown)}; choose from all, extended, {', '.join(known)}")
    need = cfg.k * cfg.iterations
    if need > len(study.pool):
        raise SystemExit(f"--n-val {cfg.n_val:g} leaves {len(study.pool)} pool cases of "
                         f"{len(study.pool) + len(study.val)}, but --k {cfg.k} x --iterations {cfg.iterations} "
                         f"needs {need}; lower --n-val, --k or --iterations")
    if study.annotation and study.world.size > 1:
        raise SystemExit("annotation mode (pool cases without labels) runs as one process: use python al_loop.py, "
                         "not torchrun")
    if study.annotation and (len(strategies) > 1 or len(cfg.seeds) > 1):
        raise SystemExit("annotation mode (pool cases without labels): choose one --strategy and one --seeds, "
                         "e.g. --strategy proxyrank_var_semi --seeds 0")
    unknown = {c for by_s in study.state.values() for st in by_s.values() for c in st["labeled"]} - set(study.pool)
    if unknown:
        raise SystemExit(f"{study.out}/state: names cases {sorted(unknown)[:5]} that are not in this run's pool "
                         f"(split.json less unreadable cases); the data changed since the run began: use a new --out")


def check_labels(study):
    """Before any training: every label file's grid against its image (headers only), and every validation
    label's values. Pool labels' values are checked when their case is selected (the oracle's rule)."""
    import data
    problems = []
    for case in study.cases.values():
        try:
            if case["label"]:
                data.check_same_grid(case["image"], case["label"])
        except (OSError, ValueError) as err:
            problems.append(str(err))
    if problems:
        raise SystemExit(f"{len(problems)} label file(s) do not fit their image:\n" + "\n".join(problems))
    for cid in study.val:
        study.label(cid)


