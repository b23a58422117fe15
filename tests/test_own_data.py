"""The faults of issue 23, one test each: every test first makes the fault happen (and checks that it did),
then asserts the decided behaviour and, for an error, its message. CPU, tiny phantoms, seconds each."""
import dataclasses
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import al_loop
import data
import study
import tiny
from phantom import make_phantom_dataset
from report import nanmean
from test_annotator import own_scans, to_annotate

from test_reliability import REPO, STRATEGIES, run, tiny_args
import folders
import run_folder
from cases import split_cases


def same_results(a, b):
    for name in ("rand", "proxyrank_var_semi"):
        assert a["0"][name]["labeled"] == b["0"][name]["labeled"], name
        assert [r["mean_dice"] for r in a["0"][name]["iterations"]] == pytest.approx(
            [r["mean_dice"] for r in b["0"][name]["iterations"]], nan_ok=True), name


@pytest.fixture(scope="module")
def reference(phantom, tmp_path_factory):
    """A finished tiny study on the 10 phantoms: (run folder, its states)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return out, run(phantom, out)


@pytest.fixture(scope="module")
def phantom12(tmp_path_factory):
    """12 phantom cases as the `phantom` fixture makes its 10."""
    root = tmp_path_factory.mktemp("phantom12") / "Phantom"
    make_phantom_dataset(root, 12, seed=3, shape_vox=(24, 24, 16), spacing_mm=(5.0, 5.0, 6.0))
    return root


def copy_data(root, tmp_path, name="data"):
    dest = tmp_path / name
    shutil.copytree(root, dest)
    return dest


def rewrite_label(path, change):
    """Replace the label file `path` by change(label array), same affine; returns the new array."""
    img = nib.load(path)
    label = change(np.asarray(img.dataobj).astype(np.uint8))
    nib.save(nib.Nifti1Image(label, img.affine), path)
    return label


def messages(record):
    return [str(w.message) for w in record]


def snapshot(folder):
    """Every file under `folder` with its size and modification time."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in Path(folder).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------- 1. _semi with the pool all labeled


def test_semi_strategy_with_every_pool_case_labeled_skips_lines_9_to_11(phantom12, tmp_path):
    """12 cases, 8 for validation: a pool of 4 that k 2 x 2 iterations labels completely."""
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as record:
        assert al_loop.main(tiny_args(phantom12, out, "--n-val", "8")) == 0
    split = json.loads((out / "split.json").read_text())
    assert len(split["pool"]) == 4
    said = messages(record)
    assert any("labels all 4 pool cases" in m and "no unlabeled case left" in m for m in said), said   # up front
    assert any("proxyrank_var_semi seed 0 iteration 2: every pool case is labeled, so lines 9-11" in m
               and "are skipped" in m for m in said), said
    st = run_folder.read_states(out)["0"]["proxyrank_var_semi"]
    assert [r["n_labeled"] for r in st["iterations"]] == [2, 4]
    assert sorted(st["labeled"]) == sorted(split["pool"])                     # the fault: nothing left unlabeled
    assert len(st["iterations"][0]["certain"]) == 2                           # iteration 1 fine-tuned as usual
    assert st["iterations"][1]["certain"] == []                               # iteration 2 had nothing to use
    assert np.isfinite(st["iterations"][1]["mean_dice"])                      # Ms stands in for Msemi
    assert not (out / "checkpoints" / "seed0" / "proxyrank_var_semi" / "iter1_semi.pt").exists()
    assert (out / "checkpoints" / "seed0" / "proxyrank_var_semi" / "iter0_semi.pt").exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this PyTorch has no torch.distributed")
