"""The MONAI Label app (monailabel_app/) through a real MONAI Label server's HTTP API: "Next Sample" answers with
the command line's own ranking (its rank 1, 2, 3 with the same seed and settings), skips what is labeled or was
served, ranks by a model fine-tuned from the proxy once labels exist and trains it again when they change; a bad
--conf value stops the server with the command line's message. The server listens on a free localhost port and is
stopped (its process group) at the end, even on failure. CPU, six tiny phantoms.

MONAI Label needs numpy < 2 (through numpymaxflow), so it may live in a Python of its own: PROXY_AL_MONAILABEL_PYTHON
names it (.ci/run makes one), else this Python. The command line's reference runs on that same Python. Without
monailabel there, the server tests skip."""
import csv
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import al_loop
import strategies
from monailabel_app import pool
from phantom import make_phantom_dataset

REPO = Path(__file__).resolve().parents[1]
PYTHON = os.environ.get("PROXY_AL_MONAILABEL_PYTHON") or sys.executable


def has_monailabel(python):
    find = "import importlib.util as u, sys; sys.exit(not u.find_spec('monailabel'))"
    try:
        return subprocess.run([python, "-c", find], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):        # no such Python
        return False


HAS_MONAILABEL = has_monailabel(PYTHON)
needs_monailabel = pytest.mark.skipif(not HAS_MONAILABEL, reason=(
    f"monailabel is not installed for {PYTHON}: pip install torch==2.13.0 -r requirements-monailabel.txt, or set "
    "PROXY_AL_MONAILABEL_PYTHON to a Python that has it (.ci/run does)"))
# tests/tiny.py's study, as --conf: 16^3 patches and windows at 6 mm, a U-Net of channels 2, 4, 8, m = 2
TINY = {"spacing_mm": "6.0,6.0,6.0", "patch_vox": "16,16,16", "roi_vox": "16,16,16", "steps": "2", "proxy_epochs": "2",
        "proxy_val_every": "1", "proxy_patches_per_case": "1", "mc_passes": "2", "channels": "2,4,8", "workers": "0",
        "seeds": "0"}
START_S = 300            # bound on a server's start (imports: about 15 s idle; a busy 2-core machine is slower)
CALL_S = 300             # bound on one call (the first waits for the proxy's training)


