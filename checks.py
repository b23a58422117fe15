"""What keeps a run whole: every option checked before the long work, one writer per run folder (a lock),
no leftover temporary files, and run files (state, split) that are either valid or a clear error.

Each check ends in SystemExit with a message naming the option or file and what to do: a mistake a user can
make never prints a traceback.
"""
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:
    fcntl = None


def check_options(cfg):
    """Every option's valid range, all problems in one message (before any data is read)."""
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