def test_semi_strategy_with_every_pool_case_labeled_under_torchrun(phantom12, tmp_path):
    from test_distributed import torchrun      # the same launcher as the distributed tests
    out = tmp_path / "run"
    proc = torchrun(tiny_args(phantom12, out, "--n-val", "8"))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "[rank 1 " in log and "every pool case is labeled, so lines 9-11" in log, log[-3000:]
    st = run_folder.read_states(out)["0"]["proxyrank_var_semi"]
    assert [r["n_labeled"] for r in st["iterations"]] == [2, 4] and st["iterations"][1]["certain"] == []

# ------------------------------------------------------------------------------------ 2. a refused run writes nothing


def test_refused_request_leaves_no_split_and_the_corrected_one_runs(phantom, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"--n-val 2 leaves 8 pool cases of 10, but --k 10 x --iterations 2 needs "
                                         r"20; lower --n-val, --k or --iterations"):
        al_loop.main(tiny.args(phantom, out, "--strategy", "rand", "--k", "10"))
    assert not out.exists()                                   # no folder, so no split.json fixed by a refused run
    assert al_loop.main(tiny.args(phantom, out, "--strategy", "rand", "--n-val", "4")) == 0
    split = json.loads((out / "split.json").read_text())
    assert len(split["val"]) == 4 and len(split["pool"]) == 6 and split["n_val"] == 4
    config = (out / "config.json").read_text()
    with pytest.raises(SystemExit, match=r"config.json: this rerun asks for --n-val 3 \(the run has 4\)\. .* Rerun "
                                         r"with the run's values, or start a new --out"):
        al_loop.main(tiny.args(phantom, out, "--strategy", "rand", "--n-val", "3"))
    assert json.loads((out / "split.json").read_text()) == split
    assert (out / "config.json").read_text() == config                   # records only what the run has


def test_too_many_validation_cases_refused_then_a_smaller_count_is_not(phantom, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"--n-val 20 leaves 1 pool case of 10, but --k 2 x --iterations 2 needs 4"):
        al_loop.main(tiny.args(phantom, out, "--strategy", "rand", "--n-val", "20"))
    assert not out.exists()
    assert al_loop.main(tiny.args(phantom, out, "--strategy", "rand", "--n-val", "4")) == 0   # not refused
    assert len(json.loads((out / "split.json").read_text())["val"]) == 4
    assert [r["n_labeled"] for r in run_folder.read_states(out)["0"]["rand"]["iterations"]] == [2, 4]

# ------------------------------------------------------------------------------------ 3. a damaged pool-score file


