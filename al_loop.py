"""Warm-start active learning for 3D CT segmentation: Algorithm 1 of the paper, end to end.

    python al_loop.py                          # built-in phantom data, demo preset, a few minutes on a CPU
    python al_loop.py --data MSD_Task03 --k 5  # MSD Task03 Liver under ./data (or $MSD_DATA_ROOT), paper preset
    torchrun --nproc-per-node 8 al_loop.py --data MSD_Task03 --out runs/t03   # the same study on 8 workers

The comments (line N) are the line numbers of Algorithm 1 as the paper prints it. Lines 1-4 run once per
seed (`pseudo_labels`, `proxy_model`, `proxy_score`, `initial_scores`) and lines 5-18 once per seed and
strategy (`run_strategy`). The run around the method: study.py (the Study and its queue), run_folder.py
(--out), cases.py (images, labels, split).
"""
import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass

import world  # noqa: F401  (first: under torchrun it sets torch's C++ log level before torch loads)

import numpy as np

import cli
from annotate import require_labels, save_maps
from cli import LO_HI, SIDES, at_least, one_of, opt, within
from files import ProxyAlError
from losses import dice_per_class
from proxy_al import MIN_MC_PASSES, noisy_label, pseudo_label, semi_loss, sliding_window_predict
from report import pseudo_label_report
from run_folder import stage_name
from keys import Key
from state import Record
from ranking import Scoring, mc_pool
from study import Method, export_nnunet, report_only, run_stage, run_study, validate
from train import batches, supervised_loss, train_proxy
from unet import load_backbone

HU_BAND = (lambda v: v == "auto" or LO_HI[0](v.split(",")), "two numbers LO,HI with LO < HI, or auto")


