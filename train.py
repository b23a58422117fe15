"""Training, around the method: progress lines, the device, endless patch streams, and one training stage
(Adam, its grad scaler, an lr schedule, `steps` optimiser steps under autocast on CUDA) that serves the
proxy (Algorithm 1 line 3), Ms (line 7) and Msemi (line 11).
"""
import math
import time

import numpy as np
import torch

from data import augment_intensity, sample_patch
from losses import dice_ce_loss
from proxy_al import autocast, evaluate

# ----------------------------------------------------------------------------- progress


def fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


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
        print(f"{self.prefix}  {self.tag} {done}/{self.total}  {extra}  elapsed {fmt_s(elapsed)}  ETA {fmt_s(eta)}", flush=True)

# ----------------------------------------------------------------------------- devices


def pick_device(name="auto"):
    """'auto' -> cuda when available, else cpu. Turns on cudnn.benchmark on CUDA (fixed patch sizes)."""
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def needs_scaler(device):
    """fp16 autocast (CUDA without bf16) needs a grad scaler; bf16 and float32 do not."""
    return device.type == "cuda" and not torch.cuda.is_bf16_supported()

# ----------------------------------------------------------------------------- patches


class PatchStream(torch.utils.data.IterableDataset):
    """Endless training patches, made in DataLoader workers off the training thread.
    volumes: list of (image_hu (X, Y, Z), label (X, Y, Z) uint8, data.foreground_index of the label).
    fg_fraction, by_class: the centre's draw, as data.sample_patch (fg_fraction None: anywhere).
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


def train_proxy(model, volumes, val_cases, epochs, val_every, steps_per_epoch, device, seed, *, patch_vox,
                batch_size, window_hu, lr, workers, roi, overlap=0.25, fg_fraction=None, by_class=False, warmup_steps=0,
                decay="constant", progress=Progress):
    """Proxy model on pseudo labels (Algorithm 1 line 3): `epochs` epochs, validation Dice on the validation
    cases' pseudo labels every `val_every` epochs, the best weights kept (paper: 100 epochs, every 5).
    val_cases: a function returning an iterable of (image, pseudo label) pairs, or None. fg_fraction: None for
    the paper's "random selection of patches" (centres anywhere), or a foreground share. warmup_steps, decay:
    the lr schedule over all epochs. Returns [(epoch, dice)]; the model ends with its best weights (the last
    ones when no validation case has a pseudo label to score against).
    """
    data = batches(PatchStream(volumes, patch_vox, fg_fraction, window_hu, seed, by_class=by_class), batch_size,
                   workers, device)
    stage = Stage(model, supervised_loss, data, epochs * steps_per_epoch, device, lr, warmup_steps, decay,
                  progress=progress)
    best, best_state, history = -1.0, None, []
    for epoch in range(0, epochs, val_every):
        chunk = min(val_every, epochs - epoch)
        stage.run(f"proxy epochs {epoch + 1}-{epoch + chunk}/{epochs}", chunk * steps_per_epoch)
        if val_cases is None:  # nothing to validate on: keep the last weights
            best_state = model.state_dict()
            continue
        scores = evaluate(model, val_cases(), 2, roi, overlap)
        if len(scores) == 0:
            raise ValueError("train_proxy: val_cases() gave no validation case; pass val_cases=None "
                             "to train the proxy without validation")
        scored = np.isfinite(scores).any()          # NaN: a case whose pseudo label is empty
        dice = float(np.nanmean(scores)) if scored else -1.0
        history.append((epoch + chunk, dice))
        print(f"  proxy epoch {epoch + chunk}/{epochs}: validation Dice on pseudo labels "
              + (f"{dice:.4f}" if scored else "none (every validation pseudo label is empty)"), flush=True)
        if dice > best or best_state is None:
            best, best_state = dice, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return history
