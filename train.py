"""Training, around the method: progress lines, the device, patches (the 1:1 draw, intensity augmentation)
and their endless streams, and one training stage
(Adam, its grad scaler, an lr schedule, `steps` optimiser steps under autocast on CUDA) that serves the
proxy (Algorithm 1 line 3), Ms (line 7) and Msemi (line 11).
"""
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from data import foreground_index, window
from losses import dice_ce_loss
from proxy_al import autocast, evaluate

# ----------------------------------------------------------------------------- progress


def fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Prints `prefix  tag i/n  extra  elapsed  ETA` at most every `every_s` seconds (and at the end).
    poll: called at every update (on many ranks: stops this one when another has failed)."""

    def __init__(self, tag, total, every_s=10.0, prefix="", poll=None):
        self.tag, self.total, self.every_s, self.prefix, self.poll = tag, total, every_s, prefix, poll
        self.t0 = self.last = time.time()

    def update(self, done, extra=""):
        if self.poll:
            self.poll()
        now = time.time()
        if (now - self.last < self.every_s and done < self.total) or self.total == 1:
            return
        self.last = now
        elapsed = now - self.t0
        eta = elapsed / max(done, 1) * (self.total - done)
        print(f"{self.prefix}  {self.tag} {done}/{self.total}  {extra}  elapsed {fmt_s(elapsed)}  ETA {fmt_s(eta)}",
              flush=True)


class StageClock:
    """Wall seconds per stage of this process, each second counted once: a stage entered inside another pauses
    it (`with clock("validation"):` inside "training (Ms)" counts to validation only). totals() adds "other":
    the seconds in no stage, so the stages sum to the wall time."""

    def __init__(self):
        self.start, self.seconds, self._open = time.perf_counter(), {}, []
        self._since = self.start

    @contextmanager
    def __call__(self, stage):
        self._charge()
        self._open.append(stage)
        try:
            yield
        finally:
            self._charge()
            self._open.pop()

    def _charge(self):
        now = time.perf_counter()
        if self._open:
            self.seconds[self._open[-1]] = self.seconds.get(self._open[-1], 0.0) + now - self._since
        self._since = now

    def totals(self) -> dict:
        """{"wall": seconds since the start, "stages": {stage: seconds, ..., "other": the rest}}."""
        self._charge()
        wall = time.perf_counter() - self.start
        return {"wall": wall, "stages": {**self.seconds, "other": max(wall - sum(self.seconds.values()), 0.0)}}

# ----------------------------------------------------------------------------- devices


def pick_device(name="auto"):
    """'auto' -> cuda when available, else cpu. Turns on cudnn.benchmark on CUDA (fixed patch sizes)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def needs_scaler(device):
    """fp16 autocast (CUDA without bf16) needs a grad scaler; bf16 and float32 do not."""
    return device.type == "cuda" and not torch.cuda.is_bf16_supported()

# ----------------------------------------------------------------------------- patches
# The centre's draw, the one place it is described. The paper's 1:1: a patch is centred on foreground with
# probability fg_fraction, on a uniform voxel of any foreground class (tumour centres in proportion to tumour
# voxels, as MONAI's RandCropByPosNegLabeld), else on a background voxel. Beyond the paper, by_class: a present
# foreground class first, uniformly, then a voxel of it (nnU-Net's oversampling; helps small classes such as
# tumours and vessels).
# fg_fraction None: the proxy's "random selection of patches", a centre anywhere. Then the paper's augmentation.


BACKGROUND_TRIES = 100  # a background centre by rejection: fails only where background is a tiny share of the volume


def _foreground_voxel(fg_index, rng, by_class):
    """A flat index: uniform over all foreground voxels, or (by_class) a uniform present class, then a voxel."""
    classes = [c for c in sorted(fg_index) if c != 0 and len(fg_index[c])]
    if by_class:
        voxels = fg_index[classes[rng.integers(len(classes))]]
        return int(voxels[rng.integers(len(voxels))])
    counts = np.cumsum([len(fg_index[c]) for c in classes])     # the classes' voxels, end to end, never built
    i = int(rng.integers(counts[-1]))
    k = int(np.searchsorted(counts, i, side="right"))           # class c with probability n_c / N
    return int(fg_index[classes[k]][i - (counts[k - 1] if k else 0)])


