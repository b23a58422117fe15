"""study.py: the run around the method, as a user meets it across reruns. Each test mutates the run folder or
the data folder the way a user would (a folder of their own as --out, labels saved between annotation rounds,
changed options, images added or removed), then checks what the rerun does. CPU, tiny phantoms."""
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import al_loop
import data
import study
import tiny
from test_annotator import own_scans, to_annotate
from test_faults import messages, snapshot
from test_reliability import run, tiny_args
import folders
import run_folder


def deliver_labels(truth, root, out):
    """The annotator saves a label for every row of to_annotate.csv where it asks (save_label_as)."""
    rows = to_annotate(out)
    for r in rows:
        shutil.copy(truth / "labelsTr" / f"{r['case']}.nii.gz", r["save_label_as"])
    return [r["case"] for r in rows]


# ----------------------------------------------------------------------------------------- the run folder


def test_out_on_a_users_folder_is_refused_and_nothing_in_it_touched(phantom, tmp_path):
    """--out on a folder that is no run (notes, .tmp files, a config.json and results.csv of the user's) is
    refused before anything is written or deleted; an empty folder is taken, and left empty if refused."""
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    for name, text in [("notes.txt", "notes"), (".session.tmp", "s"), ("sub/.draft.tmp", "d"),
                       ("config.json", '{"lr": 1}'), ("results.csv", "a,b\n")]:
        (out / name).write_text(text)
    before = snapshot(out)
    with pytest.raises(SystemExit, match=r"--out .*mine: holds 5 file\(s\) or folder\(s\) \(.session.tmp, config.json, "
                                         r"notes.txt, results.csv, sub\) and is no proxy-al run folder"):
        al_loop.main(tiny_args(phantom, out))
    assert snapshot(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="--k 50 x --iterations 2"):      # refused later: leaves no trace
        al_loop.main(tiny_args(phantom, empty, "--k", "50"))
    assert empty.is_dir() and not list(empty.iterdir())
    run(phantom, empty, "--strategy", "rand", "--iterations", "1")         # an empty folder is taken
    assert (empty / run_folder.MARKER).is_file() and (empty / "results.csv").is_file()
    run(phantom, empty, "--strategy", "rand", "--iterations", "2")         # and recognised as the run's own


def test_run_folder_of_an_older_proxy_al_is_recognised_by_its_config(phantom, tmp_path):
    """A run folder made before the marker file has a config.json with the project's keys: it is the run's."""
    out = tmp_path / "run"
    run(phantom, out, "--strategy", "rand", "--iterations", "1")
    (out / run_folder.MARKER).unlink()
    assert run_folder.is_run_folder(out)
    run(phantom, out, "--strategy", "rand", "--iterations", "2")
    assert json.loads((out / "state" / "seed0_rand.json").read_text())["iterations"][1]["n_labeled"] == 2 * tiny.K

# ----------------------------------------------------------------------------------------- annotation mode


@pytest.mark.parametrize("labeled", [4, 6])
def test_annotation_mode_runs_to_its_end_when_the_user_labels_what_it_asks(phantom, tmp_path, capsys, labeled):
    """10 cases, labels for 4 (6 unlabeled pool cases) or 6 (exactly k x iterations = 4), --k 2 --iterations 2:
    every round the user saves the labels asked for, and the run goes on to its end (no 'lower --k')."""
    root, out = own_scans(phantom, tmp_path, labeled=labeled), tmp_path / "run"
    args = tiny.args(root, out, "--strategy", "proxyrank_var_semi")
    asked = []
    for _ in range(2):                                    # line 5's selection, then iteration 1's
        assert al_loop.main(args) == 0
        asked += deliver_labels(phantom, root, out)
    assert al_loop.main(args) == 0                        # iteration 2 trains on all of them
    st = run_folder.read_states(out)["0"]["proxyrank_var_semi"]
    given = 2 if labeled == 4 else 4
    assert [r["n_labeled"] for r in st["iterations"]] == [given + 2, given + 4] and len(set(asked)) == 4
    said = capsys.readouterr().out
    if labeled == 6:                                      # the pool is spent: the run is done
        assert not st["iterations"][1].get("acquired") and "done: results.csv" in said
        assert not [r for r in to_annotate(out) if r["case"] not in asked]
    else:                                                 # two more asked for; labeled, the run is done
        assert len(st["iterations"][1]["acquired"]) == 2
        deliver_labels(phantom, root, out)
        assert al_loop.main(args) == 0
        said = capsys.readouterr().out
        assert "the 2 case(s) acquired after iteration 2 are labeled but not trained on; rerun with " \
               "--iterations 3 to train on them" in said and "done: results.csv" in said


def test_validation_label_deleted_between_rounds_is_named_before_training(phantom, tmp_path):
    root, out = own_scans(phantom, tmp_path, labeled=6), tmp_path / "run"
    args = tiny.args(root, out, "--strategy", "rand")
    assert al_loop.main(args) == 0
    deliver_labels(phantom, root, out)
    val = json.loads((out / "split.json").read_text())["val"][0]
    (root / "labelsTr" / f"{val}.nii.gz").unlink()                         # the user deletes a validation label
    with pytest.raises(SystemExit, match=rf"labelsTr/{val}.nii.gz: missing, but {val} is a validation case of "
                                         r"this run \(split.json\); put its label back"):
        al_loop.main(args)
    assert not (out / "checkpoints").exists()                             # before any training

# ----------------------------------------------------------------------------------------- changed settings


@pytest.mark.parametrize("flag, value, shown", [("--hu-band", "-50,50", "--hu-band -50,50 (the run has 100,150)"),
                                                 ("--spacing-mm", "5,5,5", "--spacing-mm 5,5,5 (the run has 6,6,6)")])
