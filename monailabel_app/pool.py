"""proxy-al behind MONAI Label: the studies folder as a data folder of the project, a run folder per settings and
image set, and the rankings Algorithm 1 gives before and after the first labels. Nothing of the method is here:
pseudo labels and the proxy come from al_loop.proxy_model (lines 1-3), the fine-tuned model from
al_loop.supervised (line 7), MC scoring and its order from ranking.py (lines 3-4 and 15), images from the
project's Cases (study.open_study), settings from the command line's own parser and checks. No MONAI Label
import: main.py holds what MONAI Label calls.

    <studies>/<id>.nii.gz                  an image of MONAI Label's datastore
    <studies>/labels/final/<id>.nii.gz     its label, once saved (PUT /datastore/label, Slicer's "Submit Label")
    <run dir>/data/dataset.json            the project's data folder: every image and the labels saved so far,
                                           by their paths in the studies folder (nothing is copied)
    <run dir>/cache/                       preprocessed volumes (--cache-dir)
    <run dir>/runs/<key>/                  a run folder (run_folder.py) per settings and image set: split.json
                                           (every image in the pool), the proxy's checkpoint and pool scores,
                                           and per labeled set a fine-tuned model and its scores (labeled/)
<run dir> is --conf run_dir, else <studies>/.proxy-al.
"""
import contextlib
import dataclasses
import io
import json
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import al_loop
import cli
import keys
import ranking
import run_folder
import strategies
from files import ProxyAlError, atomic_write_json, read_json
from folders import natural_key
from study import open_study
from units import Volume

logger = logging.getLogger(__name__)

# The app's own --conf keys (not settings of the method), with their defaults. served_timeout_s: a day, as MONAI
# Label's epistemic strategy forgets what it served (its `reset`).
APP_CONF = {"labels": "foreground", "served_timeout_s": str(24 * 3600), "run_dir": ""}
# Config fields that --conf may not set: the app decides them, or they mean nothing for one image a call.
NOT_FROM_CONF = {
    "data": "the images are the server's --studies folder",
    "data_root": "the images are the server's --studies folder",
    "phantom_cases": "the images are the server's --studies folder",
    "out": "the app keeps a run folder per settings and image set under --conf run_dir",
    "strategy": "the strategy is the one a call names: POST /activelearning/<strategy>",
    "k": "a call serves one image",
    "iterations": "the app trains again whenever the labeled images change",
    "n_val": "every image is in the pool: the app validates on none",
    "n_test": "every image is in the pool: the app tests on none",
    "warm_start": "the app fine-tunes the proxy on each labeled set (Algorithm 1, line 7)",
    "warm_steps": "the app fine-tunes the proxy on each labeled set (Algorithm 1, line 7): --conf steps",
    "query": "the app serves whole images",
    "query_vox": "the app serves whole images",
    "save_maps": "the app writes no maps",
}
MONAI_LABEL_CONF = {"server_mode"}      # read by MONAI Label itself


@dataclass(frozen=True)
class Settings:
    """What the app runs with."""
    cfg: al_loop.Config          # the project's settings (data, cache_dir set by the app)
    labels: tuple                # foreground class names: label values 1, 2, ...
    served_timeout_s: float      # an image served less than this ago and not labeled is not served again
    run_dir: Path


def settings(conf, studies) -> Settings:
    """The app's settings from MONAI Label's --conf {key: value} (a key written with _ or -): the Config fields
    parsed and checked as the command line's options are, on the paper preset unless --conf preset names
    another; and the app's own keys (APP_CONF). ProxyAlError with the command line's message for a bad value."""
    if str(studies).startswith(("http://", "https://")):
        raise ProxyAlError(f"--studies {studies}: proxy-al ranks a local folder of NIfTI scans; give its path")
    conf = {k.replace("-", "_"): str(v) for k, v in conf.items() if k not in MONAI_LABEL_CONF}
    refused = [f"--conf {k}: {why}" for k, why in NOT_FROM_CONF.items() if k in conf]
    if refused:
        raise ProxyAlError("\n".join(refused) + "; leave it out")
    app = {k: conf.get(k, default) for k, default in APP_CONF.items()}
    run_dir = Path(app["run_dir"] or Path(studies) / ".proxy-al")
    argv = [a for k, v in conf.items() if k not in APP_CONF for a in (f"--{k.replace('_', '-')}", v)]
    cfg = parse(argv + ["--data", str(run_dir / "data")])
    cfg = dataclasses.replace(cfg, cache_dir=cfg.cache_dir or str(run_dir / "cache"))
    return Settings(cfg, label_names(app["labels"]), timeout_s(app["served_timeout_s"]), run_dir)