def _background_voxel(shape, label, rng, fg_index=None):
    """A flat index of a voxel with label 0: from fg_index[0] where a partial label has it (its annotated
    background; its annotated foreground when its boxes hold no background), else by rejection; any voxel if
    BACKGROUND_TRIES draws found none."""
    size = int(np.prod(shape))
    if fg_index is not None and 0 in fg_index:          # a partial label: an annotated voxel, whatever happens
        voxels = fg_index[0] if len(fg_index[0]) else np.concatenate([v for v in fg_index.values()])
        return int(voxels[rng.integers(len(voxels))]) if len(voxels) else int(rng.integers(size))
    for _ in range(BACKGROUND_TRIES):
        i = int(rng.integers(size))
        if label[np.unravel_index(i, shape)] == 0:
            return i
    return int(rng.integers(size))


def _pick_centre(shape, label, fg_fraction, rng, fg_index, by_class=False):
    """Patch centre (3,) int: with prob fg_fraction a foreground voxel, else a background one; any voxel
    where fg_fraction is None, the label is None, or (for a foreground draw) the label has no foreground (a
    partial label's annotated background then)."""
    size = int(np.prod(shape))
    if fg_fraction is None or label is None:
        flat = rng.integers(size)
    elif rng.random() < fg_fraction:
        fg_index = foreground_index(label) if fg_index is None else fg_index
        has_fg = any(c != 0 and len(v) for c, v in fg_index.items())
        flat = (_foreground_voxel(fg_index, rng, by_class) if has_fg else
                _background_voxel(shape, label, rng, fg_index) if 0 in fg_index else rng.integers(size))
    else:
        flat = _background_voxel(shape, label, rng, fg_index)
    return np.array(np.unravel_index(int(flat), shape))


def _crop_slices(shape, centre, patch_vox):
    """Source and destination slices of a patch centred at `centre` (the part that lies inside the volume)."""
    start = np.asarray(centre) - np.asarray(patch_vox) // 2
    src, dst = [], []
    for n, s, p in zip(shape, start, patch_vox):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    return tuple(src), tuple(dst)