def flags(conf):
    return [a for k, v in conf.items() for a in (f"--{k.replace('_', '-')}", v)]


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Six phantom scans as MONAI Label keeps them (a flat folder `scans`, no label), and the same scans as the
    command line's data folder (`cli/scans/imagesTr`, the same folder name: the task's name), the labels apart."""
    root = tmp_path_factory.mktemp("monailabel")
    phantom = make_phantom_dataset(root / "phantom", 6, seed=3, shape_vox=(24, 24, 16), spacing_mm=(5.0, 5.0, 6.0))
    for folder in (root / "scans", root / "cli" / "scans" / "imagesTr"):
        folder.mkdir(parents=True)
        for image in (phantom / "imagesTr").glob("*.nii.gz"):
            shutil.copy(image, folder)
    return root


def command_line_ranks(root, k):
    """The first k ids of the command line's proxyrank in annotation mode (to_annotate.csv), same settings."""
    out = root / "cli-run"
    argv = ["--data", str(root / "cli" / "scans"), "--out", str(out), "--cache-dir", str(root / "cli-cache"),
            "--strategy", "proxyrank", "--k", str(k), "--iterations", "1", *flags(TINY)]
    done = subprocess.run([PYTHON, "al_loop.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=CALL_S)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(out / "to_annotate.csv") as f:
        return [r["case"] for r in sorted(csv.DictReader(f), key=lambda r: int(r["rank"]))]

# ----------------------------------------------------------------------------- the server and its HTTP API


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(studies, conf, log):
    """`monailabel start_server` (python -m monailabel.main, as the monailabel script runs it) on the repository's
    app and `studies`, output to `log`; yields (process, base URL) and stops its process group whatever happens."""
    port = free_port()
    argv = [PYTHON, "-m", "monailabel.main", "start_server", "--app", str(REPO / "monailabel_app"), "--studies",
            str(studies), "--host", "127.0.0.1", "--port", str(port)]
    argv += [a for k, v in conf.items() for a in ("--conf", k, v)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def stop(proc):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def wait_up(proc, url, log):
    """Poll GET /info/ until it answers, the server exits (its log in the failure) or START_S pass."""
    deadline = time.time() + START_S
    while time.time() < deadline:
        try:
            return call(url + "/info/", timeout_s=10)
        except (urllib.error.URLError, ConnectionError):
            try:
                proc.wait(timeout=0.5)          # wakes at once if the server has died
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"the server exited ({proc.returncode}) before answering:\n{log.read_text()[-4000:]}")
    pytest.fail(f"the server did not answer GET /info/ within {START_S} s:\n{log.read_text()[-4000:]}")


def call(url, data=None, method="GET", headers=None, timeout_s=CALL_S):
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:
        return json.loads(answer.read() or b"{}")


def next_sample(url, strategy):
    """POST /activelearning/<strategy>, what Slicer's "Next Sample" sends: the image id it answers (or None)."""
    return call(f"{url}/activelearning/{strategy}", b"{}", "POST", {"Content-Type": "application/json"}).get("id")


def save_label(url, image, path):
    """PUT /datastore/label?image=<id> with the label file as multipart field `label`, as Slicer's "Submit Label"."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"; filename=\"{image}.nii.gz\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + Path(path).read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    call(f"{url}/datastore/label?image={image}", body, "PUT",
         {"Content-Type": f"multipart/form-data; boundary={boundary}"})

# ----------------------------------------------------------------------------- the tests


@needs_monailabel
def test_next_sample_is_the_command_lines_ranking_then_the_fine_tuned_models(scans, tmp_path):
    ranks = command_line_ranks(scans, 3)
    log = tmp_path / "server.log"
    labels = scans / "phantom" / "labelsTr"
    with server(scans / "scans", {**TINY, "labels": "liver,tumour"}, log) as (proc, url):
        wait_up(proc, url, log)
        assert set(call(url + "/info/")["strategies"]) == {"proxyrank", "proxyrank_var", "random"}
        first, second = next_sample(url, "proxyrank"), next_sample(url, "proxyrank")   # the first: served
        assert [first, second] == ranks[:2]
        save_label(url, first, labels / f"{first}.nii.gz")
        assert next_sample(url, "proxyrank") == ranks[2]            # the first labeled, the second served
        picked = [next_sample(url, "proxyrank_var") for _ in range(2)]
        assert None not in picked and len(set(picked + ranks)) == 5   # none labeled or served before
        save_label(url, picked[0], labels / f"{picked[0]}.nii.gz")
        last = next_sample(url, "proxyrank_var")
        assert last is not None and last not in picked + ranks
        assert next_sample(url, "proxyrank_var") is None             # every image labeled or served
    text = log.read_text()
    assert text.count("seed 0: proxy model on pseudo labels") == 1               # trained once, then its files
    assert text.count("a set no model was trained on") == 2                      # a model per labeled set
    assert text.count("the model of these 1 labeled images is trained") == 1     # the second call of that set
    run = next((scans / "scans" / ".proxy-al" / "runs").iterdir())
    assert len(list((run / "checkpoints" / "seed0").glob("labeled-*/iter0_sup.pt"))) == 2


@needs_monailabel
def test_a_bad_conf_value_stops_the_server_with_the_command_lines_message(scans, tmp_path):
    with pytest.raises(SystemExit) as stop:
        al_loop.main(["--data", str(scans / "cli" / "scans"), "--mc-passes", "1", "--dropout", "1.5"])
    expected = str(stop.value.code)
    assert expected.startswith("invalid options:") and "--mc-passes 1:" in expected and "--dropout 1.5:" in expected
    log = tmp_path / "server.log"
    with server(scans / "scans", {"mc_passes": "1", "dropout": "1.5"}, log) as (proc, url):
        assert proc.wait(timeout=START_S) == 1
    said = log.read_text()
    assert said.endswith(f"proxy-al: bad --conf\n{expected}\n") and "Traceback" not in said


def test_conf_is_read_by_the_command_lines_parser_and_checks(tmp_path, capsys):
    """No server: pool.settings, which the app calls at start, against al_loop's own parsing and messages."""
    studies = tmp_path / "scans"
    got = pool.settings({**TINY, "labels": "liver,tumour", "window-hu": "-21,189"}, studies)
    cfg, _ = al_loop.parse_args(flags(TINY) + ["--window-hu", "-21,189", "--data", str(studies / ".proxy-al" / "data")])
    assert got.cfg == dataclasses.replace(cfg, cache_dir=str(studies / ".proxy-al" / "cache"))
    assert got.cfg.preset == "paper" and got.labels == ("liver", "tumour") and got.served_timeout_s == 86400
    with pytest.raises(SystemExit):
        al_loop.main(["--steps", "x"])
    parser_says = capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(pool.ProxyAlError) as bad:
        pool.settings({"steps": "x"}, studies)
    assert parser_says.endswith(": " + str(bad.value)) and "--steps 'x'" in str(bad.value)
    for conf, names in (({"k": "3"}, "--conf k: a call serves one image"), ({"labels": "liver,,x"}, "--conf labels"),
                        ({"served_timeout_s": "soon"}, "--conf served_timeout_s")):
        with pytest.raises(pool.ProxyAlError, match=names):
            pool.settings(conf, studies)


def test_a_label_with_a_class_the_app_does_not_name_is_refused_naming_the_file_and_the_conf(scans, tmp_path):
    """No server: pool.Pool as the strategies call it. A label with a tumour (2) where --conf labels names one class
    stops the fine-tuning with the project's message on the file, and the app's hint on --conf labels."""
    conf = {**TINY, "labels": "liver", "run_dir": str(tmp_path / "run")}
    images = {p.name[:-len(".nii.gz")]: str(p) for p in (scans / "scans").glob("*.nii.gz")}
    label = next(p for p in sorted((scans / "phantom" / "labelsTr").glob("*.nii.gz"))
                 if np.asarray(nib.load(p).dataobj).max() == 2)
    ranker = pool.Pool(pool.settings(conf, scans / "scans"), "scans")
    assert len(ranker.ranking(strategies.parse("proxyrank_var"), images, {})) == len(images)   # the proxy's
    with pytest.raises(pool.ProxyAlError) as refused:
        ranker.ranking(strategies.parse("proxyrank_var"), images, {label.name[:-len(".nii.gz")]: str(label)})
    said = str(refused.value)
    assert f"{label}: label value 2" in said and "0 background, 1 liver (--conf labels)" in said


def test_proxyrank_var_after_a_label_ranks_the_other_images_under_the_fine_tuned_model(scans, tmp_path):
    """No server, so the main suite runs it without monailabel: pool.Pool as proxyrank_var calls it once a label is
    saved (lines 7 and 15). The labeled image is not ranked, every other one is, and a second call with the same
    labels reads the saved scores instead of training again."""
    conf = {**TINY, "labels": "liver,tumour", "run_dir": str(tmp_path / "run")}
    images = {p.name[:-len(".nii.gz")]: str(p) for p in (scans / "scans").glob("*.nii.gz")}
    first = sorted(images)[0]
    labeled = {first: str(scans / "phantom" / "labelsTr" / f"{first}.nii.gz")}
    ranker = pool.Pool(pool.settings(conf, scans / "scans"), "scans")
    ranked = ranker.ranking(strategies.parse("proxyrank_var"), images, labeled)
    assert sorted(c for c, _ in ranked) == sorted(set(images) - {first})
    assert all(s >= 0 for _, s in ranked) and [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    saved = list((tmp_path / "run").rglob("labeled/seed*_*.json"))
    assert len(saved) == 1
    assert ranker.ranking(strategies.parse("proxyrank_var"), images, labeled) == ranked
