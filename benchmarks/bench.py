"""Benchmark of the pipeline on one full-size CT case: preprocessing, cache, patches, training step, MC scoring.

    python benchmarks/bench.py                                 # ours only; --device auto picks CUDA when present
    python benchmarks/bench.py --compare-monai --json b.json   # MONAI equivalents in the same process, with ratios
    python benchmarks/bench.py --quick                         # small case, 64^3 windows: a smoke run of minutes

The case is generated here, in a child process (its memory is not counted as ours): a phantom at clinical size,
512 x 512 x 160 voxels of 0.8 x 0.8 x 1.5 mm, int16, gzip NIfTI, flipped (LPS-like) affine
(phantom.make_phantom_dataset).
Stages, each timed as seconds per case unless said otherwise (cheap stages: median of --repeats runs):
  1. preprocess   data.preprocess_case + data.window to 1.5 x 1.5 x 2 mm, next to a bare nibabel read of the files
  2. cached load  data.cached_case (memory-mapped .npy) plus reading every voxel
  3. patches      96^3 foreground-balanced patches per second, train.sample_patch with a precomputed foreground index
  4. train step   batch 2 cases x 4 patches of 96^3 (AMP on CUDA) through train.train_steps, and the share spent waiting for data
  5. MC scoring   proxy_al.mc_scores with m passes on the resampled case, and its peak extra memory; and the
                  same case scored for region queries (--query patch): the per-voxel maps of the three measures
                  and every candidate box's mean (regions.box_scores, a --query-vox box a quarter box apart)
  6. peak RSS     of this process: sampled VmRSS per stage, and the kernel's high-water mark
With --compare-monai, MONAI's equivalents run on the same file and the same network, alternating with ours:
LoadImaged, EnsureChannelFirstd, Orientationd(RAS), Spacingd, ScaleIntensityRanged; RandCropByPosNegLabeld;
m calls of sliding_window_inference (sw_batch_size 4, overlap 0.25), variance of the stacked softmax volumes.
The MC agreement check reruns both on the largest crop where both place the same windows (see stage_mc).
MONAI is optional: it is imported only under --compare-monai.
"""
import dataclasses
import gc
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]   # the repository: the core modules, from any working folder
sys.path.insert(0, str(ROOT))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import al_loop  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import files  # noqa: E402
import folders  # noqa: E402
import proxy_al  # noqa: E402
import regions  # noqa: E402
import strategies  # noqa: E402
import train  # noqa: E402
from cli import opt  # noqa: E402
from proxy_al import enable_mc_dropout  # noqa: E402
from unet import UNet  # noqa: E402

T0 = time.time()


@dataclass
class BenchConfig:
    device: str = opt("auto", "cpu, cuda or auto (cuda when available); GPU stages: training, MC")
    json: str = opt("", "also write every number to this JSON file")
    compare_monai: bool = opt(False, "run MONAI's equivalents too (needs `pip install monai`)")
    repeats: int = opt(3, "runs of the cheap stages (preprocess, cached load, patches); median")
    mc_passes: int = opt(10, "MC-dropout passes m (paper: 10)")
    steps: int = opt(10, "timed training steps (after one untimed warm-up step)")
    quick: bool = opt(False, "smoke run: small case, 64^3 patches, 2 steps, 1 repeat")
    work: str = opt("", "folder for the phantom and the cache, kept; empty -> a temporary folder")
    workers: int = opt(-1, "patch loader processes; -1 -> 1 on the CPU, 6 on CUDA (as al_loop)")
    seed: int = opt(0, "phantom, network weights, patch and dropout streams")
    shape_vox: tuple = opt((512, 512, 160), "X,Y,Z voxels of the generated case (full: clinical size)")
    spacing_mm: tuple = opt((0.8, 0.8, 1.5), "X,Y,Z voxel size of the case in mm")
    patch_vox: int = opt(96, "training patch and sliding-window ROI side (paper: 96)")
    batch_size: int = opt(2, "cases per training step (al_loop default)")
    patches_per_case: int = opt(4, "patches per case and training step (al_loop's paper preset; 1: 2 patches)")
    monai_autocast: bool = opt(False, "run MONAI's MC under the autocast ours uses (same precision)")
    query_vox: int = opt(32, "box side of the region-query MC row (al_loop --query patch --query-vox)")


FULL = BenchConfig()
# 195 x 0.8 / 1.5 and 96 x 1.5 / 2 are whole numbers: the 1.5 x 1.5 x 2 mm grid then has the file's exact extent,
# so our grid (extent kept) and MONAI's (spacing kept) coincide and the agreement checks compare like with like.
QUICK = dataclasses.replace(FULL, quick=True, shape_vox=(195, 195, 96), patch_vox=64, steps=2, repeats=1)
PRESETS = {"full": FULL, "quick": QUICK}
TARGET_SPACING_MM = (1.5, 1.5, 2.0)   # paper: 1.5 x 1.5 x 2.0 mm
WINDOW_HU = data.TASK_WINDOWS_HU["Task03_Liver"]   # paper: Task03 window [-21, 189] HU
OVERLAP = 0.25                        # sliding-window overlap of both implementations
MONAI_SW_BATCH = 4                    # sliding_window_inference(sw_batch_size=4), as in MONAI's tutorials

# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    """BenchConfig from the command line; --quick starts from the QUICK preset, given flags override."""
    p = cli.config_parser(BenchConfig, PRESETS, __doc__)
    given = cli.config_values(BenchConfig, vars(p.parse_args(argv)), p)
    cfg = dataclasses.replace(QUICK if given.get("quick") else FULL, **given)
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        p.error(f"--device {cfg.device}: choose cpu, cuda or auto")
    if cfg.repeats < 1 or cfg.mc_passes < 2 or cfg.steps < 1 or cfg.patch_vox % 16:
        p.error("need --repeats >= 1, --mc-passes >= 2, --steps >= 1 and --patch-vox a multiple of 16")
    if len(cfg.shape_vox) != 3 or len(cfg.spacing_mm) != 3:
        p.error("--shape-vox and --spacing-mm take three values: X,Y,Z")
    return cfg