@dataclass
class Config:
    data: str = opt("demo", "data folder (MSD, nnU-Net raw, or paired by name), MSD_Task03 / MSD_Task08 (under "
                    "--data-root), an nnU-Net name like Dataset003_Liver (under $nnUNet_raw), or demo")
    data_root: str = opt("data", "where MSD task folders and the demo data live (default: env MSD_DATA_ROOT)")
    out: str = opt("", "run folder; empty -> runs/<data>-<timestamp>; rerun with it to resume")
    strategy: str = opt("all", "NAME[,NAME...], all (the paper's 12 of supp. Table 1), extended (+4 BALD); "
                        "full (all-data reference), and with --query patch rand_fg_oracle and rand_fg_pseudo, run "
                        "only when named")
    seeds: tuple = opt((0, 1, 2), "repeats (paper: 3 seeds, mean +- std)", (lambda v: len(v) >= 1, "at least one seed"))
    k: int = opt(5, "volumes (boxes with --query patch) acquired per iteration (paper: 5)", at_least(1))
    iterations: int = opt(4, "active iterations (paper: 4; 8 in the supplementary run)", at_least(1))
    n_val: float = opt(0.0, "validation cases, a count or a fraction < 1; 0 -> Task03 26, Task08 61, else 20 %",
                       at_least(0))
    n_test: float = opt(0.0, "test cases (a count or a fraction < 1), drawn as validation is: they choose nothing "
                        "(no weights are kept on them) and are reported beside validation", at_least(0))
    spacing_mm: tuple = opt((1.5, 1.5, 2.0), "resampling grid in mm (paper: 1.5 x 1.5 x 2.0)",
                            (lambda v: len(v) == 3 and min(v) > 0, "three numbers > 0 (mm)"))
    window_hu: tuple = opt((), "HU window LO,HI (e.g. --window-hu -21,189); empty -> by task: Task03 -21,189, "
                           "Task08 -3,243", (lambda v: v == () or LO_HI[0](v), LO_HI[1] + ", or empty"))
    hu_band: str = opt("100,150", "pseudo-label HU band LO,HI (paper: W:50 L:125), or auto (per-case level)", HU_BAND)
    patch_vox: tuple = opt((96, 96, 96), "training patch in voxels (paper: 96^3)", SIDES)
    roi_vox: tuple = opt((96, 96, 96), "sliding-window ROI for inference and MC scoring", SIDES)
    overlap: float = opt(0.25, "sliding-window overlap", within(0, 1, hi_open=True))
    batch_size: int = opt(2, "cases per training step (the proxy's: patches per step)", at_least(1))
    patches_per_case: int = opt(4, "patches from each case of a training step of Ms and Msemi (first author's "
                                "tutorial: 2 cases x 4); 1 -> a case per patch", at_least(1))
    query: str = opt("volume", "what a query asks the annotator for: volume (a whole pool case, the paper) or patch "
                     "(a box of --query-vox voxels in a pool case; partial labels, as nnActive)",
                     one_of("volume", "patch"))
    query_vox: tuple = opt((32, 32, 32), "--query patch: the box of one query, voxels of the training grid (clamped "
                           "to each case)", (lambda v: len(v) == 3 and all(isinstance(s, int) and s >= 1 for s in v),
                                             "three whole numbers of voxels, each >= 1"), only=("query", "patch"))
    crop: str = opt("body", "volumes cut to the body box, voxels above the window's low end (first author's "
                    "tutorial), or none", one_of("body", "none"))
    keep: str = opt("best", "weights a stage of Ms or Msemi ends with: best (validated every --val-every steps, "
                    "first author's tutorial) or last", one_of("best", "last"))
    val_every: int = opt(200, "with --keep best: validate every N steps and after the last", at_least(1))
    variance_classes: str = opt("foreground", "classes of the MC variance: foreground (first author's tutorial: "
                                "background dropped, floor 0.0005) or all", one_of("foreground", "all"))
    steps: int = opt(2000, "supervised training steps per active iteration (paper: 2,000)", at_least(1))
    semi_steps: int = opt(2000, "semi-supervised fine-tuning steps per active iteration (paper: 2,000)", at_least(1))
    warm_start: str = opt("none", "Ms of the iterations after the first starts from: none (Mp, or random weights: "
                          "the paper's line 7) or previous (the last iteration's model, as the first author's "
                          "tutorial trains one network throughout)", one_of("none", "previous"))
    warm_steps: int = opt(0, "--warm-start previous: supervised steps of the iterations after the first (0: --steps)",
                          at_least(0), only=("warm_start", "previous"))
    proxy_epochs: int = opt(100, "proxy training epochs on the pseudo labels (paper: 100)", at_least(1))
    proxy_val_every: int = opt(5, "validate the proxy every N epochs and keep the best (paper: 5)", at_least(1))
    proxy_patches_per_case: int = opt(2, "patches per pool case and epoch of proxy training", at_least(1))
    mc_passes: int = opt(10, "MC-dropout passes m (paper: 10)", at_least(MIN_MC_PASSES))
    dropout: float = opt(0.2, "dropout probability p (paper: 0.2)", within(0, 1, hi_open=True))
    channels: tuple = opt((16, 32, 64, 128, 256), "U-Net widths, one per level (paper: 5 levels)",
                          (lambda v: len(v) >= 2 and min(v) >= 1, "at least two widths, each >= 1"))
    lr: float = opt(1e-4, "Adam learning rate (paper: 1e-4)", (lambda v: v > 0, "must be > 0"))
    lr_decay: str = opt("constant", "lr over each training stage: constant (paper) or cosine (decays to 0)",
                        one_of("constant", "cosine"))
    warmup_steps: int = opt(0, "linear lr warm-up steps at the start of each training stage", at_least(0))
    head_init: str = opt("new", "head of a task with more classes than the proxy: new (paper) or proxy (its rows)",
                         one_of("new", "proxy"))
    tau: float = opt(0.9, "noisy-label confidence threshold (paper: 0.9)", within(0, 1, lo_open=True))
    alpha: float = opt(1.0, "weight of the supervised term in semi-supervised fine-tuning (paper: 1)", at_least(0))
    beta: float = opt(0.001, "weight of the consistency term (paper: 0.001)", at_least(0))
    fg_fraction: float = opt(0.5, "share of supervised patches centred on foreground (paper: 1:1)", within(0, 1))
    fg_draw: str = opt("voxels", "a foreground centre: voxels (uniform over foreground voxels, paper's 1:1 as MONAI) "
                       "or classes (a present class first: beyond the paper, for tumours and vessels)",
                       one_of("voxels", "classes"))
    proxy_patches: str = opt("random", "proxy patch centres: random (paper: random selection of patches) or "
                             "balanced (as --fg-fraction and --fg-draw)", one_of("random", "balanced"))
    semi_fg_fraction: float = opt(0.9, "share of semi-supervised patches centred on foreground (paper: 9:1)",
                                  within(0, 1))
    device: str = opt("auto", "auto, cpu, cuda or cuda:N", (lambda v: v in ("auto", "cpu", "cuda") or
                                                            v.startswith("cuda:"), "auto, cpu, cuda or cuda:N"))
    workers: int = opt(-1, "patch loader processes; -1 -> none on the CPU (patches are cheap there), 6 on CUDA",
                       (lambda v: v >= -1, "must be >= 0, or -1 for the default"))
    save_maps: int = opt(0, "write MC variance maps of the N top-ranked cases as NIfTI", at_least(0))
    phantom_cases: int = opt(20, "demo: number of phantom cases", at_least(1))
    cache_dir: str = opt("", "preprocessed cache, shared by runs; empty -> $XDG_CACHE_HOME/proxy-al (else "
                         "~/.cache/proxy-al)")
    preset: str = opt("", "demo, paper or real (OpenKBP CT); empty -> demo without --data, paper with it")


