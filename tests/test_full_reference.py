"""The faithful reference end to end: the all-data reference `full`, the proxy's patch draw under the paper
preset, an nnU-Net raw folder in (the same results as its MSD twin, annotation mode when partly labeled) and
a run's selection out (--export-nnunet). CPU, tiny phantoms, seconds each."""
import csv
import json
import shutil

import numpy as np
import pytest

import al_loop
import data
import strategies
import study
import tiny
import folders
import run_folder

STRATEGIES = ("--strategy", "rand,proxyrank_var_semi,full")
NNUNET_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@pytest.fixture(autouse=True)
def no_nnunet_env(monkeypatch):
    """No nnU-Net folder leaks in from the shell: an export writes only where a test says."""
    for name in NNUNET_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def msd_run(phantom, tmp_path_factory):
    """A finished tiny study of rand, proxyrank_var_semi and the all-data reference on the MSD phantom."""
    out = tmp_path_factory.mktemp("msd") / "run"
    assert al_loop.main(tiny.args(phantom, out, *STRATEGIES)) == 0
    return out


def nnunet_copy(msd_root, dest, labeled=None):
    """The MSD folder as nnU-Net v2 raw data: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz (only the
    `labeled` ids, default all), dataset.json with channel_names, labels name -> int, file_ending, numTraining."""
    info = json.loads((msd_root / "dataset.json").read_text())
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    cases = folders.read_msd(msd_root)
    for case in cases:
        shutil.copy(case["image"], dest / "imagesTr" / f"{case['id']}_0000.nii.gz")
        if labeled is None or case["id"] in labeled:
            shutil.copy(case["label"], dest / "labelsTr" / f"{case['id']}.nii.gz")
    (dest / "dataset.json").write_text(json.dumps({
        "name": info["name"], "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": len(cases),
        "labels": {name: int(k) for k, name in info["labels"].items()}}))
    return dest


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))

# ------------------------------------------------------------------------------------ the all-data reference


