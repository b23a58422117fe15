"""Nothing lost, nothing silently changed: state that cannot contradict itself, corrupt run files, one writer
per run folder, environment errors vs bad cases, checks before the long work, options. CPU, tiny phantoms."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import al_loop
import study
import strategies
import data
import files
import folders
import run_folder
import tiny
from cases import split_cases

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("--strategy", "rand,proxyrank_var_semi")


def tiny_args(root, out, *extra):
    return tiny.args(root, out, *STRATEGIES, *extra)


def run(root, out, *extra):
    assert al_loop.main(tiny_args(root, out, *extra)) == 0
    return run_folder.read_states(out)


@pytest.fixture(scope="module")
def reference(phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    return out, run(phantom, out)


def copy_run(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out, ignore=shutil.ignore_patterns(".lock"))
    return out


def same_results(a, b):
    """The same cases labeled and the same Dice (NaN where a class is absent from every validation label)."""
    for name in ("rand", "proxyrank_var_semi"):
        assert a["0"][name]["labeled"] == b["0"][name]["labeled"]
        assert [r["mean_dice"] for r in a["0"][name]["iterations"]] == pytest.approx(
            [r["mean_dice"] for r in b["0"][name]["iterations"]], nan_ok=True)


# ------------------------------------------------------------------------------------ state and checkpoints


def test_state_between_saves_follows_the_records(phantom, reference, tmp_path):
    """A state whose labeled list runs ahead of its records (a kill between two saves in older versions)
    is cut back to what the records say: no iteration trains on cases it did not have."""
    out = copy_run(reference, tmp_path)
    path = run_folder.state_file(out, 0, "rand")
    st = json.loads(path.read_text())
    st["iterations"] = []
    path.write_text(json.dumps(st))
    with pytest.warns(UserWarning, match="disagrees with the iteration records"):
        state = run(phantom, out)
    same_results(state, reference[1])
    assert [r["n_labeled"] for r in state["0"]["rand"]["iterations"]] == [2, 4]


def test_checkpoint_of_other_cases_is_redone(phantom, reference, tmp_path):
    out = copy_run(reference, tmp_path)
    ckpt = out / "checkpoints" / "seed0" / "rand"
    shutil.copy(ckpt / "iter1_sup.pt", ckpt / "iter0_sup.pt")      # trained on 4 cases, not iteration 0's 2
    path = run_folder.state_file(out, 0, "rand")
    st = json.loads(path.read_text())
    st["iterations"], st["labeled"] = [], st["labeled"][:2]
    path.write_text(json.dumps(st))
    with pytest.warns(UserWarning, match="iter0_sup.pt: trained on other cases"):
        state = run(phantom, out)
    same_results(state, reference[1])
    assert torch.load(ckpt / "iter0_sup.pt", weights_only=False)["cases"] == state["0"]["rand"]["labeled"][:2]


def test_retrained_proxy_scores_the_pool_again(phantom, reference, tmp_path):
    """A proxy checkpoint that must be redone takes its pool scores with it: none of an older proxy is reused."""
    out = copy_run(reference, tmp_path)
    (out / "checkpoints" / "seed0" / "proxy.pt").write_bytes(b"damaged")
    stale = next((out / "scores" / "seed0").iterdir())
    stale.write_text('{"variance": 99.0, "entropy": 99.0, "bald": 99.0}')
    for p in (out / "state").iterdir():
        p.unlink()
    with pytest.warns(UserWarning, match="proxy.pt: unreadable checkpoint"):
        state = run(phantom, out)
    same_results(state, reference[1])
    assert json.loads(stale.read_text())["variance"] != 99.0


@pytest.mark.parametrize("text", ['{"labeled": ["phantom_1"], "iteratio', "not json at all", "[]", '"a string"',
                                  '{"labeled": "phantom_1", "iterations": [], "scores": {}}',
                                  '{"labeled": [], "iterations": [{"n_labeled": "two"}], "scores": {}}'])
def test_corrupt_state_file_names_it_and_rebuild_state_recovers(phantom, reference, tmp_path, text):
    out = copy_run(reference, tmp_path)
    path = run_folder.state_file(out, 0, "proxyrank_var_semi")
    path.write_text(text)
    with pytest.raises(SystemExit, match=f"{path.name}.*--rebuild-state"):
        al_loop.main(tiny_args(phantom, out))
    assert path.read_text() == text                                  # nothing was touched
    with pytest.warns(UserWarning, match="moved to"):
        state = run(phantom, out, "--rebuild-state")
    same_results(state, reference[1])
    assert path.with_suffix(".bad").read_text() == text              # set aside, not deleted


@pytest.mark.parametrize("text", ['{"pool": ["phantom_1"', "[1, 2]", '{"pool": [1, 2], "val": []}', '"x"'])
def test_corrupt_split_file_names_it(phantom, reference, tmp_path, text):
    out = copy_run(reference, tmp_path)
    (out / "split.json").write_text(text)
    with pytest.raises(SystemExit, match="split.json: not a valid split file"):
        al_loop.main(tiny_args(phantom, out))


def test_missing_split_with_state_is_refused(phantom, reference, tmp_path):
    out = copy_run(reference, tmp_path)
    (out / "split.json").unlink()
    with pytest.raises(SystemExit, match="split.json: missing, but this run has finished work"):
        al_loop.main(tiny_args(phantom, out))
    assert not (out / "split.json").exists()                          # not drawn anew


def test_leftover_temporary_files_are_removed(phantom, reference, tmp_path):
    """The run's own temporary files (named as atomic_write names them) go; a user's .tmp files stay."""
    out = copy_run(reference, tmp_path)
    leftovers = [out / "state" / ".seed0_rand.json.x1y2z3w4.proxy-al.tmp",
                 out / "checkpoints" / "seed0" / ".proxy.pt.abc_defg.proxy-al.tmp"]
    users = [out / ".session.tmp", out / "sub" / ".draft.tmp", out / "state" / ".seed0_rand.json.x1y2.tmp"]
    (out / "sub").mkdir()
    for p in leftovers + users:
        p.write_bytes(b"half a file")
    with pytest.warns(UserWarning, match="removed 2 temporary"):
        run(phantom, out)
    assert not any(p.exists() for p in leftovers) and all(p.read_bytes() == b"half a file" for p in users)


def test_atomic_write_fsyncs_before_the_rename(tmp_path, monkeypatch):
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: order.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: order.append("replace") or real_replace(a, b))
    files.atomic_write(tmp_path / "x.pt", lambda f: torch.save({"a": 1}, f))
    assert order == ["fsync", "replace"]


# A run whose n-th rename onto a file named TARGET stops there, its temporary file complete, until it is killed.
HELD_RUN = """import os, sys
sys.path.insert(0, {repo!r})
import al_loop
rename, seen = os.replace, []


