"""Resume: a run stopped anywhere (killed, SIGTERM, an exception between stages, a full disk) continues to the
results of an uninterrupted run; state that cannot contradict itself, corrupt or truncated run files named and
redone, more iterations or another --k on a finished run. CPU, tiny phantoms."""
import errno
import io
import json
import os
from pathlib import Path
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import al_loop
import run_folder
import tiny
from tiny import REPO, run, same_results, states_of, tiny_args


def test_resume_after_stop_between_stages(phantom, reference, tmp_path, monkeypatch):
    args = ("--strategy", "proxyrank_var_semi,rand")
    reference = reference[1]         # the uninterrupted run: these strategies (in another order: the same results)
    real_semi = al_loop.semi_finetune
    calls = []

    def dying_semi(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # second iteration, after its supervised stage was saved
            raise KeyboardInterrupt
        return real_semi(*a, **kw)

    monkeypatch.setattr(al_loop, "semi_finetune", dying_semi)
    with pytest.raises(KeyboardInterrupt):
        run(phantom, tmp_path / "cut", *args)
    monkeypatch.setattr(al_loop, "semi_finetune", real_semi)
    resumed = run(phantom, tmp_path / "cut", *args)
    for name in ("proxyrank_var_semi", "rand"):      # NaN: a class absent from every validation label
        assert resumed["0"][name]["labeled"] == reference["0"][name]["labeled"]
        assert resumed["0"][name]["iterations"][-1]["dice"] == pytest.approx(
            reference["0"][name]["iterations"][-1]["dice"], nan_ok=True)


def test_k_changed_after_a_run_cut_back_never_labels_a_case_twice(phantom, tmp_path):
    """A run of --k 2 cut back to its first iteration, rerun with --k 3: Tl holds 4 distinct cases, as before."""
    out = tmp_path / "run"
    run(phantom, out, "--strategy", "rand")
    path = run_folder.state_file(out, 0, "rand")
    st = json.loads(path.read_text())
    before = st["labeled"]
    st["iterations"] = st["iterations"][:1]
    path.write_text(json.dumps(st))
    run(phantom, out, "--strategy", "rand", "--k", "3")
    st = states_of(out)["rand"]
    assert st["labeled"] == before and [r["n_labeled"] for r in st["iterations"]] == [2, 4]
    assert "n_labeled" in (out / "results.csv").read_text().splitlines()[0]
    assert [line.split(",")[3] for line in (out / "results.csv").read_text().splitlines()[1:]] == ["2", "4"]


def test_a_finished_run_given_more_iterations_acquires_first_as_an_uninterrupted_run(phantom, reference, tmp_path):
    """--iterations 1, then --iterations 2: the same Tl and Dice as one run of 2 iterations (the `reference`
    fixture: these strategies, 2 iterations; the acquisition after iteration 1 is made under its own final
    model); then --iterations 3 --k 3 acquires 3 more."""
    strategies_ = ("--strategy", "rand,proxyrank_var_semi")
    one = tmp_path / "one"
    run(phantom, one, *strategies_, "--iterations", "1")
    run(phantom, one, *strategies_, "--iterations", "2")
    for name in ("rand", "proxyrank_var_semi"):
        a, b = states_of(one)[name], reference[1]["0"][name]
        assert a["labeled"] == b["labeled"] and [r["n_labeled"] for r in a["iterations"]] == [2, 4], name
        assert [r["mean_dice"] for r in a["iterations"]] == pytest.approx([r["mean_dice"] for r in b["iterations"]],
                                                                          nan_ok=True)
    run(phantom, one, "--strategy", "rand", "--iterations", "3", "--k", "3")
    assert [r["n_labeled"] for r in states_of(one)["rand"]["iterations"]] == [2, 4, 7]

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

# ------------------------------------------------------------------------------------ 14. SIGTERM


def sigterm_after_the_first_state_file(phantom, out, log):
    """Runs the tiny study in a subprocess, sends SIGTERM once its first state file exists; its exit code."""
    with open(log, "w") as stdout:
        proc = subprocess.Popen([sys.executable, str(REPO / "al_loop.py"), *tiny_args(phantom, out)], cwd=out.parent,
                                stdout=stdout, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 300        # a safety net only: the test waits for the state file
            while not list(out.glob("state/seed0_*.json")):
                assert proc.poll() is None, f"the run ended before its first state file:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no state file after 300 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sigterm_ends_with_a_message_and_a_rerun_continues(phantom, reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "stdout.txt"
    # On a loaded machine this test may wake only after the tiny run (about 4 s past its first state file) has
    # ended unsignalled (seen once in .ci/run beside a study): then it runs again. One that ignores SIGTERM fails.
    for _ in range(3):
        code = sigterm_after_the_first_state_file(phantom, out, log)
        if code or "SIGTERM" in log.read_text():
            break
        shutil.rmtree(out)
    assert code == 128 + signal.SIGTERM, log.read_text()[-3000:]
    text = log.read_text()
    assert "done: results.csv" not in text                              # the fault: it stopped before the end
    assert "SIGTERM: stopped during" in text and f"Every finished stage is saved in {out}; rerun the same command " \
                                                  "to continue from there." in text, text[-3000:]
    assert "Traceback" not in text
    same_results(run(phantom, out), reference[1])


def copy_run(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out, ignore=shutil.ignore_patterns(".lock"))
    return out


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


def test_a_refused_rerun_keeps_the_marker_it_found(phantom, reference, tmp_path):
    """A run folder without config.json (lost, or made by hand): a refused rerun removes only what it wrote,
    so the folder is still known as a run folder when the cause is fixed."""
    out = copy_run(reference, tmp_path)
    split = (out / "split.json").read_text()
    (out / "split.json").unlink()
    (out / "config.json").unlink()
    assert (out / run_folder.MARKER).is_file()
    with pytest.raises(SystemExit, match="split.json: missing, but this run has finished work"):
        al_loop.main(tiny_args(phantom, out))
    assert (out / run_folder.MARKER).is_file()                        # before: removed, and the folder refused
    (out / "split.json").write_text(split)
    same_results(run(phantom, out), reference[1])


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


# A run whose n-th rename onto a file named TARGET stops there, its temporary file complete, until it is killed.
HELD_RUN = """import os, sys
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
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) as proc:
        safety = threading.Timer(300, proc.kill)    # only against a hang: the test waits for the line below
        safety.start()
        try:
            log = []
            while (line := proc.stdout.readline()) and not line.startswith("held before the rename onto"):
                log.append(line)
            held = Path(line.split(" onto ", 1)[1].strip()) if line else None
            states = tiny.read_states(out)          # what the run had finished when it was killed
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


def test_a_rerun_asking_fewer_iterations_than_some_runs_have_counts_only_the_work_left(phantom, reference, tmp_path,
                                                                                        capsys):
    """The study's progress line counts the iterations still to run: a (seed, strategy) that already has more
    than --iterations asks for adds none (it once subtracted them: "1/-1 active iterations done", ETA < 0)."""
    out = copy_run(reference, tmp_path)                                # rand, proxyrank_var_semi: 2 each
    capsys.readouterr()
    run(phantom, out, "--strategy", "rand,proxyrank_var_semi,proxyrank", "--iterations", "1")
    assert "study: 1/1 active iterations done, ETA 0:00" in capsys.readouterr().out
    assert [r["n_labeled"] for r in states_of(out)["proxyrank"]["iterations"]] == [2]
