"""run_folder.py: which folder is a run folder (and --out on a user's folder is refused), one writer per run folder,
settings of the saved stages kept across reruns, saved arrays keyed by what made them. CPU, tiny phantoms."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import al_loop
import run_folder
import tiny
from tiny import REPO, run, snapshot, tiny_args


# ------------------------------------------------------------------------------------ one writer per folder


def test_second_process_on_a_run_folder_stops_naming_the_holder(phantom, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import run_folder\n"
            f"with run_folder.locked({str(out)!r}):\n    print('locked', flush=True); sys.stdin.readline()")
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as holder:     # closes its pipes when done
        try:
            assert holder.stdout.readline().strip() == "locked"
            in_use = f"{out}: run folder in use by another proxy-al process \\(pid {holder.pid}\\)"
            with pytest.raises(SystemExit, match=in_use):
                al_loop.main(tiny_args(phantom, out))
        finally:
            holder.send_signal(signal.SIGKILL)      # the OS drops a dead process's lock
            holder.wait()
    with run_folder.locked(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())


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