def held_rename(src, dst):
    seen.append(str(dst).endswith({target!r}))
    if seen[-1] and sum(seen) == {nth}:
        print("held before the rename onto", dst, flush=True)
        sys.stdin.readline()                      # no input comes: the test kills this process here
    rename(src, dst)


os.replace = held_rename
al_loop.main({args!r})
"""


@pytest.mark.parametrize("target, nth", [
    ("proxyrank_var_semi/iter0_semi.pt", 1),          # iteration 1, between its two training stages
    ("state/seed0_proxyrank_var_semi.json", 3)])      # the record of its iteration 2, before rand begins
def test_killed_run_resumes_to_the_same_results(phantom, reference, tmp_path, target, nth):
    """SIGKILL in the middle of a write (temporary file complete, not yet renamed), then a plain rerun."""
    out = tmp_path / "run"
    code = HELD_RUN.format(repo=str(REPO), target=target, nth=nth, args=tiny_args(phantom, out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    safety = threading.Timer(300, proc.kill)        # only against a hang: the test waits for the line below
    safety.start()
    try:
        log = []
        while (line := proc.stdout.readline()) and not line.startswith("held before the rename onto"):
            log.append(line)
        held = Path(line.split(" onto ", 1)[1].strip()) if line else None
        states = run_folder.read_states(out)              # what the run had finished when it was killed
        proc.kill()
        proc.wait()
    finally:
        safety.cancel()
    assert held is not None, "the run ended without reaching the write:\n" + "".join(log)[-3000:]
    assert proc.returncode == -signal.SIGKILL
    assert list(held.parent.glob(f".{held.name}.*.tmp"))                             # killed mid-write
    assert sum(len(st["iterations"]) for st in states.get("0", {}).values()) < 4     # before the run ended
    with pytest.warns(UserWarning, match="removed 1 temporary file"):
        state = run(phantom, out)
    same_results(state, reference[1])


# ------------------------------------------------------------------------------------ one writer per folder


def test_second_process_on_a_run_folder_stops_naming_the_holder(phantom, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import study\n"
            f"with run_folder.locked({str(out)!r}):\n    print('locked', flush=True); sys.stdin.readline()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=f"{out}: run folder in use by another proxy-al process \\(pid {holder.pid}\\)"):
            al_loop.main(tiny_args(phantom, out))
    finally:
        holder.send_signal(signal.SIGKILL)          # the OS drops a dead process's lock
        holder.wait()
    with run_folder.locked(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())


# ------------------------------------------------------------------------------------ the data never changes silently


def test_cache_that_cannot_be_written_stops_the_run(phantom, tmp_path, monkeypatch):
    """Half the cases are cached, the disk is full for the rest: the run stops, no case is dropped."""
    cases = folders.read_msd(phantom)
    for case in cases[:5]:
        data.cached_case(case, tmp_path / "cache", (6.0, 6.0, 6.0), with_label=False)

    def disk_full(path, array):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(data, "atomic_save_npy", disk_full)
    with pytest.raises(SystemExit, match="cannot write the preprocessed cache.*No space left.*--cache-dir"):
        al_loop.main(tiny_args(phantom, tmp_path / "run"))


def test_unreadable_and_nan_cases_are_left_out_and_listed(phantom, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(phantom, root)
    cases = {c["id"]: c for c in folders.read_msd(root)}
    Path(cases["phantom_4"]["image"]).write_bytes(b"not a nifti file")
    img = nib.load(cases["phantom_7"]["image"])
    volume = np.asarray(img.dataobj, dtype=np.float32)
    volume[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(volume, img.affine), cases["phantom_7"]["image"])
    with pytest.warns(UserWarning, match="phantom_7.nii.gz: the image has NaN or infinite voxels"):
        run(root, tmp_path / "run", "--n-val", "1")
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "2 case(s) left out" in summary and "- phantom_4:" in summary and "- phantom_7:" in summary


def test_nan_voxels_are_an_error_naming_the_file(tmp_path):
    volume = np.zeros((9, 10, 11), np.float32)
    volume[1, 2, 3] = np.inf
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    with pytest.raises(ValueError, match="x.nii.gz: the image has NaN or infinite voxels"):
        data.preprocess_case(path, None, (2.0, 2.0, 2.0))


# ------------------------------------------------------------------------------------ labels before training


def break_label(root, which, how):
    """Rewrite one case's label: 'grid' (another affine), 'value' (a class the task lacks)."""
    case = folders.read_msd(root)[which]
    img = nib.load(case["label"])
    label, affine = np.asarray(img.dataobj).astype(np.uint8), img.affine.copy()
    if how == "grid":
        affine[0, 3] += 10.0
    else:
        label[label > 0] = 7
    nib.save(nib.Nifti1Image(label, affine), case["label"])
    return case


