"""world.py (torchrun): a study on several ranks (gloo on the CPU) gives the results of one rank; the shared queue hands
each unit to exactly one rank; a killed worker is restarted and the study ends as an uninterrupted one would;
a failing rank stops the others with a message naming it and its unit; a killed torchrun stops its workers
with one line each. Tiny phantoms, seconds each."""
import ctypes
from datetime import timedelta
import os
from pathlib import Path
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch
import torch.multiprocessing as mp

import al_loop
import study
import strategies
import tiny
from world import World
import folders
import run_folder
from tiny import same_results, tiny_args


REPO = Path(__file__).resolve().parents[1]
STUDY = ("--strategy", "rand,proxyrank,var_semi", "--seeds", "0,1")
SEED0 = STUDY[:2] + ("--seeds", "0")    # stages are seeded per seed: its results are one_rank's seed 0 results
SAFETY_S = 300      # only against a hang: every wait below ends on an event (a line, an exit, a store key)


def torchrun(args, nproc=2, restarts=0):
    """Start `torchrun --standalone al_loop.py args` (one thread per rank) in a session of its own (so that a
    hung run can be stopped with its workers); returns the Popen, stdout and stderr merged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", "--monitor-interval=0.2", str(REPO / "al_loop.py"), *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def finish(proc, log=""):
    """The rest of torchrun's output once it exits; a run still going after SAFETY_S is stopped and fails."""
    try:
        return log + proc.communicate(timeout=SAFETY_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"torchrun still running after {SAFETY_S} s; output:\n" + (log + proc.communicate()[0])[-3000:])


def results(out):
    states = tiny.read_states(out)
    return {(seed, s): (st["labeled"], [r["mean_dice"] for r in st["iterations"]])
            for seed, by_s in states.items() for s, st in by_s.items()}


def same_as_seed0_of(one_rank, out):
    """`out`, a SEED0 study, has one_rank's seed 0 states and results.csv rows."""
    same_results(tiny.read_states(out), {"0": tiny.read_states(one_rank)["0"]}, exact=True)
    header, *rows = (one_rank / "results.csv").read_text().splitlines(keepends=True)
    assert (out / "results.csv").read_text() == header + "".join(r for r in rows if r.split(",")[1] == "0")