def import_monai():
    """The monai package, or exit with what to do (MONAI is not a dependency of this project)."""
    try:
        import monai
        import monai.inferers
        import monai.transforms
    except ImportError as e:
        raise SystemExit(f"--compare-monai needs MONAI, which is not installed ({e}).\n"
                         "Install it for the comparison only: pip install monai   (then rerun)")
    return monai

# ----------------------------------------------------------------------------- measuring


def log(message):
    """Progress line with the time since the benchmark started."""
    print(f"[{train.fmt_s(time.time() - T0)}] {message}", flush=True)


def rss_mb():
    """Resident memory of this process now, MB (VmRSS); the high-water mark where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024   # ru_maxrss: bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class RssSampler:
    """Samples rss_mb() every `every_s` seconds on a daemon thread.

    `section(tag)` gives the peak above the RSS at its start ("extra") and keeps a peak per tag, so the
    memory of MONAI's runs is never charged to ours. Sampling misses spikes shorter than every_s, and memory
    the allocator kept from an earlier stage is in the baseline, so a stage that reuses it shows less extra.
    """

    def __init__(self, every_s=0.005):
        self.every_s, self.tag, self.window_peak, self.peaks = every_s, None, 0.0, {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            mb = rss_mb()
            self.window_peak = max(self.window_peak, mb)
            if self.tag is not None:
                self.peaks[self.tag] = max(self.peaks.get(self.tag, 0.0), mb)
            time.sleep(self.every_s)

    @contextmanager
    def section(self, tag):
        """Yields a dict that holds base_mb, peak_mb and extra_mb (peak - base) once the block ends."""
        gc.collect()
        stats = {"base_mb": rss_mb()}
        self.window_peak, self.tag = stats["base_mb"], tag
        try:
            yield stats
        finally:
            stats["peak_mb"] = max(self.window_peak, rss_mb())
            stats["extra_mb"] = stats["peak_mb"] - stats["base_mb"]
            self.peaks[tag] = max(self.peaks.get(tag, 0.0), stats["peak_mb"])
            self.tag = None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(runs, repeats, sampler, device=torch.device("cpu"), keep_all=False, log_each=False):
    """Run each of `runs` {name: fn} once per repeat, in turn, so drifts in machine load hit all alike.
    log_each: a progress line as each run ends (for the long MC runs).

    Names starting with 'monai' are charged to the 'monai' memory tag, the rest to 'ours'.
    Returns {name: {"s": [wall seconds per repeat], "median_s": float, "extra_mb": max, "result": last}}
    (+ "results": every repeat's result with keep_all, for small results).
    """
    out = {name: {"s": [], "extra_mb": 0.0, "results": []} for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            with sampler.section("monai" if name.startswith("monai") else "ours") as mem:
                sync(device)
                t = time.perf_counter()
                result = fn()
                sync(device)
                seconds = time.perf_counter() - t
            out[name]["s"].append(seconds)
            if log_each:
                log(f"    {name}: {seconds:.0f} s, {mem['extra_mb']:.0f} MB extra")
            out[name]["extra_mb"] = max(out[name]["extra_mb"], mem["extra_mb"])
            out[name]["result"] = result
            if keep_all:
                out[name]["results"].append(result)
            del result
    for record in out.values():
        record["median_s"] = float(np.median(record["s"]))
        if not keep_all:
            del record["results"]
    return out

# ----------------------------------------------------------------------------- the case


def make_case(cfg, work):
    """Write the phantom (one case) under work/phantom in a child process; reuses a complete one.

    Returns (case dict from folders.read_msd, {"seconds", "child_peak_rss_mb", "axcodes", "file_mb"}).
    """
    root = Path(work) / "phantom"
    code = ("import sys; a = sys.argv; sys.path.insert(0, a[1]); from phantom import make_phantom_dataset; "
            "make_phantom_dataset(a[2], 1, int(a[3]), [int(v) for v in a[4].split(',')], "
            "[float(v) for v in a[5].split(',')])")
    args = [str(ROOT), str(root), str(cfg.seed), ",".join(map(str, cfg.shape_vox)),
            ",".join(map(str, cfg.spacing_mm))]
    existed = (root / "dataset.json").is_file()   # make_phantom_dataset keeps a complete folder of the same parameters
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code] + args, check=True)
    seconds = time.perf_counter() - t
    case = folders.read_msd(root)[0]
    info = {"seconds": seconds, "child_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "axcodes": "".join(nib.aff2axcodes(nib.load(case["image"]).affine)),
            "file_mb": os.path.getsize(case["image"]) / 2**20, "shape_vox": list(cfg.shape_vox),
            "spacing_mm": list(cfg.spacing_mm), "existed_before": existed}
    return case, info

# ----------------------------------------------------------------------------- 1. preprocessing


def ours_preprocess(case, with_label=True):
    """preprocess_case + window: the model's input (X, Y, Z) float32 in [0, 1] and the label."""
    image_hu, label = data.preprocess_case(case["image"], case["label"] if with_label else None, TARGET_SPACING_MM)
    return data.window(image_hu, *WINDOW_HU), label


def nibabel_read(paths):
    """The floor: read and decompress every voxel of the files with nibabel, nothing else."""
    return [np.asarray(nib.load(p).dataobj) for p in paths]


def monai_chain(monai, patch_vox):
    """MONAI's equivalents of our preprocessing (image and label) and patch sampler, as transform objects."""
    t, keys = monai.transforms, ["image", "label"]
    with warnings.catch_warnings():  # Orientationd warns about a changed default of `labels`; RAS is explicit
        warnings.simplefilter("ignore", FutureWarning)
        chain = t.Compose([t.LoadImaged(keys), t.EnsureChannelFirstd(keys), t.Orientationd(keys, axcodes="RAS"),
                           t.Spacingd(keys, pixdim=TARGET_SPACING_MM, mode=("bilinear", "nearest")),
                           t.ScaleIntensityRanged("image", a_min=WINDOW_HU[0], a_max=WINDOW_HU[1],
                                                  b_min=0.0, b_max=1.0, clip=True)])
    crop = t.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=(patch_vox,) * 3, pos=1, neg=1,
                                    num_samples=1)
    return chain, crop