def test_rerun_with_another_setting_of_the_saved_stages_is_refused(phantom, tmp_path, flag, value, shown):
    """Adding a seed with another --hu-band or --spacing-mm would train on the old pseudo labels (or crash on
    their shape): refused, naming the setting, and config.json keeps what the run's stages have."""
    out = tmp_path / "run"
    run(phantom, out, "--strategy", "proxyrank", "--iterations", "1")
    config = (out / "config.json").read_text()
    with pytest.raises(SystemExit, match=re.escape(f"this rerun asks for {shown}")):
        al_loop.main(tiny_args(phantom, out, "--strategy", "proxyrank", "--iterations", "1", "--seeds", "0,1",
                               flag, value))
    assert (out / "config.json").read_text() == config and not (out / "state" / "seed1_proxyrank.json").exists()
    run(phantom, out, "--strategy", "proxyrank", "--iterations", "1", "--seeds", "0,1")      # what may change


def test_saved_pseudo_labels_are_keyed_by_what_made_them(phantom, tmp_path):
    """A pseudo label saved under one band (or grid, or image file) is never read for another."""
    out = tmp_path / "run"
    s = run_folder.RunFolder(out)
    made = []
    make = lambda value: lambda: made.append(value) or np.full((2, 2, 2), value, np.uint8)
    assert s.saved_array("pseudo_labels/x", make(1), ["100,150", [6, 6, 6]]).max() == 1
    assert s.saved_array("pseudo_labels/x", make(2), ["100,150", [6, 6, 6]]).max() == 1     # reused
    assert s.saved_array("pseudo_labels/x", make(3), ["-50,50", [6, 6, 6]]).max() == 3      # another band
    assert made == [1, 3]

# ----------------------------------------------------------------------------------------- the data changed


def binary_folder(phantom, dest):
    """The phantoms without dataset.json (imagesTr/ + labelsTr/ paired by name), labels 0/1."""
    shutil.copytree(phantom, dest)
    (dest / "dataset.json").unlink()
    for path in (dest / "labelsTr").glob("*.nii.gz"):
        img = nib.load(path)
        nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine), path)
    return dest


def test_images_added_after_the_run_began_are_named_in_one_message_and_not_used(phantom, tmp_path):
    """A new scan and a label saved among the images by mistake: one message names both, says they are not
    used and what the run does; no competing split-size warning; no annotation mode for the unlabeled two."""
    root, out = binary_folder(phantom, tmp_path / "scans"), tmp_path / "run"
    args = tiny_args(root, out, "--strategy", "rand", "--n-val", "0")        # the 20 % rule: 2 of 10
    assert al_loop.main(args + ["--iterations", "1"]) == 0
    for name in ("phantom_10", "phantom_11", "phantom_12"):
        shutil.copy(root / "imagesTr" / "phantom_1.nii.gz", root / "imagesTr" / f"{name}.nii.gz")
    shutil.copy(root / "labelsTr" / "phantom_0.nii.gz", root / "imagesTr" / "phantom_0_seg.nii.gz")
    with pytest.warns(UserWarning) as record:
        assert al_loop.main(args + ["--iterations", "2"]) == 0
    said = [m for m in messages(record) if "phantom_1" in m or "split" in m]
    assert len(said) == 1, said
    assert "changed since this run began" in said[0] and "4 image(s) added (phantom_0_seg, phantom_10, phantom_11, " \
        "phantom_12) are not used (phantom_0_seg: a label saved among the images?" in said[0]
    assert "the run goes on with 8 pool and 2 validation cases" in said[0]
    assert not (out / "to_annotate.csv").exists()
    assert [r["n_labeled"] for r in run_folder.read_states(out)["0"]["rand"]["iterations"]] == [2, 4]


def test_removed_scan_never_selected_is_left_out_and_a_selected_one_is_named(phantom, tmp_path):
    root, out = binary_folder(phantom, tmp_path / "scans"), tmp_path / "run"
    args = tiny_args(root, out, "--strategy", "rand")
    assert al_loop.main(args + ["--iterations", "1"]) == 0
    st = run_folder.read_states(out)["0"]["rand"]
    split = json.loads((out / "split.json").read_text())
    unused = next(c for c in split["pool"] if c not in st["labeled"])
    for folder in ("imagesTr", "labelsTr"):
        (root / folder / f"{unused}.nii.gz").unlink()
    with pytest.warns(UserWarning, match=rf"1 pool image\(s\) removed \({unused}\), never selected, are left out"):
        assert al_loop.main(args + ["--iterations", "2"]) == 0
    st = run_folder.read_states(out)["0"]["rand"]
    assert len(st["iterations"]) == 2 and unused not in st["labeled"]
    assert unused in (out / "summary.md").read_text()
    picked = st["labeled"][0]
    (root / "imagesTr" / f"{picked}.nii.gz").unlink()
    with pytest.raises(SystemExit, match=rf"the image\(s\) of {picked} are gone since this run began, but the run "
                                         r"validates on them or has selected them .* put the files back"):
        al_loop.main(args + ["--iterations", "3"])


def test_sigterm_during_a_file_read_is_not_taken_for_a_damaged_file(phantom, monkeypatch):
    """SIGTERM lands where it lands: inside a NIfTI read (whose handler turns a damaged file's errors into a
    message), its exception still stops the run as SIGTERM, not as 'not a readable NIfTI file'."""
    def terminated(*args, **kwargs):
        study._terminated(15, None)
    monkeypatch.setattr(nib, "load", terminated)
    with pytest.raises(study.Terminated):
        data._open_nifti(folders.read_msd(phantom)[0]["image"])
