import pytest
import torch

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
