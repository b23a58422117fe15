"""study.py: SIGTERM inside a file read stops the run as SIGTERM."""

import nibabel as nib
import pytest

import data
import study
import folders


def test_sigterm_during_a_file_read_is_not_taken_for_a_damaged_file(phantom, monkeypatch):
    """SIGTERM lands where it lands: inside a NIfTI read (whose handler turns a damaged file's errors into a
    message), its exception still stops the run as SIGTERM, not as 'not a readable NIfTI file'."""
    def terminated(*args, **kwargs):
        study._terminated(15, None)
    monkeypatch.setattr(nib, "load", terminated)
    with pytest.raises(study.Terminated):
        data._open_nifti(folders.read_msd(phantom)[0]["image"])
