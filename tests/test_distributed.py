"""A study on several ranks (torchrun, gloo on the CPU) gives the results of one rank; the shared queue hands
each unit to exactly one rank; a killed worker is restarted and the study ends as an uninterrupted one would;
a failing rank stops the others with a message naming it and its unit. Tiny phantoms, seconds each."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

import al_loop
import study
import strategies
import data
import tiny
from world import World

REPO = Path(__file__).resolve().parents[1]
STUDY = ("--strategy", "rand,proxyrank,var_semi", "--seeds", "0,1")


def torchrun(args, nproc=2, restarts=0):
    """Start `torchrun --standalone al_loop.py args` (one thread per rank); returns the Popen."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", "--monitor-interval=0.2", str(REPO / "al_loop.py"), *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def results(out):
    states = study.read_states(out)
    return {(seed, s): (st["labeled"], [r["mean_dice"] for r in st["iterations"]])
            for seed, by_s in states.items() for s, st in by_s.items()}


@pytest.fixture(scope="module")
def one_rank(phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    assert al_loop.main(tiny.args(phantom, out, *STUDY)) == 0
    return out


def test_two_ranks_give_the_results_and_reports_of_one(phantom, one_rank, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(tiny.args(phantom, out, *STUDY))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert "[rank 1 " in log and "[rank 0 " in log and "active iterations done, ETA" in log
    assert results(out) == results(one_rank)
    assert len(results(out)) == 6
    for name in ("results.csv", "per_case_dice.csv", "summary.md"):
        assert (out / name).read_text() == (one_rank / name).read_text(), name
    for seed in (0, 1):       # the pool's scores under each proxy, one file per case, equal to one rank's
        for f in (one_rank / "scores" / f"seed{seed}").iterdir():
            assert (out / "scores" / f"seed{seed}" / f.name).read_text() == f.read_text()


def _claim_all(rank, port, n, found):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    world = World()
    mine = []
    while (i := world.claim()) < n:
        mine.append(i)
        time.sleep(0.001 * (rank + 1))
    world.add("finished")
    while world.add("finished", 0) < 2:     # rank 0 hosts the store: it leaves last
        time.sleep(0.01)
    found[rank] = mine
    world.close()


def test_queue_hands_every_unit_to_exactly_one_rank(phantom, tmp_path):
    s = study.Study(al_loop.parse_args(tiny.args(phantom, tmp_path / "run", *STUDY))[0])
    units = al_loop.plan(s, strategies.choose("rand,proxyrank,var_semi"))
    scored = [(seed, c) for kind, seed, c in units if kind == "score"]
    assert sorted(scored) == sorted((seed, c) for seed in (0, 1) for c in s.pool)   # each pool case once
    assert units[:2] == [("proxy", 0, None), ("proxy", 1, None)]
    assert [str(u[2]) for u in units if u[0] == "run"][:2] == ["var_semi", "var_semi"]      # the costliest first
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    found = mp.Manager().dict()
    mp.spawn(_claim_all, args=(port, len(units), found), nprocs=2)
    assert sorted(found[0] + found[1]) == list(range(len(units))) and found[0] and found[1]


def test_killed_worker_is_restarted_and_the_study_ends_the_same(phantom, one_rank, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(tiny.args(phantom, out, *STUDY), restarts=3)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("state/*.json"))) < 1:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "no worker process found"
    os.kill(int(workers[-1]), signal.SIGKILL)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert "TORCHELASTIC_RESTART_COUNT=1" in log or "restart" in log.lower(), log[-3000:]
    assert results(out) == results(one_rank)
    assert (out / "results.csv").read_text() == (one_rank / "results.csv").read_text()


def test_a_failing_rank_stops_the_others_naming_rank_and_unit(phantom, tmp_path):
    root = tmp_path / "data"
    import shutil
    shutil.copytree(phantom, root)
    ids = [c["id"] for c in data.read_msd(root)]
    pool = data.split_cases(ids, 2, 0, None)["pool"]
    import nibabel as nib
    for case in data.read_msd(root):            # every pool label has a class the task lacks
        if case["id"] in pool:
            img = nib.load(case["label"])
            label = np.asarray(img.dataobj).astype(np.uint8)
            label[label > 0] = 7
            nib.save(nib.Nifti1Image(label, img.affine), case["label"])
    t0 = time.time()
    proc = torchrun(tiny.args(root, tmp_path / "run", *STUDY))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert "failed in unit run seed" in log and "label value 7" in log
    assert time.time() - t0 < 120


def test_annotation_mode_refuses_a_world_of_two(phantom, tmp_path):
    root = tmp_path / "mine"
    import shutil
    shutil.copytree(phantom, root)
    for case in data.read_msd(root)[3:]:
        os.remove(case["label"])
    proc = torchrun(tiny.args(root, tmp_path / "run", "--strategy", "proxyrank_var_semi"))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "annotation mode (pool cases without labels) runs as one process" in log


def test_report_merges_the_state_files_of_a_run(one_rank, tmp_path):
    (one_rank / "results.csv").rename(tmp_path / "results.csv")
    assert al_loop.main(["--out", str(one_rank), "--report"]) == 0
    assert (one_rank / "results.csv").read_text() == (tmp_path / "results.csv").read_text()
