"""proxy-al's MONAI Label app: "Next Sample" in 3D Slicer or OHIF asks proxy-al which image to label next.

    pip install torch==2.13.0 -r requirements.txt -r requirements-monailabel.txt
    monailabel start_server --app monailabel_app --studies <folder of NIfTI scans> [--conf key value ...]

Strategies (POST /activelearning/<name>):
    proxyrank       the proxy's ranking (a model trained on the studies' HU-band pseudo labels, MC-dropout variance),
                    before and after the first labels: Algorithm 1's proxyrank
    proxyrank_var   the proxy's ranking until a label is saved; then the MC-dropout variance of a model fine-tuned
                    from the proxy on the labeled images (lines 7 and 15), trained again when they change
    random          MONAI Label's own, for comparison
An image labeled, or served by any strategy less than --conf served_timeout_s ago and not labeled since, is skipped.

--conf takes the command line's settings by their names (hu_band, spacing_mm, mc_passes, steps, ...; `python
al_loop.py --help`) on the paper preset, and the app's own: labels (foreground class names, e.g. liver,tumour),
served_timeout_s (a day), run_dir (default <studies>/.proxy-al). A bad value stops the server with the command
line's message. The proxy trains in the background from the start; a call before it is ready waits for it (the
server's log shows its progress). MONAI Label loads this file as a module of its own: pool.py holds the work.
"""
import logging
import os
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]        # pool.py beside this file, the project's modules above it

from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import DefaultLabelTag  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402

import pool  # noqa: E402
import strategies  # noqa: E402
from files import ProxyAlError  # noqa: E402

logger = logging.getLogger(__name__)
NIFTI = (".nii.gz", ".nii")             # what the project reads


def images_of(datastore):
    """{id: image file} of the datastore's NIfTI images."""
    paths = {i: datastore.get_image_uri(i) for i in datastore.list_images()}
    return {i: p for i, p in paths.items() if p.endswith(NIFTI)}


def labels_of(datastore, images):
    """{id: label file} of the images with a final label (what Slicer's "Submit Label" saves)."""
    tag = DefaultLabelTag.FINAL.value
    return {i: datastore.get_label_uri(i, tag) for i in datastore.get_labeled_images() if i in images}


def served_within(info, now, timeout_s):
    """Whether an image was served less than timeout_s ago by any strategy: MONAI Label's activelearning
    endpoint records each answer in the image's info as {"strategy": {name: {"ts": unix seconds, ...}}}."""
    return any(now - served.get("ts", 0) < timeout_s for served in info.get("strategy", {}).values())


class ProxyRank(Strategy):
    """A proxy strategy of Algorithm 1 (strategies.parse(name)): the first image of its ranking (pool.Pool.ranking)
    not labeled and not served within the time-out."""

    def __init__(self, ranker, name, description):
        super().__init__(description)
        self.pool, self.strategy = ranker, strategies.parse(name)

    def __call__(self, request, datastore):
        images = images_of(datastore)
        labeled = labels_of(datastore, images)
        t0 = time.time()
        try:
            ranked = self.pool.ranking(self.strategy, images, labeled)
        except ProxyAlError as err:                     # the user's to fix: the message alone in the log
            logger.error(f"{self.strategy}: {err}")
            raise
        by = ("the proxy", self.strategy.measure) if pool.by_proxy(self.strategy, labeled) else \
            (f"the model fine-tuned on {len(labeled)} labeled images", self.strategy.acquisition)
        now, timeout_s = time.time(), self.pool.settings.served_timeout_s
        for rank, (image, score) in enumerate(ranked, 1):
            if image not in labeled and not served_within(datastore.get_image_info(image), now, timeout_s):
                logger.info(f"{self.strategy}: {image}, rank {rank} of {len(ranked)} under {by[0]} ({by[1]} "
                            f"{score:.4g}; {now - t0:.1f} s)")
                return {"id": image, "score": score, "rank": rank}
        logger.info(f"{self.strategy}: no image left: every unlabeled image was served less than {timeout_s:g} s ago "
                    "(--conf served_timeout_s)")
        return None


class ProxyAlApp(MONAILabelApp):
    """The app: its settings checked before anything starts, the strategies, and the proxy trained from the start."""

    def __init__(self, app_dir, studies, conf):
        try:
            settings = pool.settings(conf, studies)
        except ProxyAlError as err:
            # The message alone, and the server stops before it listens. (An exception raised here reaches the
            # user as a traceback of the web framework's startup, with the message at its end.)
            print(f"proxy-al: bad --conf\n{err}", file=sys.stderr, flush=True)
            os._exit(1)
        self.pool = pool.Pool(settings, Path(studies).resolve().name)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="proxy-al",
                         description="Warm-start active learning: what to label next, before the first label",
                         labels={name: value for value, name in enumerate(settings.labels, 1)})

    def init_strategies(self):
        return {
            "proxyrank": ProxyRank(self.pool, "proxyrank", "proxy-al: the proxy's ranking (pseudo labels, MC "
                                   "variance)"),
            "proxyrank_var": ProxyRank(self.pool, "proxyrank_var", "proxy-al: the proxy's ranking, then MC variance "
                                       "of a model fine-tuned from it on the labeled images"),
            "random": Random(),
        }

    def on_init_complete(self):
        super().on_init_complete()
        images = images_of(self.datastore())
        logger.info(f"proxy-al: {len(images)} NIfTI images; the proxy's ranking is prepared in the background")
        threading.Thread(target=self.pool.prepare, args=(images, labels_of(self.datastore(), images)),
                         name="proxy-al", daemon=True).start()