PAPER = Config()
# demo: the same code on a laptop CPU in minutes, on 24 phantom cases (16 pool, 8 validation) at 3 mm, where
# a case is 48^3 voxels: one 48^3 window. Where a budget of minutes forces it, it departs from the paper:
#  - a smaller network, 32^3 patches, 3 cases acquired per iteration, 2 iterations, m = 4, one seed;
#  - 160 supervised and 80 semi-supervised steps that end trained: lr 5e-3, a 20-step warm-up and a cosine
#    decay to 0 (the paper's 1e-4, constant, needs thousands of steps to train from random weights);
#  - the 3-class head starts from the proxy's 2-class head: a random one did not always train in time;
#  - a proxy trained to the end (16 epochs), so that its ranking repeats from seed to seed, on foreground-
#    balanced patches: from the paper's random patches it learned nothing in 16 epochs (validation Dice 0);
#  - one patch per case (2 patches a step, not 2 x 4): 8 patches would make each step, and the demo, about
#    4x slower; validation every 40 steps (4 checks of Ms, 2 of Msemi) costs a few seconds a stage;
#  - the second iteration's Ms trains on from the first's model for 80 steps (--warm-start previous, as the
#    first author's tutorial trains one network): 160 steps from random weights left rand at 0.875 liver Dice on
#    6 cases (seed 0); trained on, it holds 0.928, and the demo takes 3:35 instead of 4:07 on 2 idle CPUs.
DEMO = dataclasses.replace(
    PAPER, data="demo", strategy="rand,proxyrank,proxyrank_var_semi", seeds=(0,), k=3, iterations=2, n_val=8,
    spacing_mm=(3.0, 3.0, 3.0), patch_vox=(32, 32, 32), roi_vox=(48, 48, 48), steps=160, semi_steps=80,
    proxy_epochs=16, proxy_val_every=4, mc_passes=4, channels=(8, 16, 32, 64, 128), lr=5e-3, lr_decay="cosine",
    warmup_steps=20, head_init="proxy", proxy_patches="balanced", phantom_cases=24, patches_per_case=1, val_every=40,
    warm_start="previous", warm_steps=80)