def parse(argv):
    """A Config from argv by al_loop's parser and cli.check_options: the command line's checks, and its
    message for a bad value (for a parser error its 'error: ...' line, as argparse prints it after the usage)."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            cfg, _ = al_loop.parse_args(argv)
        cli.check_options(cfg)
    except SystemExit as stop:
        said = stop.code if isinstance(stop.code, str) else printed.getvalue().strip().splitlines()[-1]
        raise ProxyAlError(said[said.find("error: "):] if "error: " in said else said) from None
    return cfg


def label_names(text):
    names = tuple(n.strip() for n in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise ProxyAlError(f"--conf labels {text!r}: the foreground classes' names, label values 1, 2, ... in "
                           "order, comma-separated and each once, e.g. --conf labels liver,tumour")
    return names


def timeout_s(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ProxyAlError(f"--conf served_timeout_s {text!r}: seconds >= 0 after which an image served and not "
                           "labeled may be served again, e.g. 3600")
    return value

# ----------------------------------------------------------------------------- the data folder and run folder


def stamp(path):
    """[size, mtime_ns] of a file: another version of it gets another stamp."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def digest(obj):
    return f"{zlib.crc32(json.dumps(obj, sort_keys=True).encode()):08x}"


def write_data_folder(folder, name, labels, images, labeled):
    """The project's data folder of the studies: dataset.json listing every image and the label of each labeled
    one by its absolute path (the files stay where MONAI Label keeps them), rewritten only when it changes.
    name: the task's (its HU window follows it, as for a folder of that name); images, labeled: {id: path}."""
    info = {"name": name, "labels": {"0": "background", **{str(i): n for i, n in enumerate(labels, 1)}},
            "training": [{"image": str(Path(images[c]).resolve()),
                          **({"label": str(Path(labeled[c]).resolve())} if c in labeled else {})}
                         for c in sorted(images, key=natural_key)]}
    path = Path(folder) / "dataset.json"
    try:
        if json.loads(path.read_text(encoding="utf-8")) == info:
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(path, info)


def run_key(settings, name, images):
    """A run folder's name: a hash of everything its saved stages depend on: every setting but run_folder.MAY_CHANGE,
    the classes, the task's name (its HU window) and the images (ids and file versions). Other --conf settings or
    other studies get a proxy of their own; the same ones find theirs again."""
    made = {k: v for k, v in dataclasses.asdict(settings.cfg).items() if k not in run_folder.MAY_CHANGE}
    return digest([made, settings.labels, name, {c: stamp(p) for c, p in images.items()}])


def fine_tune_key(seed, labels):
    """The stage of the model fine-tuned on the labeled set `labels` (a digest): seed<S>/labeled-<labels>/iter0
    (keys.Key; Ms's seeds are the seed's own, as for every strategy)."""
    return keys.Key(seed, f"labeled-{labels}")


def by_proxy(strategy, labeled):
    """Whether a proxy strategy ranks by the proxy: before any label (lines 4-5), and always for proxyrank, whose
    acquisition is the proxy's ranking itself; else by the model fine-tuned on the labels (lines 7 and 15)."""
    return strategy.acquisition == "proxy" or not labeled


