"""files.py: atomic writers leave no temporary file and fsync before the rename."""
import gzip
import json
import os

import numpy as np
import torch

import data
import files
from tiny import LPS_AFFINE


def test_atomic_write_fsyncs_before_the_rename(tmp_path, monkeypatch):
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: order.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: order.append("replace") or real_replace(a, b))
    files.atomic_write(tmp_path / "x.pt", lambda f: torch.save({"a": 1}, f))
    assert order == ["fsync", "replace"]


# ---------------------------------------------------------------------------------------------- writing


def test_atomic_writers_leave_no_temporaries(tmp_path):
    files.atomic_write_json(tmp_path / "s.json", {"a": [1, 2]})
    files.atomic_save_npy(tmp_path / "a.npy", np.arange(5))
    data.write_nifti(tmp_path / "v.nii.gz", np.ones((3, 4, 5), np.int16), LPS_AFFINE)
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": [1, 2]}
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.arange(5))
    assert (tmp_path / "v.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # really gzipped
    assert gzip.decompress((tmp_path / "v.nii.gz").read_bytes())[344:348] == b"n+1\x00"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "s.json", "v.nii.gz"]