# real: OpenKBP head-and-neck CTs (benchmarks/openkbp.py --crop-body --max-cases 48: 24 pool, 8 validation, 16 test
# cases), learners that have learned on a 2-core CPU (docs/real_ct.md measures each choice); the demo's departures and:
#  - 4 mm voxels: the contours resampled there keep a Dice of 0.94 against themselves (6 mm: 0.78, the cap it was);
#  - 2 cases x 4 patches of 32^3 a step at lr 2e-3 (cosine): 0.80 mandible Dice by step 900, where 2 x 1 at 5e-3
#    reached 0.78 in 1,600 steps; 1,800 supervised steps, the mandible's plateau: `full` gains 0.022 test Dice
#    from 900 to 1,800 steps and under 0.01 a seed from 1,800 to 3,600 (3 seeds; the parotids still gain 0.020:
#    give them --steps 3600); the proxy 20 epochs;
#  - later iterations train on from the last model (--warm-start previous, 300 steps) and semi-supervision runs 300
#    steps: the study of 6 strategies x 3 seeds at --steps 900 (the README's table) took 6 h 20-35 min of process
#    time a structure (about 3 h 30 min on 2 torchrun ranks, measured), at 1,800 about 4 h 15 min on 2 ranks
#    (estimated), not days; k = 4, 3 iterations (4, 8, 12 labeled);
#  - checks every 150 steps, m = 5; the soft-tissue window -160,240 HU (the mandible's command keeps bone: -160,1500).
REAL = dataclasses.replace(
    DEMO, strategy="rand,var,proxyrank,proxyrank_var,proxyrank_var_semi,full", seeds=(0, 1, 2), k=4, iterations=3,
    n_test=16, spacing_mm=(4.0, 4.0, 4.0), roi_vox=(64, 64, 64), channels=(8, 16, 32, 64), patches_per_case=4,
    steps=1800, semi_steps=300, warm_start="previous", warm_steps=300, val_every=150, lr=2e-3, warmup_steps=20,
    proxy_epochs=20, proxy_val_every=5, mc_passes=5, window_hu=(-160.0, 240.0))
PRESETS = {"paper": PAPER, "demo": DEMO, "real": REAL}
PHANTOM_ONLY = ("n_val", "phantom_cases")   # sized for the 24 phantoms: a user's folder gets the paper's rule


@dataclass
class Proxy:
    """What Algorithm 1's lines 1-4 give every proxyrank strategy of a seed."""
    weights: dict      # Mp's state dict: the pre-trained weights of line 7
    scores: dict       # {case: {"variance", "entropy", "bald"}}: MC-dropout scores of the pool under Mp

# ----------------------------------------------------------------------------- Algorithm 1, lines 1-4


def pseudo_labels(study, ids):
    """Line 2: HU band + largest 26-connected component for every case, once per run; reported per case,
    with its Dice against the annotated foreground where a validation label exists (pool labels stay unread)."""
    report, labels = [], {}
    for cid in ids:
        with study.clock("pseudo labels"):
            labels[cid] = pseudo_label_of(study, cid)
        dice = (dice_per_class(study.cases.uncrop(cid, labels[cid]), np.asarray(study.cases.label(cid)) > 0, 2)[0]
                if cid in study.cases.val else None)
        report.append((cid, int(labels[cid].sum()), dice))
    labeled_hu = lambda: np.concatenate([hu[label > 0] for hu, label, _ in
                                         map(study.cases.labeled_volume, study.cases.val)])
    study.log(pseudo_label_report(study.out, report, study.cfg.hu_band, study.cfg.spacing_mm, labeled_hu))
    return labels


