"""User mistakes and a broken environment: bad requests, missing or wrong folders, --out in the data folder, a cache
that cannot be written; each stops before the long work with a message (no traceback). CPU, tiny phantoms."""
import errno
import json
import re
import shutil
import subprocess
import sys

import pytest

import al_loop
import data
import tiny
import folders
from tiny import REPO, copy_data, snapshot, tiny_args


@pytest.mark.parametrize("extra, message", [
    (("--strategy", "rand,nope"), "unknown nope"),
    (("--k", "50"), "--n-val 2 leaves 8 pool cases of 10, but --k 50 x --iterations 2 needs 100"),
    (("--patch-vox", "20,20,20"), "positive multiple of 16"),
])
def test_bad_requests_fail_before_work(phantom, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        al_loop.main(tiny.args(phantom, tmp_path / "run", *extra))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_folder_says_where(tmp_path):
    with pytest.raises(SystemExit, match="medicaldecathlon"):
        al_loop.main(["--data", "MSD_Task03", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])


def test_one_class_task_is_refused(phantom, tmp_path):
    root = tmp_path / "one"
    shutil.copytree(phantom, root)
    info = json.loads((root / "dataset.json").read_text())
    info["labels"] = {"0": "background"}
    (root / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit,
                       match=r"dataset.json: 'labels' must number the classes 0\.\.C-1 with C >= 2 .*got \[0\]"):
        al_loop.main(tiny.args(root, tmp_path / "run"))

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
    assert [r["n_labeled"] for r in tiny.read_states(out)["0"]["rand"]["iterations"]] == [2, 4]

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
