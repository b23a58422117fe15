"""The README's porting example runs as written: with a model that is not this project's U-Net, from a folder
that holds proxy_al.py and losses.py alone (a fresh Python without the repository on its path)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What the example calls "yours": a three-layer network with dropout, a volume of odd sides with a bright
# block in the pseudo-label band, and 16^3 training patches. Tiny, so that it runs in seconds on the CPU.
YOURS = """
import numpy as np
import torch
import torch.nn as nn

torch.manual_seed(0)
model = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.ReLU(), nn.Dropout3d(0.2),
                      nn.Conv3d(6, 6, 3, padding=1), nn.ReLU(), nn.Dropout3d(0.2), nn.Conv3d(6, 3, 1))
image_hu = np.random.default_rng(0).normal(40.0, 30.0, (21, 19, 17)).astype(np.float32)
image_hu[4:14, 3:12, 2:11] = 125.0
image = np.clip((image_hu + 21.0) / 210.0, 0.0, 1.0)
roi = (16, 16, 16)
labeled, unlabeled = torch.rand(2, 1, *roi), torch.rand(2, 1, *roi)
label = torch.randint(0, 3, (2, 1, *roi))
"""

# What the example must give.
CHECKS = """
import sys
from pathlib import Path
assert Path(proxy_al.__file__).parent == Path(sys.argv[1]), proxy_al.__file__    # the copy, not the repository
assert Path(sys.argv[2]) not in [Path(p or ".").resolve() for p in sys.path], sys.path
for name in sys.argv[3:]:
    assert name not in sys.modules, name + " was imported"
assert set(scores) == {"variance", "entropy", "bald"}
assert all(np.isfinite(v) and v > 0 for v in scores.values()), scores
assert proxy_label.dtype == np.uint8 and proxy_label.shape == image.shape and proxy_label[4:14, 3:12, 2:11].all()
assert noisy.dtype == np.uint8 and noisy.shape == image.shape and probs.shape == (3, *image.shape)
assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
grads = [p.grad for p in model.parameters()]
assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
print("ported:", {k: round(v, 6) for k, v in scores.items()}, "loss", float(loss.detach()))
"""


def readme_example():
    """The first ```python block after the '## Porting' heading of README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    heading = re.search(r"^## Porting[ \t]*$", text, re.MULTILINE)
    assert heading, "README.md has no '## Porting' section"
    block = re.search(r"^```python\n(.*?)^```", text[heading.end():], re.MULTILINE | re.DOTALL)
    assert block, "the '## Porting' section of README.md has no ```python block"
    return block.group(1)


def test_readme_porting_example_is_short():
    code = readme_example()
    assert "proxy_al.mc_scores(model, image" in code and "proxy_al.semi_loss(model, " in code
    assert len(code.splitlines()) <= 30


def test_porting_example_runs_with_proxy_al_and_losses_alone(tmp_path):
    for name in ("proxy_al.py", "losses.py"):
        shutil.copy(REPO / name, tmp_path / name)
    others = sorted(p.stem for p in REPO.glob("*.py") if p.name not in ("proxy_al.py", "losses.py"))
    code = YOURS + readme_example() + CHECKS
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    # `python -c` puts the working folder first on sys.path: the two copies, and nothing else of the project
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path.resolve()), str(REPO), *others], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1].startswith("ported:"), proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == ["losses.py", "proxy_al.py"]