def sample_patch(image_hu: np.ndarray, label: np.ndarray | None, patch_vox: tuple[int, int, int],
                 fg_fraction: float | None, rng: np.random.Generator, window_hu: tuple[float, float],
                 fg_index: dict[int, np.ndarray] | None = None, by_class: bool = False
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """One training patch.

    image_hu (X, Y, Z) HU, float or an int16 memmap (only the crop is read); label uint8 (X, Y, Z) or None;
    patch_vox (px, py, pz); rng np.random.Generator; window_hu (lo_hu, hi_hu); fg_index from
    foreground_index (computed if None).
    fg_fraction (paper: 1:1 -> 0.5; 9:1 -> 0.9 with noisy labels), by_class: the centre's draw, as the
      section's comment says. A label without foreground, or label None: any voxel.
    Returns patch float32 (px, py, pz) windowed to [0, 1] and label_patch uint8 (px, py, pz) or None.
    Parts outside the volume are padded with 0 after windowing (image) and 0 = background (label).
    """
    patch_vox = tuple(int(p) for p in patch_vox)
    if len(patch_vox) != 3 or min(patch_vox) < 1 or np.ndim(image_hu) != 3:
        raise ValueError(f"sample_patch: need a 3-D image and 3 positive patch sizes; got image shape "
                         f"{np.shape(image_hu)}, patch_vox {patch_vox}")
    if fg_fraction is not None and not 0 <= fg_fraction <= 1:
        raise ValueError(f"sample_patch: fg_fraction {fg_fraction} must lie in [0, 1], or be None for any voxel")
    if label is not None and label.shape != image_hu.shape:
        raise ValueError(f"sample_patch: label shape {label.shape} differs from image shape {image_hu.shape}")
    centre = _pick_centre(image_hu.shape, label, fg_fraction, rng, fg_index, by_class)
    src, dst = _crop_slices(image_hu.shape, centre, patch_vox)
    patch = np.zeros(patch_vox, dtype=np.float32)
    patch[dst] = window(image_hu[src], *window_hu)
    if label is None:
        return patch, None
    label_patch = np.zeros(patch_vox, dtype=np.uint8)
    label_patch[dst] = label[src]
    return patch, label_patch


def augment_intensity(patch: np.ndarray, rng: np.random.Generator, shift: float = 0.1, scale: float = 0.1,
                      noise_std: float = 0.1) -> np.ndarray:
    """The paper's augmentation (intensity shift, intensity scale, gaussian noise), each with probability 0.5.

    patch float32 (any shape) in window units [0, 1]; returns a new float32 array of the same shape.
    scale: multiply by 1 + U(-scale, scale); shift: add U(-shift, shift); noise: add N(0, s^2) per voxel with
    s ~ U(0, noise_std) per patch. The paper names the three transforms but no values; these follow MONAI:
    RandShiftIntensityd(offsets=0.10, prob=0.50) in its BTCV Swin UNETR tutorial, RandScaleIntensityd
    factors=0.1 in its BraTS tutorial, RandGaussianNoise's default std=0.1. Voxels never move.
    """
    out = np.array(patch, dtype=np.float32, copy=True)
    if rng.random() < 0.5:
        out *= np.float32(1.0 + rng.uniform(-scale, scale))
    if rng.random() < 0.5:
        out += np.float32(rng.uniform(-shift, shift))
    if rng.random() < 0.5:
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(rng.uniform(0, noise_std))
    return out


class PatchStream(torch.utils.data.IterableDataset):
    """Endless training patches, made in DataLoader workers off the training thread.
    volumes: list of (image_hu (X, Y, Z), label (X, Y, Z) uint8, foreground_index of the label).
    fg_fraction, by_class: the centre's draw, as sample_patch (fg_fraction None: anywhere).
    patches_per_case: patches in a row from each drawn case (the first author's tutorial: 4, as MONAI's
    RandCropByPosNegLabeld num_samples=4); a batch of batch_size x patches_per_case holds batch_size cases.
    1: a case is drawn for every patch.
    Yields (image (1, *P) float32 intensity-augmented, label (1, *P) int64), or with two_views (view 1 clean,
    view 2 intensity-augmented) of one patch: the semi-supervised pair (the label only steers the centre).
    """

    def __init__(self, volumes, patch_vox, fg_fraction, window_hu, seed, two_views=False, by_class=False,
                 patches_per_case=1):
        self.volumes, self.patch_vox, self.fg_fraction, self.by_class = volumes, tuple(patch_vox), fg_fraction, by_class
        self.window_hu, self.seed, self.two_views, self.patches_per_case = window_hu, seed, two_views, patches_per_case

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            image_hu, label, fg_index = self.volumes[rng.integers(len(self.volumes))]
            for _ in range(self.patches_per_case):
                patch, lab = sample_patch(image_hu, label, self.patch_vox, self.fg_fraction, rng,
                                          self.window_hu, fg_index=fg_index, by_class=self.by_class)
                if self.two_views:
                    yield torch.from_numpy(patch[None]), torch.from_numpy(augment_intensity(patch, rng)[None])
                else:
                    yield (torch.from_numpy(augment_intensity(patch, rng)[None]),
                           torch.from_numpy(lab[None].astype(np.int64)))


@dataclass(frozen=True)
class Patches:
    """How a run draws its training patches (PatchStream's settings but the volumes and the seed): one value from
    the config, so that Ms, Msemi and the proxy draw alike where they should."""
    patch_vox: tuple                 # the patch (paper: 96^3)
    window_hu: tuple                 # the HU window to [0, 1]
    fg_fraction: float               # share of centres on foreground (paper: 1:1; None: anywhere)
    by_class: bool = False           # a present class first, then a voxel of it (--fg-draw classes)
    patches_per_case: int = 1        # patches in a row from each drawn case (the first author's tutorial: 4)

    def stream(self, volumes, seed, fg_fraction=..., two_views=False) -> PatchStream:
        """A PatchStream of `volumes` seeded by `seed`; fg_fraction: another share (Msemi's 9:1, the proxy's)."""
        return PatchStream(volumes, self.patch_vox, self.fg_fraction if fg_fraction is ... else fg_fraction,
                           self.window_hu, seed, two_views, self.by_class, self.patches_per_case)


def batches(stream, batch_size, workers, device):
    """An endless iterator of batches on `device` from a PatchStream."""
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    for batch in loader:
        yield [t.to(device, non_blocking=True) for t in batch]

# ----------------------------------------------------------------------------- one training stage


def make_optimizer(model, lr, device):
    """Adam (paper: lr 1e-4) and a grad scaler that is active only for fp16 autocast."""
    return torch.optim.Adam(model.parameters(), lr=lr), torch.amp.GradScaler(device.type, enabled=needs_scaler(device))


def lr_schedule(optimizer, steps, warmup_steps=0, decay="constant"):
    """Learning-rate factor per step: a linear warm-up over warmup_steps, then constant (the paper) or, with
    decay "cosine", a cosine decay that reaches 0 after `steps` (a short run then ends converged)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = min(1.0, (step - warmup_steps + 1) / max(1, steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * done)) if decay == "cosine" else 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def supervised_loss(model, batch):
    """DiceCE of a labeled batch (image (B, 1, *P), label (B, 1, *P) int64)."""
    image, label = batch
    return dice_ce_loss(model(image), label)


def train_steps(model, optimizer, scaler, step_loss, data, steps, device, tag="train", log_every_s=10.0,
                schedule=None, progress=Progress):
    """Run `steps` optimiser steps of `step_loss(model, next(data))`, stepping the lr `schedule` if given.

    Returns {"loss": mean loss, "step_s": seconds per step, "data_wait": share of time spent waiting for data}.
    """
    model.train()
    bar = progress(tag, steps, log_every_s)
    total, wait, t0 = 0.0, 0.0, time.time()
    for step in range(1, steps + 1):
        t = time.time()
        batch = next(data)
        wait += time.time() - t
        with autocast(device):
            loss = step_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if schedule is not None:
            schedule.step()
        total += loss.item()
        bar.update(step, f"loss {total / step:.4f}")
    elapsed = max(time.time() - t0, 1e-9)
    return {"loss": total / max(steps, 1), "step_s": elapsed / max(steps, 1), "data_wait": wait / elapsed}


class Stage:
    """One training stage of `steps` optimiser steps, run in one go or in parts: Adam (paper: lr 1e-4), a grad
    scaler active only for fp16 autocast, and the lr schedule (warm-up, then constant or cosine) over all steps.
    dropout_seed: seeds torch's generator for the stage's dropout masks (None: leave it as it is)."""

    def __init__(self, model, step_loss, data, steps, device, lr, warmup_steps=0, decay="constant",
                 dropout_seed=None, progress=Progress):
        self.model, self.step_loss, self.data, self.device, self.progress = model, step_loss, data, device, progress
        self.optimizer, self.scaler = make_optimizer(model, lr, device)
        self.schedule = lr_schedule(self.optimizer, steps, warmup_steps, decay)
        self.steps = steps
        if dropout_seed is not None:
            torch.manual_seed(dropout_seed)

    def run(self, tag, steps=None):
        """The next `steps` steps (default: all); returns train_steps' stats."""
        return train_steps(self.model, self.optimizer, self.scaler, self.step_loss, self.data, steps or self.steps,
                           self.device, tag=tag, schedule=self.schedule, progress=self.progress)


@dataclass(frozen=True)
class ProxyTraining:
    """What training the proxy (Algorithm 1 line 3) takes of the config."""
    epochs: int                      # paper: 100
    val_every: int                   # validate every N epochs and keep the best (paper: 5)
    steps_per_epoch: int
    batch_size: int                  # patches a step
    lr: float
    patches: Patches                 # its draw: patches_per_case 1; fg_fraction None for the paper's random patches
    roi: tuple = (96, 96, 96)        # the sliding window of its validation
    overlap: float = 0.25
    warmup_steps: int = 0            # the lr schedule over all epochs
    decay: str = "constant"


def train_proxy(model, volumes, val_cases, settings, device, seed, workers=0, progress=Progress):
    """Proxy model on pseudo labels (Algorithm 1 line 3): settings.epochs epochs, validation Dice on the validation
    cases' pseudo labels every settings.val_every epochs, the best weights kept (paper: 100 epochs, every 5).
    val_cases: a function returning an iterable of (image, pseudo label) pairs, or None. Returns [(epoch, dice)];
    the model ends with its best weights (the last ones when no validation case has a pseudo label to score).
    """
    s = settings
    data = batches(replace(s.patches, patches_per_case=1).stream(volumes, seed), s.batch_size, workers, device)
    stage = Stage(model, supervised_loss, data, s.epochs * s.steps_per_epoch, device, s.lr, s.warmup_steps, s.decay,
                  progress=progress)
    best, best_state, history = -1.0, None, []
    for epoch in range(0, s.epochs, s.val_every):
        chunk = min(s.val_every, s.epochs - epoch)
        stage.run(f"proxy epochs {epoch + 1}-{epoch + chunk}/{s.epochs}", chunk * s.steps_per_epoch)
        if val_cases is None:  # nothing to validate on: keep the last weights
            best_state = model.state_dict()
            continue
        scores = evaluate(model, val_cases(), 2, s.roi, s.overlap)
        if len(scores) == 0:
            raise ValueError("train_proxy: val_cases() gave no validation case; pass val_cases=None "
                             "to train the proxy without validation")
        scored = np.isfinite(scores).any()          # NaN: a case whose pseudo label is empty
        dice = float(np.nanmean(scores)) if scored else -1.0
        history.append((epoch + chunk, dice))
        print(f"  proxy epoch {epoch + chunk}/{s.epochs}: validation Dice on pseudo labels "
              + (f"{dice:.4f}" if scored else "none (every validation pseudo label is empty)"), flush=True)
        if dice > best or best_state is None:
            best, best_state = dice, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return history