@pytest.mark.parametrize("part, how, message", [
    ("pool", "grid", "(?s)1 label file.*{name}.*do not share one voxel grid"),
    ("val", "grid", "(?s)1 label file.*{name}.*do not share one voxel grid"),
    ("val", "value", "{name}: label value 7 but the task has 3 classes")])
def test_label_problems_stop_before_training(phantom, tmp_path, part, how, message):
    """Every label header, and every validation label's values, are checked before the first training step."""
    root = tmp_path / "data"
    shutil.copytree(phantom, root)
    ids = [c["id"] for c in folders.read_msd(root)]
    case = break_label(root, ids.index(split_cases(ids, 2, 0, None)[part][0]), how)
    with pytest.raises(SystemExit, match=message.format(name=Path(case["label"]).name)):
        al_loop.main(tiny_args(root, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_multiclass_labels_without_dataset_json_are_a_clear_error(phantom, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(phantom, root)
    (root / "dataset.json").unlink()                 # the phantom labels hold classes 0, 1, 2
    with pytest.raises(SystemExit, match="label value 2 but the task has 2 classes.*without a dataset.json"):
        al_loop.main(tiny_args(root, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_pool_label_values_checked_before_training(phantom, tmp_path, monkeypatch):
    """Every pool label's values are checked before any training (none is used for selection before its case
    is selected): a bad one stops the run at once with a message naming the file, and nothing is trained."""
    root = tmp_path / "data"
    shutil.copytree(phantom, root)
    split = split_cases([c["id"] for c in folders.read_msd(root)], 2, 0, None)
    ids = [c["id"] for c in folders.read_msd(root)]
    for cid in split["pool"]:
        break_label(root, ids.index(cid), "value")
    with pytest.raises(SystemExit, match="case phantom_.*labelsTr/phantom_.*label value 7"):
        al_loop.main(tiny_args(root, tmp_path / "run", "--strategy", "rand"))
    assert not list((tmp_path / "run").glob("**/*.pt")) and not run_folder.state_file(tmp_path / "run", 0, "rand").exists()


# ------------------------------------------------------------------------------------ options and user mistakes


@pytest.mark.parametrize("flag, value, message", [
    ("--tau", "0", "--tau 0.0: must lie in \\(0, 1\\]"), ("--tau", "1.5", "--tau"),
    ("--overlap", "1", "--overlap 1.0: must lie in \\[0, 1\\)"), ("--lr", "0", "--lr 0.0: must be > 0"),
    ("--mc-passes", "1", "--mc-passes 1: must be at least 2"), ("--batch-size", "0", "--batch-size 0"),
    ("--steps", "0", "--steps 0"), ("--iterations", "0", "--iterations 0"), ("--k", "0", "--k 0"),
    ("--dropout", "1", "--dropout 1.0: must lie in \\[0, 1\\)"), ("--hu-band", "150,100", "--hu-band 150,100"),
    ("--hu-band", "x", "--hu-band x"), ("--window-hu", "100,-20", "--window-hu 100,-20"),
    ("--spacing-mm", "1.5,0,2", "--spacing-mm 1.5,0,2: three numbers > 0"),
    ("--spacing-mm", "1.5,2", "--spacing-mm"), ("--patch-vox", "20,20,20", "multiple of 16"),
    ("--device", "tpu", "--device tpu"), ("--lr-decay", "linear", "--lr-decay linear"),
])
def test_bad_option_is_named_before_any_work(tmp_path, flag, value, message):
    args = ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), flag, value]
    with pytest.raises(SystemExit, match=message):
        al_loop.main(args)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_message(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda: this PyTorch sees no CUDA device"):
        al_loop.main(["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cuda"])


def test_several_bad_options_are_listed_together(tmp_path):
    with pytest.raises(SystemExit, match="invalid options:\n  --lr -1.0: must be > 0\n  --tau 2.0: must lie in"):
        al_loop.main(["--tau", "2", "--lr", "-1", "--out", str(tmp_path / "run")])


def user_mistakes(root, tmp_path):
    """(name, how to make it, expected message) for mistakes a user can make with the data or --out."""
    def empty(r):
        (r / "imagesTr").mkdir(parents=True)

    def bad_json(r):
        shutil.copytree(root, r)
        (r / "dataset.json").write_text("{not json")

    def no_labels(r):
        shutil.copytree(root, r)
        info = json.loads((r / "dataset.json").read_text())
        del info["labels"]
        (r / "dataset.json").write_text(json.dumps(info))

    def missing_file(r):
        shutil.copytree(root, r)
        (r / "imagesTr" / "phantom_3.nii.gz").unlink()

    def single_case(r):
        shutil.copytree(root, r)
        info = json.loads((r / "dataset.json").read_text())
        info["training"] = info["training"][:1]
        (r / "dataset.json").write_text(json.dumps(info))

    return [(empty, "no .nii.gz or .nii images"), (bad_json, "dataset.json: not valid JSON"),
            (no_labels, "'labels' must map class numbers"), (missing_file, "phantom_3.nii.gz: listed in"),
            (single_case, "1 case; active learning needs at least 2 cases")]


@pytest.mark.parametrize("index", range(5))
def test_user_mistakes_print_without_a_traceback(phantom, tmp_path, index):
    make, message = user_mistakes(phantom, tmp_path)[index]
    make(tmp_path / "data")
    with pytest.raises(SystemExit, match=message):   # SystemExit: printed as a message, no traceback
        al_loop.main(tiny_args(tmp_path / "data", tmp_path / "run"))


def test_out_that_is_a_file(phantom, tmp_path):
    (tmp_path / "run").write_text("my notes")
    with pytest.raises(SystemExit, match="--out .*run: is a file"):
        al_loop.main(tiny_args(phantom, tmp_path / "run"))
    assert (tmp_path / "run").read_text() == "my notes"


def test_user_mistake_from_the_command_line_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "al_loop.py"), "--data", str(tmp_path), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "imagesTr" in proc.stderr
