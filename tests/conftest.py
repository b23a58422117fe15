"""Fixtures shared by the test files (helpers to import are in tiny.py): one torch thread for the session, the
phantom data sets (`phantom`: 10 cases, `phantom12`: 12, `msd`: 6 small ones in a Task09_ folder), finished tiny
studies (`reference`: rand and proxyrank_var_semi; `msd_run`: with the all-data reference), and no nnU-Net folder
variable leaking in from the shell."""
import pytest
import torch

import al_loop
import tiny
from phantom import make_phantom_dataset


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny test models run fastest on one thread, and a busy machine cannot oversubscribe it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """10 phantom cases of 24 x 24 x 16 voxels at 5 x 5 x 6 mm, in MSD layout."""
    root = tmp_path_factory.mktemp("phantom") / "Phantom"
    make_phantom_dataset(root, 10, seed=3, shape_vox=(24, 24, 16), spacing_mm=(5.0, 5.0, 6.0))
    return root


@pytest.fixture(scope="module")
def reference(phantom, tmp_path_factory):
    """A finished tiny study on the 10 phantoms: (run folder, its states)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return out, tiny.run(phantom, out)


@pytest.fixture(scope="module")
def phantom12(tmp_path_factory):
    """12 phantom cases as the `phantom` fixture makes its 10."""
    root = tmp_path_factory.mktemp("phantom12") / "Phantom"
    make_phantom_dataset(root, 12, seed=3, shape_vox=(24, 24, 16), spacing_mm=(5.0, 5.0, 6.0))
    return root


@pytest.fixture(autouse=True)
def no_nnunet_env(monkeypatch):
    """No nnU-Net folder leaks in from the shell: an export writes only where a test says."""
    for name in tiny.NNUNET_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def msd_run(phantom, tmp_path_factory):
    """A finished tiny study of rand, proxyrank_var_semi and the all-data reference on the MSD phantom."""
    out = tmp_path_factory.mktemp("msd") / "run"
    assert al_loop.main(tiny.args(phantom, out, *tiny.WITH_FULL)) == 0
    return out


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    """6 phantom cases of 12 x 10 x 8 voxels, MSD layout, in a folder named as MSD names its tasks."""
    root = tmp_path_factory.mktemp("msd") / "Task09_Phantom"
    return make_phantom_dataset(root, 6, seed=1, shape_vox=(12, 10, 8), spacing_mm=(6.0, 6.0, 8.0))