def pseudo_label_of(study, cid):
    """Line 2 for one case, on image(cid): made once and saved, keyed by everything that made it."""
    band = "auto" if study.cfg.hu_band == "auto" else tuple(float(x) for x in study.cfg.hu_band.split(","))

    def make():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty band is reported in pseudo_labels.csv instead
            return pseudo_label(study.cases.image_hu(cid), band, cid)

    source = os.stat(study.cases.files[cid]["image"])
    key = [study.cfg.hu_band, study.cfg.spacing_mm, study.cfg.crop, study.cases.window_hu,
           study.cases.files[cid]["image"], source.st_size, source.st_mtime_ns]   # another --crop or grid: made again
    return study.run.saved_array(f"pseudo_labels/{cid}", make, key)


def proxy_model(study, seed):
    """Lines 2-3 (training): the proxy model Mp on the pseudo labels, once per seed (a unit of its own)."""
    cfg, cases = study.cfg, study.cases
    key = Key(seed)
    model = study.new_model(2, key.of_seed("proxy"))
    if study.load_checkpoint(key.checkpoint(), model, cases.pool) is None:
        study.run.drop_scores(seed)                                         # the scores of an older Mp
        study.log(f"seed {seed}: proxy model on pseudo labels ({cfg.proxy_epochs} epochs)")
        labels = pseudo_labels(study, cases.pool + cases.val)    # lines 1-2: U (and validation, for Mp's check)
        volumes = [cases.labeled_volume(c, labels[c]) for c in cases.pool]
        val_cases = (lambda: ((cases.image(c), labels[c]) for c in cases.val)) if cases.val else None
        with study.clock("proxy training"):                                                    # line 3
            history = train_proxy(model, volumes, val_cases, study.proxy_training(), study.device,
                                  key.of_seed("proxy"), study.workers, study.bar)
        study.save_checkpoint(key.checkpoint(), model, cases.pool, history=history)
    return model


def proxy_score(study, seed, cid):
    """Line 3 (uncertainty) for one pool case: its MC-dropout scores under Mp (the queue saves them in a file of
    their own, so the pool's scoring is shared by all ranks and a restarted run skips the cases scored)."""
    return score_cases(study, study.proxy(seed), [cid], Key(seed).scoring())[cid]


def initial_scores(study, seed, strategy, proxy):
    """Line 4: the ranking of the whole pool (its cases, or their boxes) by the proxy's scores (by entropy for
    proxyrank_ent*, BALD for proxyrank_bald*, else variance), or without the proxy random_scores."""
    if strategy.proxy:
        return study.queries.ranked(proxy.scores, strategy.measure)
    return random_scores(study, np.random.default_rng(Key(seed).of_seed("initial")), strategy, [],
                         study.first_pool(strategy))


def random_scores(study, rng, strategy, taken, k):
    """Lines 4, 12 and 15 without a model, shared by the seed's random strategies (paired): a random order of
    the pool cases not taken; in patch mode k random boxes (Queries.draw), uniform in the body (rand) or by
    nnActive's foreground-favouring rule on the annotation (rand_fg_oracle) or on the pseudo labels
    (rand_fg_pseudo). The all-data reference takes whole cases in both modes."""
    queries = study.queries
    if not queries.patch or strategy.reference:
        rest = [u for u in map(queries.of, study.cases.pool) if u not in taken]
        return dict(zip(rest, rng.permutation(len(rest)).astype(float)))
    labels = {"fg_oracle": lambda c: study.cases.label(c)[study.cases.box(c)],
              "fg_pseudo": lambda c: pseudo_label_of(study, c)}.get(strategy.acquisition)
    return queries.draw(k, rng, [*map(queries.of, study.cases.given), *taken], strategy.areas, labels)

# ----------------------------------------------------------------------------- Algorithm 1, lines 5-18