def test_truncated_score_file_is_named_and_scored_again(phantom, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out, ignore=shutil.ignore_patterns(".lock"))
    first = reference[1]["0"]["proxyrank_var_semi"]["labeled"][0]     # line 5 chose it by this score
    path = out / "scores" / "seed0" / f"{first}.json"
    original = json.loads(path.read_text())
    path.write_text(path.read_text()[:len(path.read_text()) // 2])
    with pytest.raises(json.JSONDecodeError):                          # the fault: the file is damaged
        json.loads(path.read_text())
    run_folder.state_file(out, 0, "proxyrank_var_semi").unlink()           # line 5 ranks the pool again
    with pytest.warns(UserWarning, match=re.escape(str(path)) + r": not valid JSON.*scoring that case again"):
        state = run(phantom, out)
    assert json.loads(path.read_text()) == pytest.approx(original)
    same_results(state, reference[1])
    assert (out / "results.csv").read_text() == (reference[0] / "results.csv").read_text()

# ----------------------------------------------------------------------------------- 4. labels in hand, annotation mode


def test_labels_in_hand_join_tl_and_only_unlabeled_cases_are_selected(phantom12, tmp_path):
    root, out = own_scans(phantom12, tmp_path, labeled=6), tmp_path / "run"
    labeled = {c["id"] for c in folders.read_msd(root) if c["label"]}
    assert len(labeled) == 6 and len(folders.read_msd(root)) == 12
    args = tiny.args(root, out)                                   # the preset's strategy: annotation mode picks one
    have = set(labeled)
    for _ in range(2):                                            # line 5's selection, then iteration 1's
        assert al_loop.main(args) == 0
        rows = to_annotate(out)
        assert len(rows) == tiny.K and not {r["case"] for r in rows} & have, rows
        for r in rows:                                            # the annotator delivers
            shutil.copy(phantom12 / "labelsTr" / f"{r['case']}.nii.gz", root / "labelsTr")
            have.add(r["case"])
    split = json.loads((out / "split.json").read_text())
    st = run_folder.read_states(out)["0"]["proxyrank_var_semi"]
    given = [c for c in split["pool"] if c in labeled]
    assert len(split["val"]) == 2 and set(split["val"]) <= labeled and len(given) == 4
    assert st["given"] == given and st["labeled"][:4] == given
    record = st["iterations"][0]
    assert record["n_labeled"] == 4 + tiny.K                              # Tl: the labels in hand + line 5's k
    assert record["certain"] and not set(record["certain"]) & set(given)
    assert len(record["acquired"]) == tiny.K and not set(record["acquired"]) & set(given)
    assert not set(st["labeled"][4:]) & labeled and not set(st["scores"]) & set(given)

# ------------------------------------------------------------------------------------ 5. label files named as nnU-Net's


def nnunet_named_folder(phantom, dest):
    """imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz (0/1: no dataset.json names more classes), no
    dataset.json."""
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    for case in folders.read_msd(phantom):
        shutil.copy(case["image"], dest / "imagesTr" / f"{case['id']}_0000.nii.gz")
        shutil.copy(case["label"], dest / "labelsTr" / f"{case['id']}.nii.gz")
        rewrite_label(dest / "labelsTr" / f"{case['id']}.nii.gz", lambda x: (x > 0).astype(np.uint8))
    return dest


def test_labels_named_by_case_are_used_and_an_orphan_is_named(phantom, tmp_path):
    root = nnunet_named_folder(phantom, tmp_path / "scans")
    shutil.copy(root / "labelsTr" / "phantom_0.nii.gz", root / "labelsTr" / "ghost_9.nii.gz")
    assert not (root / "dataset.json").exists() and not (root / "labelsTr" / "phantom_0_0000.nii.gz").exists()
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"labelsTr: 1 label file pairs with no image and are not used "
                                         r"\(ghost_9.nii.gz\)"):
        s = study.open_study(al_loop.parse_args(tiny_args(root, out))[0])[0].cases
    assert not s.annotation and len(s.files) == 10 and all(c["label"] for c in s.files.values())
    assert len(s.val) == 2
    with pytest.warns(UserWarning, match="ghost_9.nii.gz"):
        states = run(root, out)
    assert not (out / "to_annotate.csv").exists()
    assert all(len(st["iterations"]) == 2 for st in states["0"].values())

# ------------------------------------------------------------------------------------ 6. a full disk


class FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails as the OS fails it (errno ENOSPC, no file name)."""

    def writable(self):
        return True

    def write(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_at_a_checkpoint_is_a_message_and_a_rerun_continues(phantom, reference, tmp_path, monkeypatch):
    out, saves, real_save = tmp_path / "run", [], torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: saves.append(obj) or real_save(obj, FullDisk()))
    with pytest.raises(SystemExit) as err:
        al_loop.main(tiny_args(phantom, out))
    assert len(saves) == 1 and "model" in saves[0]                    # the fault: the first checkpoint save failed
    message = str(err.value)
    assert message.startswith(f"{out}: no space left on the disk"), message
    assert "rerun the same command" in message and "--out" in message and "Traceback" not in message
    assert not list(out.rglob("*.pt")) and not list(out.rglob(".*.tmp"))  # no half a checkpoint
    monkeypatch.setattr(torch, "save", real_save)
    same_results(run(phantom, out), reference[1])

# ------------------------------------------------------------------------------------ 7. --window-hu -21,189


def test_window_hu_takes_a_negative_lower_bound(capsys):
    for argv in (["--window-hu", "-21,189"], ["--window-hu=-21,189"], ["--window-hu", "-21,189", "--k", "5"],
                 ["--hu-band", "-50,50", "--window-hu", "-21,189"]):
        cfg = al_loop.parse_args(["--data", "somewhere", *argv])[0]
        assert cfg.window_hu == (-21, 189), argv
        al_loop.cli.check_options(dataclasses.replace(cfg, device="cpu"))      # a valid window, no complaint
    assert al_loop.parse_args(["--hu-band", "-50,50"])[0].hu_band == "-50,50"
    with pytest.raises(SystemExit):
        al_loop.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(e.g. --window-hu -21,189)" in help_text

# ------------------------------------------------------------------------------------ 8. labels checked before training


def test_pool_label_with_a_foreign_class_stops_before_training(phantom, tmp_path, monkeypatch):
    root = copy_data(phantom, tmp_path)
    ids = [c["id"] for c in folders.read_msd(root)]
    pool = split_cases(ids, 2, 0, None)["pool"]
    case = {c["id"]: c for c in folders.read_msd(root)}[pool[-1]]
    assert (rewrite_label(case["label"], lambda x: np.where(x > 0, 7, 0).astype(np.uint8)) == 7).any()
    trained = []
    monkeypatch.setattr(al_loop, "train_proxy", lambda *a, **kw: trained.append(a))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=re.escape(f"case {case['id']}: {case['label']}: label value 7 but the task "
                                                   "has 3 classes")):
        al_loop.main(tiny_args(root, out))
    assert trained == [] and not list(out.rglob("*.pt")) and not (out / "split.json").exists()

# ------------------------------------------------------------------------------------ 9. an all-zero validation label


def test_validation_label_without_foreground_is_named_and_left_out_of_the_means(phantom, tmp_path):
    root = copy_data(phantom, tmp_path)
    ids = [c["id"] for c in folders.read_msd(root)]
    val = split_cases(ids, 3, 0, None)["val"]
    case = {c["id"]: c for c in folders.read_msd(root)}[val[0]]
    assert not rewrite_label(case["label"], np.zeros_like).any()
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=re.escape(case["label"]) + ": validation label without foreground"):
        assert al_loop.main(tiny.args(root, out, "--strategy", "rand", "--n-val", "3")) == 0
    assert json.loads((out / "split.json").read_text())["val"] == val
    lines = (out / "per_case_dice.csv").read_text().splitlines()
    assert lines[0] == "strategy,seed,iteration,case,dice_liver,dice_tumour,mean_dice"
    empty = [line for line in lines if f",{case['id']}," in line]
    assert len(empty) == 2 and all(line.endswith(",nan,nan,nan") for line in empty), empty
    for rec in run_folder.read_states(out)["0"]["rand"]["iterations"]:
        assert all(np.isnan(rec["per_case"][case["id"]]))
        others = np.array([rec["per_case"][c] for c in val[1:]], float)
        assert rec["dice"] == pytest.approx(list(nanmean(others, 0)), nan_ok=True)
        assert np.isfinite(rec["dice"][0])                               # the other cases' liver mean
    assert "liver: 1 of 3 validation cases have no liver" in (out / "summary.md").read_text()

# ---------------------------------------------------------------------------------- 10. a pseudo-label band that misses


class StopAtProxy(Exception):
    """Raised in place of the proxy's training: the pseudo labels are made and reported by then."""


@pytest.mark.parametrize("band, says", [
    ("2000,2100", "10 case(s) have no voxel in the pseudo-label band; try --hu-band auto"),
    ("-300,-50", "the pseudo-label band -300,-50 HU misses the labeled organ: its Dice against the validation "
                 "labels is 0.00")])
def test_pseudo_label_band_that_misses_the_organ_points_to_hu_band_auto(phantom, tmp_path, monkeypatch, band, says):
    """2000-2100 HU finds nothing; -300 to -50 HU (fat) finds something in every case, but not the organ."""
    def stop(*a, **kw):
        raise StopAtProxy()

    monkeypatch.setattr(al_loop, "train_proxy", stop)
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as record, pytest.raises(StopAtProxy):
        al_loop.main(tiny.args(phantom, out, "--strategy", "proxyrank", "--hu-band", band))
    rows = [line.split(",") for line in (out / "pseudo_labels.csv").read_text().splitlines()[1:]]
    dice = [float(r[3]) for r in rows if r[3]]
    assert len(dice) == 2 and max(dice) < 0.1                           # the fault: the band misses the organ
    voxels = [int(r[1]) for r in rows]
    assert max(voxels) == 0 if band == "2000,2100" else min(voxels) > 0
    said = [m for m in messages(record) if "--hu-band auto" in m]
    assert any(says in m for m in said), messages(record)

# ------------------------------------------------------------------------------------ 11. --out inside the data


@pytest.mark.parametrize("where", [".", "runs/first"])
def test_out_in_the_data_folder_is_refused_and_nothing_written(phantom, tmp_path, where):
    root = copy_data(phantom, tmp_path)
    before = snapshot(root)
    out = root / where
    where_ = "is the data folder" if where == "." else f"lies inside the data folder {root.resolve()}"
    with pytest.raises(SystemExit, match=re.escape(f"--out {out}: {where_}")):
        al_loop.main(tiny_args(root, out))
    assert snapshot(root) == before
    assert not (root / "runs").exists()

# ------------------------------------------------------------------------------------ 12. the default cache


def without_cache_dir(args):
    i = args.index("--cache-dir")
    return args[:i] + args[i + 2:]


def test_default_cache_is_the_user_cache_folder_and_logged(phantom, tmp_path, monkeypatch, capsys):
    xdg, cwd = tmp_path / "xdg", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.chdir(cwd)
    assert al_loop.main(without_cache_dir(tiny.args(phantom, tmp_path / "run", "--strategy", "rand"))) == 0
    cache = xdg / "proxy-al"
    assert len(list(cache.rglob("*.npy"))) >= 10                       # every image's entry
    assert f"; cache {cache}" in capsys.readouterr().out
    assert os.listdir(cwd) == []

# ------------------------------------------------------------------------------- 13. the demo preset on a user's folder


def test_demo_preset_on_a_users_folder_keeps_the_papers_validation_rule(tmp_path):
    folder = str(tmp_path / "mine")
    cfg = al_loop.parse_args(["--data", folder, "--preset", "demo"])[0]
    assert cfg.n_val == al_loop.PAPER.n_val == 0 and al_loop.DEMO.n_val == 8
    assert cfg.steps == al_loop.DEMO.steps and cfg.proxy_patches == "balanced"   # the rest of the demo stays
    assert al_loop.parse_args(["--data", folder, "--preset", "demo", "--n-val", "3"])[0].n_val == 3
    assert al_loop.parse_args(["--preset", "demo"])[0].n_val == 8
    assert al_loop.parse_args([])[0].n_val == 8

# ------------------------------------------------------------------------------------ 14. SIGTERM


def test_sigterm_ends_with_a_message_and_a_rerun_continues(phantom, reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "stdout.txt"
    with open(log, "w") as stdout:
        proc = subprocess.Popen([sys.executable, str(REPO / "al_loop.py"), *tiny_args(phantom, out)], cwd=tmp_path,
                                stdout=stdout, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 300        # a safety net only: the test waits for the state file
            while not list(out.glob("state/seed0_*.json")):
                assert proc.poll() is None, f"the run ended before its first state file:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no state file after 300 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert "done: results.csv" not in text                              # the fault: it stopped before the end
    assert "SIGTERM: stopped during" in text and f"Every finished stage is saved in {out}; rerun the same command " \
                                                  "to continue from there." in text, text[-3000:]
    assert "Traceback" not in text
    same_results(run(phantom, out), reference[1])
