"""One run of a study, around the method in al_loop.py: the Study (config, device, the rank group, the log,
models), the checks before the long work, and the queue that hands out Algorithm 1's units on one or many
ranks. The run folder is run_folder.py, the cases and split cases.py.

A mistake a user can make ends in ProxyAlError with a message naming the option or file and what to do;
al_loop.main turns it into the one line users see.
"""
import dataclasses
import errno
import os
import re
import signal
import threading
import time
import warnings
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import cli
import folders
import strategies
from annotate import NeedLabels
from cases import Cases, check_sources, read_task, resolve_data
from queries import Queries
from files import ProxyAlError, few, read_json
from keys import Key
from proxy_al import evaluate
from report import nanmean, write_reports
from run_folder import MARKER, RunFolder, check_rerun_settings, locked, read_states, read_times
from train import Patches, Progress, ProxyTraining, Stage, StageClock, fmt_s, pick_device
from unet import UNet
from world import World

import numpy as np
import torch


PLOT_EVERY_S = 30       # dice_curve.png between iterations, at most this often (the CSV files and summary.md: always)


# ----------------------------------------------------------------------------- the study


class Study:
    """What every unit of one run shares: the config and what is derived from it once (`out`, `seeds`), the run
    folder (`run`), the cases (`cases`), the device, the rank group (`world`), the log, and the models."""

    def __init__(self, cfg, run, cases, seeds, world, boxes_done=(), clock=None):
        self.cfg, self.run, self.cases, self.seeds, self.world = cfg, run, cases, tuple(seeds), world
        self.queries = Queries(cfg, cases)                              # what a unit of Tl is: a case or a box
        self.out, self.t0, self.total, self.work, self.shown = run.path, time.time(), 0, 0, 0
        self.plotted = self.t0                                          # when dice_curve.png was last drawn
        self.device = pick_device(world.device(cfg.device))
        many = world.size > 1
        self._bar = partial(Progress, prefix=f"[rank {world.rank}]" if many else "", poll=world.check if many else None)
        self.workers = cfg.workers if cfg.workers >= 0 else (6 if self.device.type == "cuda" else 0)
        self._proxy = (None, None)                                      # (seed, Mp) while this rank works on it
        self.boxes_done = boxes_done    # --boxes-done: cases (or "all") whose asked boxes the user says are labeled
        self.clock = clock or StageClock()                              # where this process's time goes
        self._times = f"times/{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"

    def settings(self):
        """The config as config.json and the checkpoints record it: with the run's folder and seeds."""
        return {**dataclasses.asdict(self.cfg), "out": str(self.out), "seeds": self.seeds}

    def log(self, msg):
        LAST_LOG[0] = msg
        rank = f"rank {self.world.rank} " if self.world.size > 1 else ""
        print(f"[{rank}{fmt_s(time.time() - self.t0)}] {msg}", flush=True)

    def bar(self, tag, total, *args, **kwargs):
        """A Progress for `tag` (its lines go to the log); a SIGTERM names it as what the run was doing."""
        LAST_LOG[0] = tag
        return self._bar(tag, total, *args, **kwargs)

    def count_iterations(self, total, work):
        """The active iterations this run is to do, and their work (the sum of their strategies' cost)."""
        self.total, self.work = total, work

    def progress(self, strategy=None):
        """Count a finished active iteration of `strategy` (all ranks; None: count none); rank 0 prints the
        study's progress and an ETA from the work done so far, each iteration weighted by its strategy's cost."""
        done = self.world.add("iterations", int(strategy is not None))
        work = self.world.add("work", strategy.cost if strategy else 0)
        if self.world.rank == 0 and done and (strategy or done != self.shown):
            self.shown, eta = done, (time.time() - self.t0) / work * max(0, self.work - work)
            self.log(f"study: {done}/{self.total} active iterations done, ETA {fmt_s(eta)}")

    # --- the state of a (seed, strategy)

    def first_pool(self, strategy):
        """How many cases line 5 selects: k, or every pool case for the all-data reference."""
        return len(self.cases.pool) if strategy.reference else self.cfg.k

    def run_state(self, seed, strategy):
        """The RunState of one (seed, Strategy) (RunFolder.state). In annotation mode, the pool cases that had
        labels when the run began are in Tl from the start: only unlabeled cases are ranked, selected and listed
        for annotation."""
        return self.run.state(seed, strategy.name, list(map(self.queries.of, self.cases.given)),
                              self.first_pool(strategy))

    def selections_needed(self, seed, strategy):
        """(cases selected so far, cases selected by the end) of one (seed, Strategy) at this rerun's --k and
        --iterations; the selections already made stay as they are."""
        k, iterations = self.cfg.k, strategy.iterations(self.cfg.iterations)
        st = self.run.saved_state(seed, strategy.name)
        records = st.iterations if st else []
        selected = len(st.labeled) - len(st.given) if st else 0
        still = 0 if selected else self.first_pool(strategy)                               # line 5
        still += k * max(0, iterations - 1 - len(records))                                 # lines 13 / 16 to come
        if records and records[-1].acquired is None and len(records) < iterations:         # a finished run extended
            still += k
        return selected, selected + still

    def write_reports(self, final=False, plot=None):
        """results.csv, per_case_dice.csv, summary.md from every state file so far (other ranks' too), after
        each active iteration; dice_curve.png at most every PLOT_EVERY_S seconds between them (a plot costs more
        than a tiny iteration) and always at the end (`final`)."""
        plot = (final or time.time() - self.plotted >= PLOT_EVERY_S) if plot is None else plot
        if plot:
            self.plotted = time.time()
        with self.clock("reports"):
            self.run.write_json(self._times, self.clock.totals())
            return write_reports(self.out, read_states(self.out), self.cases.task, len(self.cases.pool),
                                 self.cases.left_out, plot, read_times(self.out))

    # --- models

    @property
    def patches(self):
        """How this run draws its training patches (train.Patches): the config's patch, draw and window."""
        cfg = self.cfg
        return Patches(tuple(cfg.patch_vox), self.cases.window_hu, cfg.fg_fraction, cfg.fg_draw == "classes",
                       cfg.patches_per_case)

    def proxy_training(self):
        """What training the proxy takes of the config (train.ProxyTraining): an epoch of --proxy-patches-per-case
        patches per pool case, on random patches (the paper) or balanced ones."""
        cfg = self.cfg
        steps = max(1, len(self.cases.pool) * cfg.proxy_patches_per_case // cfg.batch_size)
        patches = dataclasses.replace(self.patches,
                                      fg_fraction=None if cfg.proxy_patches == "random" else cfg.fg_fraction)
        return ProxyTraining(cfg.proxy_epochs, cfg.proxy_val_every, steps, cfg.batch_size, cfg.lr, patches,
                             tuple(cfg.roi_vox), cfg.overlap, cfg.warmup_steps, cfg.lr_decay)

    def new_model(self, out_channels, seed):
        """A U-Net of the config's widths and dropout, its weights drawn from `seed` (keys.Key's seeds)."""
        torch.manual_seed(seed)
        return UNet(1, out_channels, tuple(self.cfg.channels), self.cfg.dropout).to(self.device)

    def load_checkpoint(self, key, model, units):
        """Weights of a finished stage into `model` (run_folder.RunFolder.load_checkpoint), or None to redo it.
        units: what it trains on (case ids, or units of Tl)."""
        return self.run.load_checkpoint(key, model, list(map(str, units)), self.device, self.cases.left_out)

    def save_checkpoint(self, key, model, units, **results):
        self.run.save_checkpoint(key, model, list(map(str, units)), self.settings(), **results)

    def keep_proxy(self, seed, model):
        self._proxy = (seed, model)

    def proxy(self, seed):
        """Mp of a seed from its checkpoint, kept while this rank works on that seed."""
        if self._proxy[0] != seed:
            model = self.new_model(2, Key(seed).of_seed("proxy"))
            self.load_checkpoint(Key(seed).checkpoint(), model, self.cases.pool)
            self._proxy = (seed, model)
        return self._proxy[1]

    def final_model(self, seed, strategy, j, record):
        """The model iteration j (from 0) ended with, from its checkpoint: Msemi, or Ms where there was none."""
        key, stage = Key(seed, strategy.name, j), record.final_stage
        model = self.new_model(self.cases.num_classes, key.model_seed(stage))
        model.load_state_dict(self.run.checkpoint_weights(key.checkpoint(stage), self.device))
        return model.eval()

# ----------------------------------------------------------------------------- training stages and validation


def validate(study, model, ids=None):
    """Validation Dice of the validation cases (or of `ids`, e.g. the test cases) per foreground class, per case
    (NaN where the case's label lacks the class: MONAI's rule) and its mean over the cases that have it. mean_dice
    is MONAI's DiceMetric(include_background=False, reduction="mean"), as the first author's tutorial reports it:
    per case the mean over its present classes, then the mean over the cases. Each case is scored on
    box(cid, labeled=True), which holds all its foreground: outside it both label and prediction are background,
    so the Dice is the full grid's."""
    with study.clock("validation"):
        return _validate(study, model, study.cases.val if ids is None else ids)


def _validate(study, model, ids):
    if not ids:
        return {"dice": [float("nan")] * (study.cases.num_classes - 1), "mean_dice": float("nan"), "per_case": {}}
    per_case = evaluate(model, (study.cases.labeled_case(c) for c in ids), study.cases.num_classes,
                        study.cfg.roi_vox, study.cfg.overlap)
    return {"dice": nanmean(per_case, 0).tolist(), "mean_dice": float(nanmean(nanmean(per_case, 1))),
            "per_case": {c: row.tolist() for c, row in zip(ids, per_case)}}

def run_stage(study, model, step_loss, data, steps, dropout_seed, what):
    """One training stage of Ms or Msemi: `steps` Adam steps at the config's lr and schedule. With --keep best
    (the first author's tutorial keeps its best validated model) the model is validated every --val-every
    steps and after the last, and ends with the weights of the best validation mean Dice (the first of equal
    ones; the last weights when there is no validation case). Returns the stage's stats."""
    cfg = study.cfg
    stage = Stage(model, step_loss, data, steps, study.device, cfg.lr, cfg.warmup_steps, cfg.lr_decay, dropout_seed,
                  study.bar)
    if cfg.keep == "last" or not study.cases.val:
        with study.clock(f"training ({what})"):
            return stage.run(what)
    best, parts, history = None, [], []
    for done in range(0, steps, cfg.val_every):
        n = min(cfg.val_every, steps - done)
        with study.clock(f"training ({what})"):
            parts.append((n, stage.run(f"{what} steps {done + 1}-{done + n}/{steps}", n)))
        dice = validate(study, model)["mean_dice"]          # eval mode; train_steps sets train mode again
        history.append((done + n, dice))
        if best is None or np.nan_to_num(dice, nan=-1.0) > best[0]:
            best = (np.nan_to_num(dice, nan=-1.0), {k: v.detach().clone() for k, v in model.state_dict().items()},
                    done + n)
        print(f"  {what} step {done + n}/{steps}: validation mean Dice {dice:.4f} (best {best[0]:.4f}, step "
              f"{best[2]})", flush=True)
    model.load_state_dict(best[1])
    mean = lambda key: sum(n * p[key] for n, p in parts) / steps
    return {"loss": mean("loss"), "step_s": mean("step_s"), "data_wait": mean("data_wait"), "best_step": best[2],
            "validation": history}

# ----------------------------------------------------------------------------- the queue


@dataclass(frozen=True)
class Method:
    """Algorithm 1 as the queue runs it; al_loop.py gives each part."""
    proxy_model: Callable    # (study, seed) -> Mp: lines 1-3, trained on the pseudo labels (or its checkpoint)
    proxy_score: Callable    # (study, seed, case) -> that pool case's MC-dropout scores under Mp (line 3)
    proxy: Callable          # (weights, {case: scores}) -> what lines 1-3 give every proxyrank strategy
    run_strategy: Callable   # (study, strategy, seed, proxy or None) -> None: lines 4-18
    save_maps: Callable      # (study, model, scores, folder) -> None: --save-maps's uncertainty maps


def plan(study, chosen):
    """The units of work in the order the queue hands them out: a proxy training per seed (one rank each),
    the proxies' pool scoring by case (all ranks), then the (seed, strategy) runs, costliest first."""
    proxy_seeds = [seed for seed in study.seeds if any(s.proxy for s in chosen)]
    runs = sorted(((seed, s) for seed in study.seeds for s in chosen), key=lambda u: -u[1].cost)
    return ([("proxy", seed, None) for seed in proxy_seeds] + [("score", seed, c) for seed in proxy_seeds
                                                               for c in study.cases.pool] + [("run", *u) for u in runs])


def work(study, chosen, method):
    """This rank's share of plan(): it takes units from the group's queue until none is left. A pool case's
    scoring waits for its seed's proxy, and a proxyrank run for the whole pool's scores, whichever rank does
    that work; the pool's scores are files of their own, so a restarted run skips the cases already scored."""
    world, pool, scoring = study.world, study.cases.pool, {}
    wait_for = lambda key, count, what: world.wait(lambda: world.add(key, 0) >= count, what, study.log)

    def proxy_unit(seed, _):
        study.keep_proxy(seed, method.proxy_model(study, seed))
        world.add(f"proxy{seed}")                                   # ready for the pool's scoring

    def score_unit(seed, cid):
        if not study.run.has_scores(seed, cid):
            wait_for(f"proxy{seed}", 1, f"the proxy of seed {seed}")
            study.run.save_scores(seed, cid, method.proxy_score(study, seed, cid))
        done = world.add(f"scored{seed}")
        scoring.setdefault(seed, study.bar(f"seed {seed}: pool scored under the proxy", len(pool))).update(done)
        if done == len(pool) and study.cfg.save_maps:                                      # the last case
            method.save_maps(study, study.proxy(seed), proxy_scores(seed), Key(seed))

    def proxy_scores(seed):
        wait_for(f"scored{seed}", len(pool), f"the pool scores of seed {seed}")
        return {c: study.run.load_scores(seed, c) for c in pool}

    def run_unit(seed, strategy):
        proxy = None
        if strategy.proxy:
            scores = proxy_scores(seed)                             # first: by then Mp is trained and saved
            proxy = method.proxy(study.proxy(seed).state_dict(), scores)
        method.run_strategy(study, strategy, seed, proxy)

    units = {"proxy": proxy_unit, "score": score_unit, "run": run_unit}
    world.work(plan(study, chosen), lambda kind, seed, what: units[kind](seed, what), study.log)

# ----------------------------------------------------------------------------- before the long work


def choose_strategies(cfg, cases, default_strategy, log):
    """(the strategies to run as Strategy values, the seeds): annotation mode with the preset's choice runs the
    paper's best, one seed."""
    if cases.annotation and default_strategy:
        log(f"annotation mode ({sum(not c['label'] for c in cases.files.values())} unlabeled cases): "
            f"strategy proxyrank_var_semi, seed {cfg.seeds[0]} (set --strategy/--seeds to change)")
        return [strategies.parse("proxyrank_var_semi")], tuple(cfg.seeds[:1])
    try:
        return strategies.choose(cfg.strategy), tuple(cfg.seeds)
    except ValueError as err:
        raise ProxyAlError(str(err)) from None


def check_request(study, chosen):
    """Every mistake in the request that can be seen before the long work starts."""
    cfg, cases = study.cfg, study.cases
    if cases.annotation and study.world.size > 1:
        raise ProxyAlError("annotation mode (pool cases without labels) runs as one process: use python al_loop.py, "
                           "not torchrun")
    if cases.annotation and any(s.reference for s in chosen):
        raise ProxyAlError(f"--strategy {strategies.REFERENCE}: the all-data reference needs every pool case labeled; "
                           "run it on a fully labeled data set")
    if cases.annotation and (len(chosen) > 1 or len(study.seeds) > 1):
        raise ProxyAlError("annotation mode (pool cases without labels): choose one --strategy and one --seeds, "
                           "e.g. --strategy proxyrank_var_semi --seeds 0")
    patch_only = [s.name for s in chosen if s.patch_only]
    if patch_only and not study.queries.patch:
        raise ProxyAlError(f"--strategy {','.join(patch_only)}: random boxes need --query patch")
    if cases.annotation and any(s.oracle for s in chosen):
        raise ProxyAlError("--strategy rand_fg_oracle reads the labels of the boxes before they are queried (an "
                           "oracle); in annotation mode there are none: use rand_fg_pseudo or rand")
    for seed in study.seeds if not study.queries.patch else ():     # patch mode: the boxes run out, not the cases
        for strategy in chosen:
            selected, need = study.selections_needed(seed, strategy)
            so_far = f" ({selected} selected so far)" if selected else ""
            if cases.annotation:
                st = study.run.saved_state(seed, strategy.name)
                given = st.given if st else cases.given
                free = len(cases.pool) - len(given)
                if need > free:
                    raise ProxyAlError(f"--k {cfg.k} x --iterations {cfg.iterations} asks for {need} cases to annotate"
                                       f"{so_far}, but the pool has {free} cases besides the {len(given)} labeled when "
                                       "the run began; lower --k or --iterations")
            elif need > len(cases.pool):
                raise ProxyAlError(f"--n-val {cfg.n_val:g} leaves {len(cases.pool)} pool "
                                   f"case{'s' * (len(cases.pool) != 1)} of {len(cases.pool) + len(cases.val)}, but "
                                   f"--k {cfg.k} x --iterations {cfg.iterations} "
                                   f"needs {need}{so_far}; lower --n-val, --k or --iterations")
    need = cfg.k * cfg.iterations
    if any(s.semi for s in chosen) and need >= len(cases.pool) and not cases.annotation and not study.queries.patch:
        warnings.warn(f"--k {cfg.k} x --iterations {cfg.iterations} labels all {len(cases.pool)} pool cases: the "
                      "last iteration of a _semi strategy has no unlabeled case left and skips its fine-tuning")
    unknown = study.run.selected() - set(cases.pool)
    if unknown:
        why = "; ".join(f"{c}: {cases.left_out.get(c, 'not in split.json')}" for c in sorted(unknown)[:5])
        raise ProxyAlError(f"{study.out}/state: this run selected or trained on cases that it cannot read now ({why}). "
                           "Put their files back as they were and rerun, or start a new --out")


def preprocess(study):
    """Resample every image into the cache once (Cases.preprocess); on many ranks each builds its share first,
    then every rank reads them all."""
    with study.clock("preprocess"):
        _preprocess(study)


def _preprocess(study):
    world, ids = study.world, list(study.cases.files)
    if world.size > 1:
        study.cases.preprocess(ids[world.rank::world.size], None)
        world.add("preprocessed")
        world.wait(lambda: world.add("preprocessed", 0) == world.size, "the other ranks' preprocessing", study.log)
    study.cases.preprocess(ids, study.bar("preprocess", len(ids)))


def start(study, chosen, sources=None):
    """Save config.json (and a new split.json, and sources.json: the files the run reads), and count the
    iterations ahead (for the ETA)."""
    cases = study.cases
    if not cases.val:
        warnings.warn("no labeled validation case: validation Dice is skipped (results will show nan)")
    if study.world.rank == 0:      # the same settings as the run's (check_rerun_settings), but what may change
        study.run.write_json("config.json", study.settings())
        if cases.new_split:                     # the split is fixed only now that every check has passed
            study.run.write_json("split.json", {"seed": 0, "n_val": len(cases.new_split["val"]), **cases.new_split})
        if sources is not None:
            study.run.write_json("sources.json", sources)
    unasked = [c for c in cases.pool if cases.annotation and cases.files[c]["label"] and c not in cases.given
               and c not in study.run.selected()]
    if unasked:
        study.log(f"{len(unasked)} label file(s) of pool cases not asked for ({few(unasked)}): not used until the run "
                  "asks for the case (or for a box in it: then confirm its labels there with --boxes-done CASE)")
    done = lambda seed, s: len(st.iterations) if (st := study.run.saved_state(seed, s.name)) else 0
    todo = [(s, max(0, s.iterations(study.cfg.iterations) - done(seed, s)))     # a rerun asking for fewer: none
            for seed in study.seeds for s in chosen]
    study.count_iterations(sum(n for _, n in todo), sum(s.cost * n for s, n in todo))
    study.log(f"{cases.task['name']}: {len(cases.pool)} pool, {len(cases.val)} validation"
              + (f", {len(cases.test)} test" if cases.test else "") + " cases; "
              f"{len(chosen)} strategies x {len(study.seeds)} seeds; device {study.device}; out {study.out}; "
              f"cache {cases.cache}" + (f"; {study.world.size} ranks" if study.world.size > 1 else ""))

# ----------------------------------------------------------------------------- the run


def run_study(cfg, method, rebuild_state=False, default_strategy=False, boxes_done=()):
    """The whole study on this process: rank 0 holds the run folder for the group; every rank takes units of
    Algorithm 1 (`method`) from the queue; rank 0 then waits for all and writes the reports. Annotation mode
    stops (exit 0) once the selected cases need labels."""
    world, clock = World(), StageClock()           # the clock from the start: the stages sum to the run's wall time
    main_thread = threading.current_thread() is threading.main_thread()     # only there can it take signals
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None   # SLURM's preemption
    out = Path(cfg.out or f"runs/{Path(cfg.data).name}-{time.strftime('%Y%m%d-%H%M%S')}")
    existed, marked = None, True            # rank 0: whether the folder, and its marker, were there before
    try:
        if world.rank == 0:
            check_out(cfg, out)
            existed, marked = out.exists(), (out / MARKER).is_file()
            with locked(out):
                world.set("out", str(out))
                return _run(cfg, out, world, method, rebuild_state, default_strategy, boxes_done, clock)
        world.wait(lambda: world.ask("check", ["out"]), "rank 0 to lock the run folder", print)
        out = Path(world.get("out"))
        return _run(cfg, out, world, method, rebuild_state, default_strategy, boxes_done, clock)
    except NeedLabels as stop:
        print(stop)
        return 0
    except Terminated:
        print(f"SIGTERM: stopped during \"{LAST_LOG[0]}\". Every finished stage is saved in {out}; rerun the "
              "same command to continue from there.", flush=True)
        world.fail(f"rank {world.rank}: SIGTERM")
        return 128 + signal.SIGTERM
    except BaseException as err:
        world.fail(f"rank {world.rank}: {err!r}"[:2000])
        full = None if isinstance(err, ProxyAlError) else disk_full(err)     # already its own message
        if full:
            raise ProxyAlError(f"{full.filename or out}: no space left on the disk ({full.strerror}). Free space "
                               f"there (or choose another --out / --cache-dir) and rerun the same command: every "
                               f"finished stage is kept and nothing was corrupted") from None
        raise
    finally:
        if existed is not None and out.is_dir() and not (out / "config.json").exists():   # refused: no trace
            for name in (".lock",) if marked else (".lock", MARKER):        # a marker it found stays
                (out / name).unlink(missing_ok=True)
            if not existed:
                with suppress(OSError):
                    out.rmdir()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        world.close()


def open_study(cfg, out=None, world=None, rebuild_state=False, default_strategy=False, boxes_done=(), clock=None):
    """(Study, the strategies to run) of a config, before any check: the run folder's files as they are (not
    locked: run_study locks it), the data folder's cases and the split."""
    run = RunFolder(out or cfg.out, rebuild_state)
    cases, t0 = Cases(cfg, run), time.time()
    chosen, seeds = choose_strategies(cfg, cases, default_strategy,
                                      lambda msg: print(f"[{fmt_s(time.time() - t0)}] {msg}", flush=True))
    return Study(cfg, run, cases, seeds, world or World(), boxes_done, clock), chosen


def _run(cfg, out, world, method, rebuild_state, default_strategy, boxes_done=(), clock=None):
    check_rerun_settings(out, {**dataclasses.asdict(cfg), "out": str(out)}, cli.moot(cfg))
    study, chosen = open_study(cfg, out, world, rebuild_state, default_strategy, boxes_done, clock)
    sources = check_sources(study.cases, out / "sources.json")      # another --data: the same files only
    check_request(study, chosen)
    preprocess(study)
    check_request(study, chosen)            # again: unreadable cases may have left the pool
    study.cases.check_labels()
    start(study, chosen, sources)
    try:
        work(study, chosen, method)
    except NeedLabels:                      # annotation mode (one rank): the curve so far beside to_annotate.csv
        study.write_reports(final=True)
        raise
    world.add("finished")
    if world.rank:
        return 0
    world.wait(lambda: study.progress() or world.add("finished", 0) == world.size, "the other ranks", study.log)
    study.write_reports(final=True)
    print(study.write_reports(plot=False))             # again: its table holds the time of the last plot
    study.log(f"done: results.csv, per_case_dice.csv, summary.md in {study.out}")
    return 0


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


def check_out(cfg, out):
    """--out must not be, or lie inside, the data folder: a run never writes into a data set. (A folder that is
    no data set is named as such first.)"""
    root, where_out = resolve_data(cfg).resolve(), Path(out).resolve()
    read_task(root)
    if where_out == root or root in where_out.parents:
        where = "is the data folder" if where_out == root else f"lies inside the data folder {root}"
        raise ProxyAlError(f"--out {out}: {where}; a run writes config.json, split.json, "
                           "state/ and checkpoints there. Choose a folder outside the data set, e.g. runs/<name>")

# ----------------------------------------------------------------------------- a finished run's folder


def saved_run(cfg):
    """(data folder, split) of the run folder --out, from its config.json and split.json."""
    out = Path(cfg.out)
    saved = read_json(out / "config.json", lambda c: None, "give --out a run folder")
    root = resolve_data(dataclasses.replace(cfg, **{k: saved[k] for k in ("data", "data_root", "phantom_cases")}))
    return root, read_json(out / "split.json", lambda s: None, "give --out a run folder")


def export_nnunet(cfg, actions):
    """--export-nnunet ID: the cases one (strategy, seed, iteration) of the run had labeled, and the run's
    validation cases, as the nnU-Net raw dataset DatasetID_<task name> (nnunet.export_run). The boxes of a
    --query patch run become partial labels: they lie on its training grids, which its config.json settings
    give (Cases and Queries of those settings)."""
    import nnunet
    from data import CacheError
    root, split = saved_run(cfg)
    task, cases = read_task(root)
    strategy = None if actions.default_strategy else cfg.strategy
    saved = read_json(Path(cfg.out) / "config.json", lambda c: None, "give --out a run folder")
    # The run's settings that give each case's training grid and boxes, not this command line's defaults.
    grid = ("data", "data_root", "phantom_cases", "cache_dir", "spacing_mm", "crop", "window_hu", "n_val", "query",
            "query_vox")
    try:
        queries = None
        if saved.get("query") == "patch":
            run_cfg = dataclasses.replace(cfg, **{k: saved[k] for k in grid if k in saved})
            queries = Queries(run_cfg, Cases(run_cfg, RunFolder(cfg.out)))
        nnunet.export_run(cfg.out, cases, read_states(cfg.out), split, task["labels"], actions.export_nnunet,
                          re.sub(r"\W+", "", task["name"].title()) or "Selection", actions.export_to or None,
                          strategy, actions.seed, actions.iteration, actions.overwrite, queries=queries)
    except (OSError, ValueError, CacheError) as err:
        raise ProxyAlError(f"--export-nnunet: {err}") from None
    return 0


def report_only(cfg):
    """--report: the reports of --out from its state files so far, without touching a running study."""
    root, split = saved_run(cfg)
    states = read_states(cfg.out)
    if not any(st.iterations for by_s in states.values() for st in by_s.values()):
        print(f"{cfg.out}: no iteration has finished yet ({sum(map(len, states.values()))} (seed, strategy) runs "
              "started), so there is nothing to report; the study writes its reports after each iteration")
        return 0
    print(write_reports(Path(cfg.out), states, folders.read_task_info(root), len(split["pool"]),
                        times=read_times(cfg.out)))
    return 0