def run_strategy(study, strategy, seed, proxy):
    """Lines 5-18 for one strategy and seed; its state is saved once per iteration. The units already acquired
    are kept whatever --k a rerun gives (it sizes the acquisitions still to come), and a finished run given more
    --iterations first acquires after its last iteration, as an uninterrupted run would have."""
    state = study.run_state(seed, strategy)
    if not state.initial:                                                # nothing selected yet: line 5
        state.initial.extend(add_top_k(study, state, initial_scores(study, seed, strategy, proxy),
                                       study.first_pool(strategy)))
        study.run.save_state(seed, strategy.name)
    iterations = strategy.iterations(study.cfg.iterations)
    for j in range(len(state.iterations), iterations):                                      # line 6
        if j and state.iterations[-1].acquired is None:   # the run ended at j - 1 before: its lines 12-16 now
            last = state.iterations[-1]
            acquire(study, study.final_model(seed, strategy, j - 1, last) if strategy.uses_mc else None, state, last,
                    seed, strategy, proxy, j - 1)
            study.run.save_state(seed, strategy.name)
        require_labels(study, state, seed, strategy)
        record, model = iteration(study, strategy, seed, proxy, state, j)                   # lines 7-11
        if j < iterations - 1 or study.cases.annotation:          # lines 14 / 17: else (no Msemi), Ms scores U
            acquire(study, model, state, record, seed, strategy, proxy, j)
        state.iterations.append(record)
        study.run.save_state(seed, strategy.name)        # the record and the units it acquired, in one write
        study.write_reports()
        study.progress(strategy)                                                            # line 18
    require_labels(study, state, seed, strategy)
    done, waiting = len(state.iterations), state.iterations[-1].acquired
    if waiting:                 # annotation mode's last acquisition (or a run cut back by --iterations)
        study.log(f"{strategy.name} seed {seed}: the {len(waiting)} case(s) acquired after iteration {done} are "
                  f"labeled but not trained on; rerun with --iterations {done + 1} to train on them")


def iteration(study, strategy, seed, proxy, state, j):
    """Lines 7-11 of iteration j: Ms on Tl, and for a _semi strategy Msemi on {Tl, Tn}; their validation Dice.
    Returns (the iteration's Record, its final model)."""
    cfg, queries = study.cfg, study.queries
    key, labeled = Key(seed, strategy.name, j), list(state.labeled)      # key: its checkpoints' names and seeds
    study.log(f"{strategy.name} seed {seed} iteration {j + 1}/{strategy.iterations(cfg.iterations)}: "
              f"{len(labeled)} labeled")
    warm = cfg.warm_start == "previous" and j > 0       # beyond the paper: on from iteration j - 1's model
    start = (study.final_model(seed, strategy, j - 1, state.iterations[-1]).state_dict() if warm
             else proxy.weights if strategy.proxy else None)
    model = supervised(study, labeled, start, key, cfg.warm_steps if warm and cfg.warm_steps else cfg.steps,
                       None if warm else "proxy" if strategy.proxy else "random")                     # line 7: Ms
    certain = None
    unlabeled = queries.unlabeled(labeled)                            # patch mode: cases with boxes still free
    if strategy.semi:                                                                        # line 8
        certain = most_certain(study, model, unlabeled, labeled, strategy, key) if unlabeled else []   # line 9
        if certain:
            model = semi_finetune(study, model, labeled, certain, key)                       # lines 10-11: Msemi
        else:                                   # nothing left to fine-tune on: Ms stands in for Msemi
            what = "pool case is labeled" if unlabeled == [] else "box of the pool overlaps a labeled box"
            warnings.warn(f"{strategy.name} seed {seed} iteration {j + 1}: every {what}, so lines 9-11 "
                          "(semi-supervised fine-tuning on the most certain unlabeled units) are skipped")
    voxels, fg_voxels = queries.budget(labeled)                                  # the budget spent so far
    dice = validate(study, model)
    record = Record(len(labeled), **dice, voxels=voxels, fg_voxels=fg_voxels, certain=certain,
                    pool_voxels=queries.pool_voxels(),
                    test=validate(study, model, study.cases.test) if study.cases.test else None)   # chose nothing
    study.log(f"{strategy.name} seed {seed} iteration {j + 1}: validation mean Dice {record.mean_dice:.4f}")
    return record, model