class Pool:
    """The rankings of one server's studies. One job at a time (`lock`): the preparation at start and the
    calls share the models, the run folder and torch's random state (each scoring seeds it)."""

    def __init__(self, settings, name):
        self.settings, self.name, self.seed = settings, name, settings.cfg.seeds[0]
        self.lock = threading.Lock()
        self._open = (None, None)                   # (the images and labels it was opened for, the Study)
        self._held = contextlib.ExitStack()         # the run folders' locks, held while the server runs
        self._locked = set()

    def study(self, images, labeled):
        """The Study of these images and labels ({id: path}): the data folder written, the run folder of these
        settings and images locked (split.json: every image in the pool) and the images preprocessed once."""
        key = json.dumps([images, labeled], sort_keys=True)
        if self._open[0] == key:
            return self._open[1]
        s = self.settings
        write_data_folder(s.run_dir / "data", self.name, s.labels, images, labeled)
        out = s.run_dir / "runs" / run_key(s, self.name, images)
        if out not in self._locked:
            self._held.enter_context(run_folder.locked(out))     # a second server on these studies stops here
            self._locked.add(out)
            if not (out / "split.json").exists():
                atomic_write_json(out / "split.json", {"seed": 0, "n_val": 0, "val": [],
                                                       "pool": sorted(images, key=natural_key)})
            logger.info(f"proxy-al: {len(images)} images, run folder {out}")
        study, _ = open_study(dataclasses.replace(s.cfg, out=str(out)), out)
        study.cases.preprocess(list(study.cases.files), study.bar("preprocess", len(study.cases.files)))
        study.run.write_json("config.json", study.settings())
        self._open = (key, study)
        return study

    # --- the rankings

    def ranking(self, strategy, images, labeled):
        """[(id, score)] of a proxy strategy (strategies.Strategy), the image to annotate first first: the proxy's
        ranking by the strategy's measure (lines 3-4), or the fine-tuned model's by its acquisition (line 15), as
        by_proxy says. images, labeled: {id: file}."""
        with self.lock:
            study = self.study(images, labeled)
            if by_proxy(strategy, labeled):
                return ranking.rank(self.proxy_scores(study), strategy.measure)
            return ranking.rank(self.model_scores(study, labeled), strategy.acquisition)

    def proxy_scores(self, study):
        """Lines 1-3: the proxy Mp on the pseudo labels of every image (al_loop.proxy_model: trained once, then
        its checkpoint) and each image's MC-dropout scores under it, saved per image in the run folder: a call
        after the first reads them. {id: {"variance", "entropy", "bald"}}."""
        seed, pool = self.seed, study.cases.pool
        if not all(study.run.has_scores(seed, c) for c in pool):
            t0 = time.time()
            model = al_loop.proxy_model(study, seed)      # lines 1-3, or the checkpoint of an earlier call
            todo = [c for c in pool if not study.run.has_scores(seed, c)]     # a new proxy dropped older scores
            self.score(study, model, todo, keys.Key(seed).scoring(), lambda c, s: study.run.save_scores(seed, c, s))
            logger.info(f"proxy-al: the proxy's ranking of {len(pool)} images is ready ({time.time() - t0:.0f} s)")
        return {c: study.run.load_scores(seed, c) for c in pool}

    def model_scores(self, study, labeled):
        """Lines 7 and 15: Ms fine-tuned from Mp's weights on the labeled images (al_loop.supervised, its
        checkpoint named by the labeled set: the ids and their label files' versions), then the MC-dropout
        scores of every other image under it, saved per labeled set: a call with the same labels reads them."""
        seed, labels = self.seed, digest({c: stamp(p) for c, p in labeled.items()})
        key = fine_tune_key(seed, labels)                       # checkpoints/seed<S>/labeled-<labels>/iter0_sup.pt
        path = study.out / "labeled" / f"seed{seed}_{labels}.json"
        if path.exists():
            logger.info(f"proxy-al: the model of these {len(labeled)} labeled images is trained ({path})")
            return read_json(path, lambda s: None if isinstance(s, dict) else "not a scores object", "delete it")
        logger.info(f"proxy-al: {len(labeled)} labeled images, a set no model was trained on: fine-tuning the proxy "
                    f"on them ({study.cfg.steps} steps), then scoring the other images")
        proxy = al_loop.proxy_model(study, seed)
        try:
            study.cases.check_labels()                        # a label that does not fit its image, named
            units = [Volume(c) for c in sorted(labeled)]      # an annotator labels whole images
            model = al_loop.supervised(study, units, proxy.state_dict(), key, study.cfg.steps)      # line 7
        except ProxyAlError as err:                           # a label file the annotator can fix
            names = ", ".join(f"{v} {n}" for v, n in enumerate(self.settings.labels, 1))
            raise ProxyAlError(f"{err}\nThe labels are MONAI Label's (labels/final/ in the studies folder); the "
                               f"app's classes are 0 background, {names} (--conf labels). Correct the label and "
                               "submit it again, or restart the server with the --conf labels it uses") from None
        scores, rest = {}, [c for c in study.cases.pool if c not in labeled]
        self.score(study, model, rest, key.scoring(), scores.__setitem__)                     # line 15
        atomic_write_json(path, scores)
        return scores

    def score(self, study, model, ids, key, keep):
        """keep(id, scores) for each image of ids: its MC-dropout scores under model (ranking.mc_pool, seeded
        by key and image), with the project's progress lines."""
        bar = study.bar(f"MC scoring ({study.cfg.mc_passes} passes)", len(ids))
        for i, (cid, s) in enumerate(ranking.mc_pool(model, ids, study.cases.image, ranking.Scoring.of(study.cfg),
                                                     key), 1):
            keep(cid, {m: float(s[m]) for m in strategies.MC_MEASURES})
            bar.update(i)

    def prepare(self, images, labeled):
        """The proxy's ranking made ahead of the first call (the server starts it in a thread). A failure is
        logged; the next call tries again (and, failing, logs the message and answers HTTP 500)."""
        try:
            self.ranking(strategies.parse("proxyrank"), images, labeled)
        except ProxyAlError as err:
            logger.error(f"proxy-al: {err}")
        except Exception:
            logger.exception("proxy-al: preparing the proxy's ranking failed; the next call tries again")