def preprocess_checks(ours, theirs):
    """Agreement of ours and MONAI's preprocessing on the common corner-aligned region of both RAS grids.

    ours: (image (X, Y, Z), label); theirs: MONAI dict with (1, X', Y', Z') image and label.
    Both grids start at the first RAS voxel of the file (within half a voxel), so index i matches index i.
    """
    image, label = ours
    m_image, m_label = (np.asarray(theirs[k])[0] for k in ("image", "label"))
    common = tuple(slice(0, min(a, b)) for a, b in zip(image.shape, m_image.shape))
    shape_gap = max(abs(a - b) for a, b in zip(image.shape, m_image.shape))
    agree = float(np.mean(label[common] == m_label[common].astype(np.uint8)))
    mad = float(np.mean(np.abs(image[common] - m_image[common])))
    return {"ours_shape": list(image.shape), "monai_shape": list(m_image.shape), "max_shape_gap_vox": shape_gap,
            "label_agreement": agree, "window_mad": mad,
            "ok_shape": shape_gap <= 1, "ok_label": agree >= 0.99, "ok_window": mad <= 0.01}


def stage_preprocess(cfg, case, monai, sampler):
    """Stage 1; returns (results of alternate, checks or None, MONAI's preprocessed dict or None)."""
    runs = {"ours": lambda: ours_preprocess(case), "floor": lambda: nibabel_read([case["image"], case["label"]]),
            "ours_image": lambda: ours_preprocess(case, with_label=False),
            "floor_image": lambda: nibabel_read([case["image"]])}
    if monai is not None:
        chain, _ = monai_chain(monai, cfg.patch_vox)
        runs["monai"] = lambda: chain({"image": case["image"], "label": case["label"]})
    nibabel_read([case["image"], case["label"]])   # untimed: files in the page cache, so no run pays the disk
    res = alternate(runs, cfg.repeats, sampler)
    checks = preprocess_checks(res["ours"]["result"], res["monai"]["result"]) if monai is not None else None
    theirs = res["monai"].pop("result") if monai is not None else None
    for record in res.values():
        record.pop("result", None)
    return res, checks, theirs

# ----------------------------------------------------------------------------- 2-3. cache and patches


def stage_cache(cfg, case, work, sampler):
    """Stage 2: build the cache once (timed), then open + read every voxel. Returns (record, image, label)."""
    cache = Path(work) / "cache"
    shutil.rmtree(cache, ignore_errors=True)   # our own folder: a fresh cache, so the build is measured
    t = time.perf_counter()
    data.cached_case(case, cache, TARGET_SPACING_MM)
    build_s = time.perf_counter() - t

    def open_only():
        return data.cached_case(case, cache, TARGET_SPACING_MM)

    def open_and_read():
        image_hu, label = data.cached_case(case, cache, TARGET_SPACING_MM)
        return np.array(image_hu), np.array(label)

    res = alternate({"open": open_only, "ours": open_and_read}, cfg.repeats, sampler)
    image_hu, label = res["open"].pop("result")
    res["ours"].pop("result")
    res["build_s"] = build_s
    res["memory_mapped"] = isinstance(image_hu, np.memmap) and isinstance(label, np.memmap)
    return res, image_hu, label


def patches_per_second(draw, min_s=1.0, min_n=5):
    """Call draw() until min_s seconds and min_n calls have passed; (patches per second, share with foreground
    at the patch centre)."""
    n, hits, t = 0, 0, time.perf_counter()
    while n < min_n or time.perf_counter() - t < min_s:
        hits += draw()
        n += 1
    return n / (time.perf_counter() - t), hits / n


def stage_patches(cfg, image_hu, label, monai, theirs, sampler):
    """Stage 3: foreground-balanced patches from the memory-mapped cache vs RandCropByPosNegLabeld."""
    t = time.perf_counter()
    fg_index = train.foreground_index(label)
    index_s = time.perf_counter() - t
    rng, p, c = np.random.default_rng(cfg.seed), (cfg.patch_vox,) * 3, cfg.patch_vox // 2

    def ours():
        _, lab = train.sample_patch(image_hu, label, p, 0.5, rng, WINDOW_HU, fg_index=fg_index)
        return bool(lab[c, c, c])

    runs = {"ours": lambda: patches_per_second(ours)}
    if monai is not None:
        crop = monai_chain(monai, cfg.patch_vox)[1]
        crop.set_random_state(cfg.seed)
        runs["monai"] = lambda: patches_per_second(lambda: bool(crop(theirs)[0]["label"][0, c, c, c]))
    res = alternate(runs, cfg.repeats, sampler, keep_all=True)
    for record in res.values():
        rates, fg_shares = zip(*record.pop("results"))
        record["per_s_runs"], record["per_s"] = list(rates), float(np.median(rates))
        record["fg_centre_share"] = float(np.mean(fg_shares))
        record.pop("result")
    res["foreground_index_s"] = index_s
    return res

# ----------------------------------------------------------------------------- 4. training step