def test_full_trains_once_on_the_whole_pool_and_is_reported_apart(msd_run):
    split = json.loads((msd_run / "split.json").read_text())
    st = run_folder.read_states(msd_run)["0"]["full"]
    assert len(st["iterations"]) == 1                                          # one iteration, no selection
    assert st["iterations"][0]["n_labeled"] == len(split["pool"]) == 8
    assert sorted(st["labeled"]) == sorted(split["pool"]) and "acquired" not in st["iterations"][0]
    assert np.isfinite(st["iterations"][0]["mean_dice"])
    full = [r for r in rows(msd_run / "results.csv") if r["strategy"] == "full"]
    assert [(r["iteration"], r["n_labeled"], r["pct_labeled"]) for r in full] == [("1", "8", "100.0")]
    summary = (msd_run / "summary.md").read_text()
    main, reference = summary.split("Reference (all pool cases labeled")
    assert "| full |" in reference and "| full |" not in main and "| rand |" in main
    assert "full (reference)" in summary                                       # in the Wilcoxon table
    pytest.importorskip("matplotlib")
    assert (msd_run / "dice_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_runs_only_when_named():
    assert "full" not in [s.name for s in strategies.choose("all")]
    assert "full" not in [s.name for s in strategies.choose("extended")]
    assert [s.name for s in strategies.choose("all,full")][-1] == "full"
    assert al_loop.PAPER.strategy == "all"

# ------------------------------------------------------------------------------------ the proxy's patches


class ProxyDrawn(Exception):
    """Raised in place of the proxy's training, once its arguments are seen."""


@pytest.mark.parametrize("extra, fg_fraction", [
    (("--preset", "paper"), None),                                             # the paper: random patches
    (("--preset", "paper", "--proxy-patches", "balanced", "--fg-fraction", "0.7"), 0.7),
    (("--preset", "demo"), 0.5)])                                             # the demo: balanced, as its comment says
def test_proxy_patch_draw_follows_the_preset(phantom, tmp_path, monkeypatch, extra, fg_fraction):
    seen = []

    def capture(*args, **kwargs):
        seen.append(kwargs)
        raise ProxyDrawn()

    monkeypatch.setattr(al_loop, "train_proxy", capture)
    with pytest.raises(ProxyDrawn):
        al_loop.main(tiny.args(phantom, tmp_path / "run", "--strategy", "proxyrank", *extra))
    assert len(seen) == 1 and seen[0]["fg_fraction"] == fg_fraction
    assert seen[0]["patch_vox"] == (16, 16, 32)                               # the tiny sizes still hold
    assert json.loads((tmp_path / "run" / "config.json").read_text())["preset"] == extra[1]

# ------------------------------------------------------------------------------------ nnU-Net raw data in


def test_nnunet_raw_copy_gives_the_results_of_the_msd_folder(phantom, msd_run, tmp_path):
    root = nnunet_copy(phantom, tmp_path / "Dataset009_Phantom")
    assert [c["id"] for c in folders.read_msd(root)] == [c["id"] for c in folders.read_msd(phantom)]
    assert all(c["image"].endswith("_0000.nii.gz") for c in folders.read_msd(root))      # read as nnU-Net's
    out = tmp_path / "run"
    assert al_loop.main(tiny.args(root, out, *STRATEGIES)) == 0
    assert json.loads((out / "split.json").read_text()) == json.loads((msd_run / "split.json").read_text())
    mine, theirs = run_folder.read_states(out)["0"], run_folder.read_states(msd_run)["0"]
    assert sorted(mine) == sorted(theirs) == ["full", "proxyrank_var_semi", "rand"]
    for name in theirs:
        assert mine[name]["labeled"] == theirs[name]["labeled"], name
        for a, b in zip(mine[name]["iterations"], theirs[name]["iterations"], strict=True):
            assert a["dice"] == pytest.approx(b["dice"], nan_ok=True), name
            assert sorted(a["per_case"]) == sorted(b["per_case"])
            for case in b["per_case"]:
                assert a["per_case"][case] == pytest.approx(b["per_case"][case], nan_ok=True), (name, case)
    for name in ("results.csv", "per_case_dice.csv"):
        assert (out / name).read_text() == (msd_run / name).read_text(), name


def test_partly_labeled_nnunet_folder_asks_for_labelstr_files(phantom, tmp_path, capsys):
    ids = [c["id"] for c in folders.read_msd(phantom)]
    root = nnunet_copy(phantom, tmp_path / "Dataset009_Phantom", labeled=set(ids[:4]))
    out = tmp_path / "run"
    assert al_loop.main(tiny.args(root, out)) == 0                              # stops for labels: exit 0
    printed = capsys.readouterr().out
    assert "annotation mode (6 unlabeled cases): strategy proxyrank_var_semi" in printed
    todo = rows(out / "to_annotate.csv")
    assert len(todo) == tiny.K and {r["case"] for r in todo} <= set(ids[4:])
    assert all(not (root / "labelsTr" / f"{r['case']}.nii.gz").exists() for r in todo)
    assert all(r["image"] == str(root / "imagesTr" / f"{r['case']}_0000.nii.gz") for r in todo)
    assert f"{tiny.K} case(s) need labels: see {out / 'to_annotate.csv'}" in printed
    assert f"save it as labelsTr/<case>.nii.gz in {root}, and rerun the same command" in printed

# ------------------------------------------------------------------------------------ a run's selection out


def test_export_nnunet_writes_the_selection_with_the_runs_split(phantom, msd_run, tmp_path, capsys):
    to = tmp_path / "raw"
    assert al_loop.main(["--out", str(msd_run), "--export-nnunet", "501", "--export-to", str(to),
                         "--strategy", "rand"]) == 0
    st = run_folder.read_states(msd_run)["0"]["rand"]
    split = json.loads((msd_run / "split.json").read_text())
    train = st["labeled"][:st["iterations"][-1]["n_labeled"]]                  # what the last Ms trained on
    folder = to / "Dataset501_Phantom"
    assert json.loads((folder / "splits_final.json").read_text()) == [{"train": train, "val": split["val"]}]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == sorted(
        f"{c}_0000.nii.gz" for c in train + split["val"])
    info = json.loads((folder / "dataset.json").read_text())
    assert info["numTraining"] == len(train) + len(split["val"]) == 6 and info["channel_names"] == {"0": "CT"}
    assert info["proxy_al"]["strategy"] == "rand" and info["proxy_al"]["iteration"] == 2
    assert "nnUNetv2_plan_and_preprocess -d 501" in capsys.readouterr().out


def test_export_nnunet_names_the_choices_when_the_run_has_several(msd_run, tmp_path):
    with pytest.raises(SystemExit, match=r"--export-nnunet: the run has 3 strategies \['full', 'proxyrank_var_semi', "
                                         r"'rand'\]; choose one with --strategy"):
        al_loop.main(["--out", str(msd_run), "--export-nnunet", "501", "--export-to", str(tmp_path / "raw")])
    assert not (tmp_path / "raw").exists()


def test_seed_without_export_nnunet_points_to_seeds(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        al_loop.main(["--out", str(tmp_path / "run"), "--seed", "1"])
    assert err.value.code == 2                                                 # argparse's usage error
    assert "--seed and --iteration choose what --export-nnunet exports; the study's seeds are --seeds" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()