@pytest.fixture(scope="module")
def one_rank(phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    assert al_loop.main(tiny.args(phantom, out, *STUDY)) == 0
    return out


def test_two_ranks_give_the_results_and_reports_of_one(phantom, one_rank, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(tiny.args(phantom, out, *STUDY))
    log = finish(proc)
    assert proc.returncode == 0, log
    assert "[rank 1 " in log and "[rank 0 " in log and "active iterations done, ETA" in log
    same_results(tiny.read_states(out), tiny.read_states(one_rank), exact=True)
    assert len(results(out)) == 6
    for name in ("results.csv", "per_case_dice.csv", "summary.md"):
        assert tiny.results_text(out / name) == tiny.results_text(one_rank / name), name
    for seed in (0, 1):       # the pool's scores under each proxy, one file per case, equal to one rank's
        for f in (one_rank / "scores" / f"seed{seed}").iterdir():
            assert (out / "scores" / f"seed{seed}" / f.name).read_text() == f.read_text()


def _wait_for_key(world, key, what):
    """Block until another rank sets `key` in the group's store (SAFETY_S only against a hang)."""
    try:
        world.store.wait([key], timedelta(seconds=SAFETY_S))
    except Exception as err:
        raise AssertionError(f"rank {world.rank}: {what} did not happen within {SAFETY_S} s ({err})") from err


def _claim_all(rank, port, n, found):
    """Claim units until the queue is empty. Each rank takes its first unit before either takes a second (so
    both take part, whatever the scheduler does), then the two claim the rest concurrently."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    world = World()
    mine = [world.claim()]
    world.store.set(f"claimed a unit {rank}", "1")
    _wait_for_key(world, f"claimed a unit {1 - rank}", "the other rank's first claim")
    while (i := world.claim()) < n:
        mine.append(i)
    found[rank] = mine
    world.store.set(f"done {rank}", "1")
    if rank == 0:                               # rank 0 hosts the store: it leaves last
        _wait_for_key(world, "done 1", "rank 1's end")
    world.close()


def test_queue_hands_every_unit_to_exactly_one_rank(phantom, tmp_path):
    s = study.open_study(al_loop.parse_args(tiny.args(phantom, tmp_path / "run", *STUDY))[0])[0]
    units = study.plan(s, strategies.choose("rand,proxyrank,var_semi"))
    scored = [(seed, c) for kind, seed, c in units if kind == "score"]
    assert sorted(scored) == sorted((seed, c) for seed in (0, 1) for c in s.cases.pool)   # each pool case once
    assert units[:2] == [("proxy", 0, None), ("proxy", 1, None)]
    assert [str(u[2]) for u in units if u[0] == "run"][:2] == ["var_semi", "var_semi"]      # the costliest first
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    found = mp.Manager().dict()
    mp.spawn(_claim_all, args=(port, len(units), found), nprocs=2)
    assert sorted(found[0] + found[1]) == list(range(len(units))) and found[0] and found[1]


def _share(rank, port, found):
    """Rank 0 computes the shared stage "x"; rank 1's unit A needs it, so rank 1 runs B first, then waits for x."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    world = World()
    if rank == 0:
        found["rank 0 computes"] = world.shared("x", lambda: None, print) is None
        world.store.set("x claimed", "1")
        _wait_for_key(world, "B ran", "rank 1's other unit")         # while x is in flight on this rank
        world.computed("x")
        _wait_for_key(world, "done 1", "rank 1's end")
    else:
        _wait_for_key(world, "x claimed", "rank 0's claim of x")
        order, log = [], []
        x = lambda: "x's weights" if world.store.check(["stage/x/done"]) else None

        def run(kind, seed, what):
            order.append(what)
            if what == "A":
                order.append(world.shared("x", x, log.append))
            else:
                world.store.set("B ran", "1")
        world.work([("run", 0, "A"), ("run", 0, "B")], run, log.append)
        found["order"], found["log"] = order, log
        world.store.set("done 1", "1")
    world.close()


def test_a_stage_in_flight_on_another_rank_is_waited_for_not_computed_again(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    found = mp.Manager().dict()
    mp.spawn(_share, args=(port, found), nprocs=2)
    assert found["rank 0 computes"]
    assert found["order"] == ["A", "B", "A", "x's weights"]        # A went to the back; then it took x as saved
    assert any("unit run seed 0 A: its stage is computed on rank 0; it runs later" in line for line in found["log"])


def test_a_world_of_one_computes_a_shared_stage_itself():
    world = World()
    assert world.store is None
    assert world.shared("x", lambda: None, print) is None and world.shared("y", lambda: "saved", print) == "saved"
    world.computed("x")                                                      # nothing to tell


def test_killed_worker_is_restarted_and_the_study_ends_the_same(phantom, one_rank, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(tiny.args(phantom, out, *SEED0), restarts=3)
    safety = threading.Timer(SAFETY_S, os.killpg, (proc.pid, signal.SIGKILL))    # only against a hang
    safety.start()
    log = ""
    try:    # a rank logs "iteration 1/2: N labeled" right after the first state file is written
        while (line := proc.stdout.readline()) and not re.search(r"iteration 1/2: \d+ labeled", line):
            log += line
    finally:
        safety.cancel()
    assert line, "torchrun ended before any state file was written:\n" + log[-3000:]
    log += line
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, f"torchrun's workers: {workers}"
    at_kill = results(out)
    os.kill(int(workers[-1]), signal.SIGKILL)
    log = finish(proc, log)
    # the kill struck a live worker before the study ended, and torchrun started the group again
    assert sum(len(dice) for _, dice in at_kill.values()) < 3 * 2
    assert re.search(rf"failed \(exitcode: -9\) local_rank: \d \(pid: {workers[-1]}\)", log), log[-3000:]
    # each rank starts twice: its start line, not a SIGTERM line quoting it as what the rank was doing
    assert len(re.findall(r"^\[rank \d [\d:]+\] Phantom: 8 pool", log, re.M)) == 4, log[-3000:]
    assert proc.returncode == 0, log[-3000:]
    same_as_seed0_of(one_rank, out)


def adopt_orphans(on):
    """Make this process the one that inherits its descendants' orphans (Linux prctl PR_SET_CHILD_SUBREAPER), so
    that it can wait for torchrun's workers and read their exit status once torchrun is gone."""
    if ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0) != 0:
        pytest.skip(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")


def test_killed_torchrun_stops_its_workers_with_one_line_and_the_rerun_continues(phantom, one_rank, tmp_path):
    """SIGKILL of the torchrun agent (which holds the group's store): each worker stops with one line saying
    the launcher is gone and that a rerun continues, exit status 1, no traceback or C++ stack dump; the rerun
    of the same command ends as an uninterrupted study."""
    out = tmp_path / "run"
    adopt_orphans(True)
    try:
        proc = torchrun(tiny.args(phantom, out, *SEED0))
        safety = threading.Timer(SAFETY_S, os.killpg, (proc.pid, signal.SIGKILL))    # only against a hang
        safety.start()
        log = ""
        try:
            while (line := proc.stdout.readline()) and not re.search(r"iteration 1/2: \d+ labeled", line):
                log += line
            assert line, "torchrun ended before any state file was written:\n" + log[-3000:]
            workers = [int(w) for w in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                      text=True).stdout.split()]
            assert len(workers) == 2, f"torchrun's workers: {workers}"
            at_kill = results(out)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL                       # the agent is gone, its workers orphaned
            safety.cancel()
            safety = threading.Timer(SAFETY_S, lambda: [os.kill(w, signal.SIGKILL) for w in workers])
            safety.start()
            with proc.stdout:                                          # closed once read
                log = proc.stdout.read()                               # to EOF: every worker has exited
            status = [os.waitstatus_to_exitcode(os.waitpid(w, 0)[1]) for w in workers]
        finally:
            safety.cancel()
    finally:
        adopt_orphans(False)
    assert sum(len(dice) for _, dice in at_kill.values()) < 3 * 2    # the kill struck before the study ended
    assert status == [1, 1], log[-3000:]
    stops = [line for line in log.splitlines() if "stops: the group's launcher (torchrun)" in line]
    assert len(stops) == 2 and all("is gone" in s and "Rerun the same command" in s for s in stops), log[-3000:]
    assert "Traceback" not in log and "DistNetworkError" not in log and "frame #" not in log, log[-3000:]
    rerun = torchrun(tiny.args(phantom, out, *SEED0))
    log = finish(rerun)
    assert rerun.returncode == 0, log[-3000:]
    same_as_seed0_of(one_rank, out)


def test_a_failing_rank_stops_the_others_naming_rank_and_unit(phantom, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / run_folder.MARKER).touch()                                       # a run folder of the project's own
    (out / "scores").write_text("a file where the pool's score folders go")   # every score unit fails to write
    proc = torchrun(tiny.args(phantom, out, *SEED0))
    log = finish(proc)                          # every rank stops: torchrun exits (no rank waits on the others)
    assert proc.returncode != 0
    assert "failed in unit score seed" in log and "NotADirectoryError" in log
    assert not list(out.glob("state/*.json"))   # no run unit started after the failure


def test_annotation_mode_refuses_a_world_of_two(phantom, tmp_path):
    root = tmp_path / "mine"
    import shutil
    shutil.copytree(phantom, root)
    for case in folders.read_msd(root)[3:]:
        os.remove(case["label"])
    proc = torchrun(tiny.args(root, tmp_path / "run", "--strategy", "proxyrank_var_semi"))
    log = finish(proc)
    assert proc.returncode != 0 and "annotation mode (pool cases without labels) runs as one process" in log


def test_report_merges_the_state_files_of_a_run(one_rank, tmp_path):
    (one_rank / "results.csv").rename(tmp_path / "results.csv")
    assert al_loop.main(["--out", str(one_rank), "--report"]) == 0
    assert (one_rank / "results.csv").read_text() == (tmp_path / "results.csv").read_text()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this PyTorch has no torch.distributed")
def test_semi_strategy_with_every_pool_case_labeled_under_torchrun(phantom12, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(tiny_args(phantom12, out, "--n-val", "8"))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "[rank 1 " in log and "every pool case is labeled, so lines 9-11" in log, log[-3000:]
    st = tiny.read_states(out)["0"]["proxyrank_var_semi"]
    assert [r["n_labeled"] for r in st["iterations"]] == [2, 4] and st["iterations"][1]["certain"] == []


LAUNCHER_GONE = """import os, subprocess, sys, time
from datetime import timedelta
sys.path.insert(0, sys.argv[1])
import al_loop                  # as a torchrun worker imports it: LOCAL_RANK is set
import torch.distributed as dist
server = subprocess.Popen([sys.executable, "-c", "import datetime, sys, time, torch.distributed as d; "
                           "s = d.TCPStore('127.0.0.1', 0, None, True, timeout=datetime.timedelta(seconds=60), "
                           "wait_for_workers=False); "
                           "print(s.port, flush=True); sys.stdin.readline()"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
store = dist.TCPStore("127.0.0.1", int(server.stdout.readline()), None, False, timeout=timedelta(seconds=60))
store.add("x", 1)
server.kill()
server.wait()
try:
    store.add("x", 1)           # the launcher's store is gone: c10d warns in C++, then raises
except Exception as err:
    print("raised", type(err).__name__)
"""


def test_a_worker_reports_the_launchers_death_without_a_cpp_stack_trace():
    """c10d prints a C++ warning with a stack trace when a store read fails mid-answer (a launcher killed
    while a worker waits on it: seen once under load). A torchrun worker's al_loop turns C++ warnings off, so
    world.py's one line is all the user reads."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CPP_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", LAUNCHER_GONE, str(REPO)], capture_output=True, text=True,
                          env={**env, "LOCAL_RANK": "0"}, timeout=SAFETY_S)
    assert "raised DistNetworkError" in done.stdout, done.stdout + done.stderr
    assert "frame #" not in done.stderr and "TCPStore.cpp" not in done.stderr, done.stderr