def acquire(study, model, state, record, seed, strategy, proxy, j):
    """Lines 12-16 after iteration j: the unlabeled pool scored under its final model, the top k join Tl."""
    scores = acquisition_scores(study, model, state, seed, strategy, proxy, j)              # lines 12 / 15
    acquired = add_top_k(study, state, scores, study.cfg.k)                                # lines 13 / 16
    record.acquire(acquired, study.queries.kept_scores(scores, acquired))


def add_top_k(study, state, scores, k):
    """Lines 5, 13 and 16: the k highest-scoring units (cases, or boxes overlapping no box annotated or chosen)
    not yet labeled join Tl (stable on ties). Returns them."""
    new = study.queries.top(scores, k, state.labeled)
    if len(new) < k and study.queries.patch:
        warnings.warn(f"only {len(new)} of --k {k} boxes fit in the pool beside the boxes taken; lower --k or "
                      "--query-vox")
    state.labeled.extend(new)
    state.scores.update({c: scores[c] for c in new})
    return new


def supervised(study, labeled, init_state, key, steps, origin=None):
    """Line 7: train Ms on Tl for `steps` steps, from Mp's weights (new head), from scratch, or (--warm-start
    previous) from the last iteration's model. The seed's strategies share the initial weights, and on the
    same cases the patches and dropout masks: a stage another strategy of the seed finished from the same
    `origin` ("proxy" or "random" weights; None: a start of this strategy's own) on the same cases is the same
    computation, and its weights are taken instead of trained again."""
    cfg, cases = study.cfg, sorted(labeled, key=str)          # the seeds of the same units are the same
    model = study.new_model(study.cases.num_classes, key.paired("init"))
    if study.load_checkpoint(key.checkpoint("sup"), model, labeled) is None:
        same = origin and {"seed": str(key.seed), "start": origin, "cases": list(map(str, cases)), "steps": steps}
        done = same and study.world.shared(stage_name(same), lambda: study.run.same_stage(same, study.device),
                                           study.log)          # None: trained here (another rank's: waited for)
        if done:
            model.load_state_dict(done["model"])
            stats = done.get("stats")
        else:
            if init_state is not None:
                load_backbone(model, init_state, head_from_proxy=cfg.head_init == "proxy")
            stream = study.patches.stream(study.queries.volumes(cases), key.paired("sup", *cases))
            loader = batches(stream, cfg.batch_size * cfg.patches_per_case, study.workers, study.device)
            stats = run_stage(study, model, supervised_loss, loader, steps, key.paired("dropout", *cases), "supervised")
        study.save_checkpoint(key.checkpoint("sup"), model, labeled, stats=stats)
        if same:
            study.run.mark_stage(same, key.checkpoint("sup"))
            study.world.computed(stage_name(same))
    return model


def most_certain(study, model, ids, labeled, strategy, key):
    """Line 9: as many of the most certain units of U under Ms as Tl holds (cases of `ids`, or their boxes
    overlapping no annotated box), by the strategy's own measure, else variance."""
    scores = score_cases(study, model, ids, key.scoring("certain"))
    ranked = study.queries.ranked(scores, strategy.measure, labeled, lowest=True)
    return study.queries.top(ranked, len(labeled), labeled)


