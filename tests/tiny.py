"""A tiny phantom study for the end-to-end tests (the `phantom` fixture is in conftest.py): a few training steps."""
from pathlib import Path

K = 2


def args(root, out, *extra):
    """al_loop arguments of a study that runs in seconds: k 2, 2 iterations, seed 0, 2 validation cases."""
    return ["--data", str(root), "--out", str(out), "--cache-dir", str(Path(out).parent / "cache"),
            "--preset", "demo", "--k", str(K), "--iterations", "2", "--seeds", "0", "--spacing-mm", "6.0,6.0,6.0",
            "--patch-vox", "16,16,32", "--roi-vox", "32,32,32", "--steps", "2", "--semi-steps", "2",
            "--proxy-epochs", "2", "--proxy-val-every", "1", "--proxy-patches-per-case", "1", "--mc-passes", "2",
            "--channels", "4,4,8,8,8", "--workers", "0", "--n-val", "2", *extra]