def stage_train(cfg, device, volume, num_classes, sampler):
    """Stage 4: train.train_steps on batches from a PatchStream, after one untimed warm-up step.

    volume: (image_hu memmap, label memmap, fg_index). Returns (record, the trained model).
    """
    torch.manual_seed(cfg.seed)
    model = UNet(out_channels=num_classes).to(device)
    optimizer, scaler = train.make_optimizer(model, 1e-4, device)   # paper: Adam, lr 1e-4
    workers = cfg.workers if cfg.workers >= 0 else (6 if device.type == "cuda" else 1)
    stream = train.PatchStream([volume], (cfg.patch_vox,) * 3, 0.5, WINDOW_HU, cfg.seed,  # paper: fg:bg 1:1
                               patches_per_case=cfg.patches_per_case)
    batches = train.batches(stream, cfg.batch_size * cfg.patches_per_case, workers, device)
    with sampler.section("train") as mem:   # its own tag: backward at 96^3 dwarfs every other stage
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train.train_steps(model, optimizer, scaler, train.supervised_loss, batches, 1, device, tag="warm-up step")
        res = train.train_steps(model, optimizer, scaler, train.supervised_loss, batches, cfg.steps, device,
                                   tag="train step")
    batches.close()   # stops the loader's worker processes
    res.update(workers=workers, batch_size=cfg.batch_size * cfg.patches_per_case, extra_mb=mem["extra_mb"], peak_mb=mem["peak_mb"],
               amp="off" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16"))
    if device.type == "cuda":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return res, model

# ----------------------------------------------------------------------------- 5. MC scoring


def precision(ctx):
    """'bfloat16', 'float16' or 'float32': the arithmetic an autocast context (or nullcontext) gives."""
    return str(getattr(ctx, "fast_dtype", torch.float32)).replace("torch.", "")


def entropy_map(mean):
    """Entropy in nats of class probabilities (C, *S) -> (*S)."""
    return -(mean * mean.clamp_min(1e-12).log()).sum(0)


def monai_mc(monai, model, image, cfg, device):
    """MONAI's recipe: m calls of sliding_window_inference (sw_batch_size 4, overlap 0.25) with the
    model in MC-dropout mode, softmax volumes stacked, torch.var(unbiased=False) over the passes.

    The predictor returns the softmax, so overlapping windows average probabilities as in proxy_al
    (averaging logits and taking the softmax afterwards would be another score).
    image (X, Y, Z) in [0, 1]. Returns (scores {"variance", "entropy"}, stack (m, C, X, Y, Z) on device).
    """
    enable_mc_dropout(model)
    x = torch.as_tensor(image, device=device)[None, None]                     # (1, 1, X, Y, Z)
    amp = proxy_al.autocast(device) if cfg.monai_autocast else nullcontext()
    probs = []
    with torch.no_grad(), amp:
        for _ in range(cfg.mc_passes):
            out = monai.inferers.sliding_window_inference(x, (cfg.patch_vox,) * 3, MONAI_SW_BATCH,
                                                          lambda crops: model(crops).float().softmax(1),
                                                          overlap=OVERLAP)
            probs.append(torch.as_tensor(out)[0].float())                       # (C, X, Y, Z)
    stack = torch.stack(probs)                                                  # (m, C, X, Y, Z)
    del probs
    scores = {"variance": stack.var(0, unbiased=False).sum(0).mean().item(),
              "entropy": entropy_map(stack.mean(0)).mean().item()}
    return scores, stack


def jackknife_se(stack):
    """MC noise: standard error of the variance and entropy scores, leave-one-pass-out jackknife over
    stack (m, C, *S) of softmax volumes. Returns {"variance": se, "entropy": se}."""
    m = stack.shape[0]
    s1, s2 = stack.sum(0), torch.zeros_like(stack[0])
    for p in stack:
        s2.addcmul_(p, p)
    variance, entropy = [], []
    for p in stack:
        mean = (s1 - p) / (m - 1)
        variance.append(((s2 - p * p) / (m - 1) - mean.square()).clamp_min(0).sum(0).mean().item())
        entropy.append(entropy_map(mean).mean().item())

    def se(values):
        values = np.asarray(values)
        return float(np.sqrt((m - 1) / m * np.sum((values - values.mean()) ** 2)))
    return {"variance": se(variance), "entropy": se(entropy)}


def mc_checks(ours, theirs, se):
    """Both m-pass estimates agree within 3 sigma, sigma = sqrt(2) x the jackknife SE (two independent runs)."""
    out = {}
    for key in ("variance", "entropy"):
        sigma, diff = max(np.sqrt(2.0) * se[key], 1e-12), ours[key] - theirs[key]
        out[key] = {"ours": ours[key], "monai": theirs[key], "diff": diff, "mc_sigma": sigma,
                    "z": diff / sigma, "ok": bool(abs(diff) <= 3 * sigma)}
    return out


def with_cuda_peak(fn, device):
    """(fn(), peak CUDA memory above the start in MB; 0.0 on the CPU)."""
    if device.type != "cuda":
        return fn(), 0.0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20


def window_seconds(model, patch_vox, device):
    """Seconds of one MC-dropout forward of a single patch_vox^3 window (after a warm-up call)."""
    enable_mc_dropout(model)
    x = torch.rand((1, 1) + (patch_vox,) * 3, device=device)
    with torch.inference_mode(), proxy_al.autocast(device):
        model(x)
        sync(device)
        t = time.perf_counter()
        model(x)
        sync(device)
    return time.perf_counter() - t


def same_layout_shape(shape, roi, overlap):
    """Largest crop (per axis <= shape) on which proxy_al's evenly spaced windows and MONAI's fixed-step ones
    (step int(roi x (1 - overlap)), the last moved back to the edge) are the same: roi + k x step voxels."""
    step = int(roi * (1 - overlap))
    return tuple(s if s <= roi else roi + (s - roi) // step * step for s in shape)


def monai_starts(size, roi, overlap):
    """MONAI's window starts along one axis (monai.inferers.utils: dense_patch_slices), for the check."""
    if size <= roi:
        return [0]
    step = int(roi * (1 - overlap))
    return sorted({min(i * step, size - roi) for i in range(math.ceil((size - roi) / step) + 1)})


def stage_mc(cfg, model, image, device, monai, sampler):
    """Stage 5: proxy_al.mc_scores vs the MONAI recipe on the same volume and network, one run each.

    The scores depend on where the windows lie (averaging overlapping windows lowers the per-voxel
    variance): ours are evenly spaced, MONAI's keep a fixed step and move the last one back. So the
    agreement check runs both again on the largest crop of the volume where the two layouts coincide.
    """
    roi = (cfg.patch_vox,) * 3
    windows = proxy_al.n_windows(image.shape, roi, OVERLAP)
    per_window = window_seconds(model, cfg.patch_vox, device)
    log(f"MC scoring on {image.shape}: {windows} windows x {cfg.mc_passes} passes, one window (batch 1) "
        f"{per_window:.2f} s -> about {train.fmt_s(windows * cfg.mc_passes * per_window)} per implementation")

    def runs_on(volume, seed, patch=False):
        def ours():
            torch.manual_seed(seed)
            return with_cuda_peak(lambda: proxy_al.mc_scores(model, volume, cfg.mc_passes, roi, OVERLAP), device)
        runs = {"ours": ours}
        if patch:
            def ours_patch():                 # as queries.Queries.case_scores: the maps, then the box means
                torch.manual_seed(seed)

                def score():
                    maps = proxy_al.mc_scores(model, volume, cfg.mc_passes, roi, OVERLAP, return_maps=True)["maps"]
                    return {m: regions.box_scores(maps[m], cfg.query_vox)[1].size for m in maps}
                return with_cuda_peak(score, device)
            runs["ours_patch"] = ours_patch
        if monai is not None:
            def theirs():
                torch.manual_seed(seed + 1)   # independent dropout masks: the check compares two MC estimates
                return with_cuda_peak(lambda: monai_mc(monai, model, volume, cfg, device), device)
            runs["monai"] = theirs
        return runs

    res = alternate(runs_on(image, cfg.seed, patch=True), 1, sampler, device, log_each=True)
    for record in res.values():
        record["scores"], record["cuda_extra_mb"] = record.pop("result")
    res.update(windows=windows, passes=cfg.mc_passes, window_s=per_window, shape_vox=list(image.shape),
               batch=proxy_al.default_batch(device), precision_ours=precision(proxy_al.autocast(device)),
               precision_monai=precision(proxy_al.autocast(device) if cfg.monai_autocast else nullcontext()))
    if monai is None:
        return res
    res["monai"]["scores"], stack = res["monai"]["scores"]
    res["full_case_diff"] = mc_checks(res["ours"]["scores"], res["monai"]["scores"], jackknife_se(stack))
    del stack
    crop = same_layout_shape(image.shape, cfg.patch_vox, OVERLAP)
    for s in crop:
        assert proxy_al.window_starts(max(s, cfg.patch_vox), cfg.patch_vox, OVERLAP) == \
            monai_starts(s, cfg.patch_vox, OVERLAP), crop
    log(f"    agreement check: both again on a {crop} crop, where both place the same windows")
    same = alternate(runs_on(np.ascontiguousarray(image[:crop[0], :crop[1], :crop[2]]), cfg.seed + 2), 1, sampler,
                     device, log_each=True)
    (theirs, stack), _ = same["monai"]["result"]
    res["checks"] = mc_checks(same["ours"]["result"][0], theirs, jackknife_se(stack))
    res["check_crop_vox"] = list(crop)
    return res

# ----------------------------------------------------------------------------- running the stages


def run_data_stages(cfg, case, work, monai, sampler):
    """Stages 1-3. Returns (report part, image_hu memmap, label memmap, foreground index)."""
    log(f"1/5 preprocess: ours, nibabel read{', MONAI chain' if monai else ''}; {cfg.repeats} repeats")
    pre, pre_checks, theirs = stage_preprocess(cfg, case, monai, sampler)
    log(f"    ours {pre['ours']['median_s']:.2f} s, read {pre['floor']['median_s']:.2f} s"
        + (f", MONAI {pre['monai']['median_s']:.2f} s" if monai else ""))
    log("2/5 cached load: build once, then open + read")
    cache, image_hu, label = stage_cache(cfg, case, work, sampler)
    log(f"    build {cache['build_s']:.2f} s, open + read {cache['ours']['median_s']:.3f} s")
    log(f"3/5 patch sampling {cfg.patch_vox}^3")
    patches = stage_patches(cfg, image_hu, label, monai, theirs, sampler)
    log(f"    ours {patches['ours']['per_s']:.1f} /s" + (f", MONAI {patches['monai']['per_s']:.2f} /s" if monai else ""))
    fg_index = train.foreground_index(label)
    part = {"preprocess": pre, "preprocess_checks": pre_checks, "cache": cache, "patches": patches}
    return part, image_hu, label, fg_index


def run_model_stages(cfg, device, volume, num_classes, monai, sampler):
    """Stages 4-5 on `device`; the network trained in stage 4 is the one scored in stage 5."""
    log(f"4/5 training: 1 warm-up + {cfg.steps} steps of {cfg.batch_size} x {cfg.patches_per_case} x "
        f"{cfg.patch_vox}^3 on {device}")
    train, model = stage_train(cfg, device, volume, num_classes, sampler)
    log(f"    {train['step_s']:.2f} s/step, data wait {100 * train['data_wait']:.1f} %")
    image = data.window(np.asarray(volume[0]), *WINDOW_HU)   # the resampled case, as the model sees it
    log(f"5/5 MC scoring, m = {cfg.mc_passes}" + (" (ours, then MONAI)" if monai else ""))
    mc = stage_mc(cfg, model, image, device, monai, sampler)
    log(f"    ours {mc['ours']['median_s']:.1f} s" + (f", MONAI {mc['monai']['median_s']:.1f} s" if monai else ""))
    return {"train": train, "mc": mc}


def load_average():
    """1, 5 and 15 minute load averages (other processes compete for the cores and slow every timing)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment(cfg, device, monai):
    """What the numbers were measured on."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "nibabel": nib.__version__, "monai": monai.__version__ if monai else None, "device": str(device),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
           "load_avg_start": load_average()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run_all(cfg, device, work, monai):
    """Every stage; returns the report dict (without the table)."""
    sampler = RssSampler()
    report = {"config": dataclasses.asdict(cfg), "environment": environment(cfg, device, monai)}
    log(f"phantom {'x'.join(map(str, cfg.shape_vox))} at {cfg.spacing_mm} mm (child process) under {work}")
    case, report["case"] = make_case(cfg, work)
    log(f"    {report['case']['seconds']:.1f} s, {report['case']['file_mb']:.0f} MB, axes {report['case']['axcodes']}")
    part, image_hu, label, fg_index = run_data_stages(cfg, case, work, monai, sampler)
    report.update(part)
    num_classes = folders.read_task_info(Path(work) / "phantom")["num_classes"]
    report.update(run_model_stages(cfg, device, (image_hu, label, fg_index), num_classes, monai, sampler))
    report["memory"] = {"peak_rss_ours_mb": sampler.peaks.get("ours"), "peak_rss_train_mb": sampler.peaks.get("train"),
                        "peak_rss_monai_mb": sampler.peaks.get("monai"),
                        "process_high_water_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    report["environment"]["load_avg_end"] = load_average()
    return report


def unit_work(pool=105, val=26, cfg=None):
    """Work of each unit of study.plan for one seed of the paper preset (default: MSD Task03, 105-case pool,
    26 validation cases), counted the way al_loop does it: {"proxy": n, "score": n, strategy: n, ...} with
    n = {"proxy_steps", "train_steps", "semi_steps", "mc_volumes", "predictions"}: proxy steps (batch_size
    patches), supervised and semi-supervised steps (batch_size x patches_per_case patches per batch), m-pass MC
    scorings of one volume, single-pass sliding-window predictions (validation, with --keep best every
    val_every steps of a stage too, and noisy labels)."""
    cfg = cfg or al_loop.PAPER
    zero = lambda: {"proxy_steps": 0, "train_steps": 0, "semi_steps": 0, "mc_volumes": 0, "predictions": 0}
    checks = lambda steps: -(-steps // cfg.val_every) * val if cfg.keep == "best" else 0   # ceil: and the last
    units = {"proxy": {**zero(), "proxy_steps": max(1, pool * cfg.proxy_patches_per_case // cfg.batch_size)
                       * cfg.proxy_epochs, "predictions": cfg.proxy_epochs // cfg.proxy_val_every * val},
             "score": {**zero(), "mc_volumes": 1}}                                # lines 1-3
    for strategy in map(strategies.parse, strategies.PAPER):
        n, labeled = units.setdefault(strategy.name, zero()), cfg.k                  # line 4: no scoring
        for j in range(cfg.iterations):
            n["train_steps"] += cfg.steps                                         # line 6
            n["predictions"] += val + checks(cfg.steps)                           # validation
            if strategy.semi:                                                            # lines 8-10
                n["mc_volumes"] += pool - labeled
                n["predictions"] += labeled
                n["semi_steps"] += cfg.semi_steps
                n["predictions"] += checks(cfg.semi_steps)
            if j < cfg.iterations - 1:                                            # lines 11-13
                n["mc_volumes"] += pool - labeled if strategy.uses_mc else 0
                labeled += cfg.k
    return units


def paper_workload(pool=105, val=26, seeds=3, cfg=None):
    """The whole study's work: unit_work summed over the units (the pool's scoring is one unit per case)."""
    units = unit_work(pool, val, cfg)
    return {key: seeds * sum(n[key] * (pool if name == "score" else 1) for name, n in units.items())
            for key in units["proxy"]}


def schedule_s(unit_s, pool=105, seeds=3, gpus=1):
    """Wall time of the study on `gpus` ranks (one per GPU): al_loop's queue simulated, units handed out in
    study.plan's order to the first free rank; a case's scoring waits for its seed's proxy, a proxyrank run
    for its seed's scored pool. unit_s: {"proxy", "score", strategy: seconds} from unit_work and unit costs."""
    runs = sorted(((s, seed) for seed in range(seeds) for s in strategies.PAPER), key=lambda u: -strategies.parse(u[0]).cost)
    units = ([("proxy", seed) for seed in range(seeds)] + [("score", seed) for seed in range(seeds)
                                                            for _ in range(pool)] + runs)
    free, proxy_end, scored_end = [0.0] * gpus, {}, {}
    for kind, seed in units:
        rank = min(range(gpus), key=free.__getitem__)
        start = free[rank]
        if kind == "score":
            start = max(start, proxy_end[seed])
        elif kind != "proxy" and strategies.parse(kind).proxy:
            start = max(start, scored_end[seed])
        free[rank] = start + unit_s[kind]
        if kind == "proxy":
            proxy_end[seed] = free[rank]
        elif kind == "score":
            scored_end[seed] = max(scored_end.get(seed, 0.0), free[rank])
    return max(free)


SEMI_STEP_COST = 7 / 3   # a semi-supervised step: two forward-backward passes and one forward (~1/3 of one)


def paper_estimate(r, cfg):
    """Estimated wall time (s) of the paper preset on Task03 from this run's unit costs: a training step, an
    m-pass MC scoring of this case, and one pass of it. Volumes are taken to be the size of this case; a proxy
    step (batch_size patches) costs the measured step scaled by its share of patches (not measured)."""
    n = paper_workload()
    step_s, mc_s = r["train"]["step_s"], r["mc"]["ours"]["median_s"]
    proxy_step_s = step_s / cfg.patches_per_case
    unit_seconds = lambda w: (w["proxy_steps"] * proxy_step_s + w["train_steps"] * step_s
                              + w["semi_steps"] * SEMI_STEP_COST * step_s
                              + w["mc_volumes"] * mc_s + w["predictions"] * mc_s / cfg.mc_passes)
    seconds = {"proxy": n["proxy_steps"] * proxy_step_s, "train": n["train_steps"] * step_s,
               "semi": n["semi_steps"] * SEMI_STEP_COST * step_s,
               "mc": n["mc_volumes"] * mc_s, "predict": n["predictions"] * mc_s / cfg.mc_passes}
    unit_s = {name: unit_seconds(w) for name, w in unit_work().items()}
    return {"workload": n, "seconds": seconds, "total_s": sum(seconds.values()),
            "wall_s": {gpus: schedule_s(unit_s, gpus=gpus) for gpus in (1, 8, 32)}}


# ----------------------------------------------------------------------------- the table


def verdict(ok):
    return "-" if ok is None else ("yes" if ok else "NO")


def speed_rows(r, cfg, device, monai):
    """Table rows of the timed stages: (stage, ours, monai, ratio, target, ok)."""
    pre, patches, train, mc = r["preprocess"], r["patches"], r["train"], r["mc"]
    ours_pre, floor = pre["ours"]["median_s"], pre["floor"]["median_s"]
    rows = []
    if monai:
        ratio = pre["monai"]["median_s"] / ours_pre
        rows.append(("preprocess img+label (s/case)", f"{ours_pre:.2f}", f"{pre['monai']['median_s']:.2f}",
                     f"{ratio:.1f}x faster", ">= 3x faster", verdict(ratio >= 3)))
    else:
        rows.append(("preprocess img+label (s/case)", f"{ours_pre:.2f}", "-", "-", ">= 3x faster", "-"))
    rows.append(("  vs nibabel read of the files", f"{ours_pre:.2f}", f"read {floor:.2f}",
                 f"{ours_pre / floor:.2f}x read", "<= 2x read", verdict(ours_pre <= 2 * floor)))
    rows.append(("cached load, open+read (s/case)", f"{r['cache']['ours']['median_s']:.3f}", "-", "-", "-", "-"))
    p = f"{cfg.patch_vox}^3"
    if monai:
        ratio = patches["ours"]["per_s"] / patches["monai"]["per_s"]
        rows.append((f"patches {p} (per s)", f"{patches['ours']['per_s']:.1f}", f"{patches['monai']['per_s']:.2f}",
                     f"{ratio:.0f}x faster", ">= 5x faster", verdict(ratio >= 5)))
    else:
        rows.append((f"patches {p} (per s)", f"{patches['ours']['per_s']:.1f}", "-", "-", ">= 5x faster", "-"))
    rows.append((f"train step {cfg.batch_size}x{cfg.patches_per_case}x{p} (s/step)", f"{train['step_s']:.2f}",
                 "-", "-", "-", "-"))
    cuda = device.type == "cuda"
    rows.append(("  data wait (share of step)", f"{100 * train['data_wait']:.1f} %", "-", "-", "< 10 % on CUDA",
                 verdict(train["data_wait"] < 0.10) if cuda else "n/a cpu"))
    return rows + mc_rows(mc, cfg, device, monai)


def mc_rows(mc, cfg, device, monai):
    """MC scoring rows: time and peak extra memory (RSS on the CPU, device memory on CUDA)."""
    ours_s = mc["ours"]["median_s"]
    key = "cuda_extra_mb" if device.type == "cuda" else "extra_mb"
    what = "CUDA" if device.type == "cuda" else "RSS"
    ours_mb = mc["ours"][key]
    rows = []
    if monai:
        ratio = mc["monai"]["median_s"] / ours_s
        rows.append((f"MC scoring m={cfg.mc_passes} (s/volume)", f"{ours_s:.1f}", f"{mc['monai']['median_s']:.1f}",
                     f"{ratio:.2f}x faster", ">= 2x faster", verdict(ratio >= 2)))
    else:
        rows.append((f"MC scoring m={cfg.mc_passes} (s/volume)", f"{ours_s:.1f}", "-", "-", ">= 2x faster", "-"))
    rows.append((f"  MC peak extra {what} (MB)", f"{ours_mb:.0f}", f"{mc['monai'][key]:.0f}" if monai else "-", "-",
                 "< 1024 MB", verdict(ours_mb < 1024)))
    if "ours_patch" in mc:
        ratio = mc["ours_patch"]["median_s"] / ours_s
        rows.append((f"MC scoring for region queries ({cfg.query_vox}^3 boxes, s/volume)",
                     f"{mc['ours_patch']['median_s']:.1f}", "-", f"{ratio:.2f}x volume mode", "<= 1.2x",
                     verdict(ratio <= 1.2)))
        rows.append((f"  its peak extra {what} (MB)", f"{mc['ours_patch'][key]:.0f}", "-", "-", "-", "-"))
    return rows


def check_rows(r, monai):
    """Memory and agreement rows."""
    mem = r["memory"]
    # No target: the < 2 GB memory target is for the demo run (python al_loop.py, 32^3 patches), not this case.
    rows = [("peak RSS, all but training (MB)", f"{mem['peak_rss_ours_mb']:.0f}",
             f"{mem['peak_rss_monai_mb']:.0f}" if monai else "-", "-", "-", "-"),
            ("peak RSS, training stage (MB)", f"{mem['peak_rss_train_mb']:.0f}", "-", "-", "-", "-"),
            ("cache memory-mapped", str(r["cache"]["memory_mapped"]), "-", "-", "True",
             verdict(r["cache"]["memory_mapped"]))]
    if not monai:
        return rows
    c = r["preprocess_checks"]
    rows += [("check: shape gap (voxels)", str(c["max_shape_gap_vox"]), "-", "-", "<= 1", verdict(c["ok_shape"])),
             ("check: label agreement", f"{c['label_agreement']:.4f}", "-", "-", ">= 0.99", verdict(c["ok_label"])),
             ("check: window MAD", f"{c['window_mad']:.4f}", "-", "-", "<= 0.01", verdict(c["ok_window"]))]
    crop = "x".join(map(str, r["mc"]["check_crop_vox"]))
    for key, v in r["mc"]["checks"].items():
        rows.append((f"check: MC {key}, {crop} crop", f"{v['ours']:.5f}", f"{v['monai']:.5f}", f"z = {v['z']:+.1f}",
                     "|diff| <= 3 sigma MC", verdict(v["ok"])))
    for key, v in r["mc"]["full_case_diff"].items():
        rows.append((f"  full case MC {key} (layouts differ)", f"{v['ours']:.5f}", f"{v['monai']:.5f}",
                     f"z = {v['z']:+.1f}", "-", "-"))
    return rows


def format_table(rows):
    """Plain-text table with the columns stage | ours | monai | ratio | target | ok."""
    header = ("stage", "ours", "monai", "ratio", "target", "ok")
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = [" | ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def notes(r, device):
    """Lines under the table: the numbers that have no column."""
    pre, env = r["preprocess"], r["environment"]
    return [f"device {device}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, torch {env['torch']}, "
            f"{env['torch_threads']} threads, {env['cpu_count']} CPUs, load average {env['load_avg_start']} -> "
            f"{env['load_avg_end']}",
            f"case: {'x'.join(map(str, r['case']['shape_vox']))} at {r['case']['spacing_mm']} mm, "
            f"{r['case']['file_mb']:.0f} MB gzip, axes {r['case']['axcodes']}, {'checked' if r['case']['existed_before'] else 'generated'} in {r['case']['seconds']:.1f} s "
            f"(child peak RSS {r['case']['child_peak_rss_mb']:.0f} MB)",
            f"image only: preprocess {pre['ours_image']['median_s']:.2f} s vs read {pre['floor_image']['median_s']:.2f} s "
            f"({pre['ours_image']['median_s'] / pre['floor_image']['median_s']:.2f}x)",
            f"cache build {r['cache']['build_s']:.2f} s, open only {r['cache']['open']['median_s'] * 1000:.1f} ms; "
            f"foreground index {r['patches']['foreground_index_s'] * 1000:.0f} ms once per case",
            f"MC: {r['mc']['windows']} windows of {r['mc']['shape_vox']} x {r['mc']['passes']} passes, "
            f"batch {r['mc']['batch']}; "
            f"one window {r['mc']['window_s']:.2f} s; arithmetic ours {r['mc']['precision_ours']}"
            + (f", MONAI {r['mc']['precision_monai']}" if "monai" in r["mc"] else "")
            + f"; process high-water RSS {r['memory']['process_high_water_mb']:.0f} MB"
            + ("" if device.type == "cuda" else "\n  (MC extra RSS is growth above the RSS after training: memory "
                                                 "the allocator kept from training is reused without showing)"),
            paper_line(r["paper_estimate"])]


def paper_line(est):
    n, s = est["workload"], est["seconds"]
    return (f"paper preset on Task03 (105-case pool, 26 validation, 4 iterations, 3 seeds, 12 strategies): "
            f"{n['proxy_steps']:,} proxy, {n['train_steps']:,} training + {n['semi_steps']:,} semi-supervised steps, "
            f"{n['mc_volumes']:,} MC scorings, {n['predictions']:,} predictions -> about {est['total_s'] / 3600:,.0f} h "
            f"here (training {(s['proxy'] + s['train'] + s['semi']) / 3600:,.0f} h, MC {s['mc'] / 3600:,.0f} h; volumes the size of this case)"
            "\n  wall time with torchrun, one rank per device (al_loop's queue simulated): "
            + ", ".join(f"{g} x {fmt_h(w)}" for g, w in est["wall_s"].items()))


def fmt_h(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"

# ----------------------------------------------------------------------------- entry point


def json_default(value):
    """JSON for numpy scalars and tuples of the report."""
    if isinstance(value, (np.generic,)):
        return value.item()
    return str(value)


def main(argv=None):
    cfg = parse_args(argv)
    monai = import_monai() if cfg.compare_monai else None
    device = train.pick_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {cfg.device}: torch sees no CUDA device; use --device cpu or auto")
    work = Path(cfg.work) if cfg.work else Path(tempfile.mkdtemp(prefix="proxy-al-bench-"))
    try:
        report = run_all(cfg, device, work, monai)
    finally:
        if not cfg.work:
            shutil.rmtree(work, ignore_errors=True)
    report["paper_estimate"] = paper_estimate(report, cfg)
    rows = speed_rows(report, cfg, device, monai) + check_rows(report, monai)
    report["table"] = [dict(zip(("stage", "ours", "monai", "ratio", "target", "ok"), row)) for row in rows]
    print("\n" + format_table(rows) + "\n" + "\n".join(notes(report, device)), flush=True)
    if cfg.json:
        import json
        files.atomic_write_bytes(cfg.json, (json.dumps(report, indent=2, default=json_default) + "\n").encode())
        log(f"wrote {cfg.json}")


if __name__ == "__main__":
    main()