def semi_finetune(study, model, labeled, certain, key):
    """Lines 10-11: noisy labels Tn of Un from Ms (tau), then Msemi = Ms fine-tuned on {Tl, Tn}."""
    cfg = study.cfg
    if study.load_checkpoint(key.checkpoint("semi"), model, labeled + certain) is not None:
        return model
    model.eval()
    with study.clock("noisy labels"):
        noisy = {c: noisy_label(sliding_window_predict(model, study.cases.image(c), cfg.roi_vox, cfg.overlap), cfg.tau)
                 for c in study.queries.boxes(certain)}                                          # line 10
    cases, pair = sorted(labeled, key=str), ("|", *sorted(certain, key=str))     # seeds shared on the same units
    sup = study.patches.stream(study.queries.volumes(cases), key.paired("semi-sup", *cases))
    two = study.patches.stream(study.queries.volumes(certain, noisy), key.paired("semi-unl", *cases, *pair),
                               cfg.semi_fg_fraction, two_views=True)
    workers, n = (max(study.workers // 2, 1) if study.workers else 0), cfg.batch_size * cfg.patches_per_case
    pairs = zip(batches(sup, n, workers, study.device), batches(two, n, workers, study.device))
    stats = run_stage(study, model, lambda m, b: semi_loss(m, b, cfg.alpha, cfg.beta), pairs, cfg.semi_steps,
                      key.paired("semi-dropout", *cases, *pair), "semi-supervised")                    # line 11
    study.save_checkpoint(key.checkpoint("semi"), model, labeled + certain, stats=stats)
    return model


def acquisition_scores(study, model, state, seed, strategy, proxy, j):
    """Lines 12 and 15: a score for every unlabeled unit of the pool under Msemi or Ms; higher is acquired first."""
    rest = study.queries.unlabeled(state.labeled)                   # patch mode: every case with free boxes
    if strategy.acquisition == "proxy":                  # the proxy ranking itself, in order
        return study.queries.ranked({c: proxy.scores[c] for c in rest}, strategy.measure, state.labeled)
    if strategy.random:
        return random_scores(study, np.random.default_rng(Key(seed).of_seed("random", j)), strategy, state.labeled,
                             study.cfg.k)
    key = Key(seed, strategy.name, j)
    mc = score_cases(study, model, rest, key.scoring())
    if study.cfg.save_maps:
        save_maps(study, model, mc, key)
    return study.queries.ranked(mc, strategy.acquisition, state.labeled)


def score_cases(study, model, ids, key):
    """MC-dropout scores of each case (ranking.mc_pool): {id: {"variance", "entropy", "bald"}}, in patch mode
    with its boxes' means (Queries.case_scores; the maps are dropped case by case)."""
    scores, progress = {}, study.bar(f"MC scoring ({study.cfg.mc_passes} passes)", len(ids))
    with study.clock("MC scoring"):
        for i, (cid, s) in enumerate(mc_pool(model, ids, study.cases.image, Scoring.of(study.cfg), key,
                                             study.queries.patch), 1):
            scores[cid] = study.queries.case_scores(cid, s)
            progress.update(i)
    return scores


# ----------------------------------------------------------------------------- the study


METHOD = Method(proxy_model=proxy_model, proxy_score=proxy_score, proxy=Proxy, run_strategy=run_strategy,
                save_maps=save_maps)       # what the study's queue runs (study.work)


def parse_args(argv=None):
    """(Config, actions) from the command line: unset flags keep the preset's value. The demo preset's
    phantom-only settings (PHANTOM_ONLY) apply only to the phantom data."""
    cfg, actions = cli.parse_args(Config, PRESETS, __doc__, argv)
    if cfg.preset == "demo" and cfg.data != "demo":
        cfg = dataclasses.replace(cfg, **{k: getattr(PAPER, k) for k in PHANTOM_ONLY if k not in actions.given})
    return cfg, actions


def main(argv=None):
    warnings.formatwarning = cli.format_warning         # a warning's message, not the source line behind it
    cfg, actions = parse_args(argv)
    cli.check_options(cfg)                   # every check before the long work
    try:
        if actions.report:
            return report_only(cfg)
        if actions.export_nnunet is not None:
            return export_nnunet(cfg, actions)
        return run_study(cfg, METHOD, actions.rebuild_state, actions.default_strategy, actions.boxes_done)
    except ProxyAlError as err:              # a problem the user can fix: its one-line message, exit status 1
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    sys.exit(main())
