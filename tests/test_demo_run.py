"""Algorithm 1 end to end on a tiny phantom data set (seconds on the CPU)."""
import csv
import dataclasses
import json
import shutil

import pytest

import al_loop
import cli
import study
import strategies
import data
import tiny
from tiny import K
import cases
import folders
import run_folder

tiny_args = tiny.args


def run(root, out, *extra):
    assert al_loop.main(tiny_args(root, out, *extra)) == 0
    return run_folder.read_states(out)


def test_parse_strategy_covers_table():
    fields = lambda name: (lambda s: (s.proxy, s.acquisition, s.semi))(strategies.parse(name))
    assert fields("rand") == (False, "random", False)
    assert fields("ent_semi") == (False, "entropy", True)
    assert fields("proxyrank") == (True, "proxy", False)
    assert fields("proxyrank_var_semi") == (True, "variance", True)
    assert len(set(strategies.PAPER)) == 12
    assert strategies.parse("full").reference and "full" not in [s.name for s in strategies.choose("all")]
    with pytest.raises(ValueError, match="unknown nope; choose from all, extended, rand"):
        strategies.parse("nope")


def test_presets_and_overrides():
    cfg = al_loop.parse_args([])[0]
    assert cfg.preset == "demo" and cfg.data == "demo"
    cfg = al_loop.parse_args(["--data", "MSD_Task03", "--k", "3", "--patch-vox", "64,64,32"])[0]
    assert cfg.preset == "paper" and cfg.k == 3 and cfg.patch_vox == (64, 64, 32) and cfg.steps == 2000


def test_a_value_of_the_wrong_type_is_a_parser_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit, match="^2$"):          # argparse prints the message and exits with 2
        al_loop.parse_args(["--k", "three"])
    assert "error: --k 'three': expected int" in capsys.readouterr().err


def test_help_shows_every_field_with_its_help_and_preset_values(capsys):
    """--help exits 0 and holds, for every Config field, its flag, its metadata help and its value in every
    preset (argparse wraps lines, even inside words at a hyphen, so the text is compared without whitespace)."""
    with pytest.raises(SystemExit) as exit_info:
        al_loop.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    squeezed = "".join(text.split())
    show = lambda v: cli.fmt(v) if v != "" else '""'
    for f in dataclasses.fields(al_loop.Config):
        values = ", ".join(f"{name}: {show(getattr(preset, f.name))}" for name, preset in al_loop.PRESETS.items())
        assert f"--{f.name.replace('_', '-')} " in text, f.name
        assert "".join(f"{f.metadata['help']} [{values}]".split()) in squeezed, f.name
    for shown in ("paper: 100, demo: 16", "paper: constant, demo: cosine", "paper: 100,150, demo: 100,150"):
        assert shown in " ".join(text.split()), shown      # three by hand: --proxy-epochs, --lr-decay, --hu-band


def test_all_strategies_two_iterations(phantom, tmp_path, monkeypatch):
    started_from_proxy = {}
    real_supervised = al_loop.supervised

    def spy_supervised(study, labeled, init_state, tag):
        started_from_proxy[tag] = init_state is not None
        return real_supervised(study, labeled, init_state, tag)

    certain_scores = {}
    real_score = al_loop.score_cases

    def spy_score(study, model, ids, tag):
        scores = real_score(study, model, ids, tag)
        certain_scores[tag] = scores
        return scores

    monkeypatch.setattr(al_loop, "supervised", spy_supervised)
    monkeypatch.setattr(al_loop, "score_cases", spy_score)
    state = run(phantom, tmp_path / "run", "--strategy", "all")["0"]
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert set(state) == set(strategies.PAPER)
    for name, st in state.items():
        proxy, semi = strategies.parse(name).proxy, strategies.parse(name).semi
        assert len(st["labeled"]) == len(set(st["labeled"])) == 2 * K, name          # k per iteration, distinct
        assert not set(st["labeled"]) & set(split["val"]), name                      # never a validation case
        assert [it["n_labeled"] for it in st["iterations"]] == [K, 2 * K]
        assert all(started_from_proxy[f"seed0/{name}/iter{j}"] == proxy for j in range(2)), name
        if semi:  # line 8: the len(Tl) most certain unlabeled cases under Ms
            for j, it in enumerate(st["iterations"]):
                scores = certain_scores[f"seed0/{name}/iter{j}/certain"]
                key = "entropy" if "ent" in name else "variance"
                ranked = sorted(scores, key=lambda c: scores[c][key])
                assert it["certain"] == ranked[:it["n_labeled"]], name
                assert not set(it["certain"]) & set(st["labeled"][:it["n_labeled"]])
    firsts = {n: tuple(st["labeled"][:K]) for n, st in state.items()}
    # one proxy ranking per seed: by entropy for proxyrank_ent*, by variance for the other proxyrank strategies
    assert len({firsts[n] for n in state if n.startswith("proxyrank_ent")}) == 1
    assert len({firsts[n] for n in state if n.startswith("proxyrank") and "_ent" not in n}) == 1
    assert len({firsts[n] for n in state if not n.startswith("proxyrank")}) == 1  # one shared random draw
    assert state["proxyrank"]["labeled"] == state["proxyrank_semi"]["labeled"]   # the ranking itself, in order
    with open(tmp_path / "run" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and {"dice_liver", "dice_tumour", "mean_dice", "pct_labeled"} <= set(rows[0])
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "proxyrank_ent_semi" in summary and "Wilcoxon" in summary
    assert (tmp_path / "run" / "per_case_dice.csv").read_text().count("\n") == 1 + 24 * 2


def test_oracle_uses_only_selected_labels(phantom, tmp_path, monkeypatch):
    """Every label file is checked before training; after the checks, the method uses only the labels of
    validation cases and of the cases it selected."""
    used, checked = [], []
    real_label, real_check = cases.Cases.label, cases.Cases.check_labels
    monkeypatch.setattr(cases.Cases, "label", lambda self, cid: used.append(cid) or real_label(self, cid))
    monkeypatch.setattr(cases.Cases, "check_labels", lambda self: real_check(self) or checked.extend(used) or used.clear())
    state = run(phantom, tmp_path / "run", "--strategy", "proxyrank_var_semi,var")["0"]
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    allowed = set(split["val"]) | {c for st in state.values() for c in st["labeled"]}
    assert set(checked) == set(split["pool"]) | set(split["val"])  # the checks read every label up front
    assert used and set(used) <= allowed                           # the method: validation and selected only
    assert set(split["pool"]) - allowed                            # some pool labels were never used


def test_resume_after_stop_between_stages(phantom, tmp_path, monkeypatch):
    args = ("--strategy", "proxyrank_var_semi,rand")
    reference = run(phantom, tmp_path / "ref", *args)
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


def test_annotation_mode_writes_to_annotate_and_continues(phantom, tmp_path):
    root = tmp_path / "mine"
    shutil.copytree(phantom, root)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    cases = folders.read_msd(root)
    for case in cases[3:]:  # the user has labels for three cases only
        shutil.move(case["label"], hidden)
    out = tmp_path / "run"
    for attempt in range(10):
        with pytest.warns(UserWarning):
            assert al_loop.main(tiny_args(root, out, "--k", "1")) == 0
        todo = out / "to_annotate.csv"
        if not todo.exists():
            break
        with open(todo) as f:
            rows = list(csv.DictReader(f))
        assert rows and set(rows[0]) == {"case", "image", "score", "rank", "prediction", "uncertainty", "save_label_as"}
        for row in rows:  # the "annotator" delivers the requested labels
            shutil.move(hidden / f"{row['case']}.nii.gz", root / "labelsTr")
        todo.unlink()
    state = run_folder.read_states(out)
    st = state["0"]["proxyrank_var_semi"]
    assert len(st["iterations"]) == 2 and attempt >= 2
    assert not set(st["labeled"]) & set(json.loads((out / "split.json").read_text())["val"])


@pytest.mark.parametrize("extra, message", [
    (("--strategy", "rand,nope"), "unknown nope"),
    (("--k", "50"), "--n-val 2 leaves 8 pool cases of 10, but --k 50 x --iterations 2 needs 100"),
    (("--patch-vox", "20,20,20"), "positive multiple of 16"),
])
def test_bad_requests_fail_before_work(phantom, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        al_loop.main(tiny_args(phantom, tmp_path / "run", *extra))
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
    with pytest.raises(SystemExit, match=r"dataset.json: 'labels' must number the classes 0\.\.C-1 with C >= 2 .*got \[0\]"):
        al_loop.main(tiny_args(root, tmp_path / "run"))


def test_unreadable_case_is_left_out_with_a_warning(phantom, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(phantom, root)
    (root / "imagesTr" / "phantom_4.nii.gz").write_bytes(b"not a nifti file")
    cfg = al_loop.parse_args(tiny_args(root, tmp_path / "run"))[0]
    with pytest.warns(UserWarning, match="phantom_4"):
        s = study.open_study(cfg)[0]
        study.preprocess(s)
    assert "phantom_4" not in s.cases.pool + s.cases.val
    assert len(s.cases.pool) + len(s.cases.val) == 9


def test_own_scans_without_any_label_get_no_validation_set(phantom, tmp_path):
    root = tmp_path / "unlabeled"
    shutil.copytree(phantom, root)
    shutil.rmtree(root / "labelsTr")
    (root / "dataset.json").unlink()
    s = study.open_study(al_loop.parse_args(tiny_args(root, tmp_path / "run"))[0])[0]
    assert s.cases.annotation and s.cases.val == [] and len(s.cases.pool) == 10


# ------------------------------------------------------------------------------ the labeled set across reruns


def states_of(out):
    return run_folder.read_states(out)["0"]


def test_k_changed_in_annotation_mode_keeps_every_annotated_case(phantom, tmp_path):
    """Two rounds of --k 2, then --k 1: Tl keeps all four selected cases (no 'disagrees' warning), and the
    new --k sizes only the next acquisition."""
    import warnings
    from test_annotator import own_scans, to_annotate
    root, out = own_scans(phantom, tmp_path, labeled=4), tmp_path / "run"
    for k in ("2", "2", "1"):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*disagrees with the iteration records")
            assert al_loop.main(tiny.args(root, out, "--strategy", "rand", "--k", k)) == 0
        for r in to_annotate(out):
            shutil.copy(phantom / "labelsTr" / f"{r['case']}.nii.gz", r["save_label_as"])
    st = states_of(out)["rand"]
    assert [r["n_labeled"] for r in st["iterations"]] == [4, 6]          # 2 in hand + 2, then + 2
    assert len(st["iterations"][1]["acquired"]) == 1 and len(st["labeled"]) == len(set(st["labeled"])) == 7


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


def test_a_finished_run_given_more_iterations_acquires_first_as_an_uninterrupted_run(phantom, tmp_path):
    """--iterations 1, then --iterations 2: the same Tl and Dice as one run of 2 iterations (the acquisition
    after iteration 1 is made under its own final model); then --iterations 3 --k 3 acquires 3 more."""
    strategies_ = ("--strategy", "rand,proxyrank_var_semi")
    one, two = tmp_path / "one", tmp_path / "two"
    run(phantom, one, *strategies_, "--iterations", "1")
    run(phantom, one, *strategies_, "--iterations", "2")
    run(phantom, two, *strategies_, "--iterations", "2")
    for name in ("rand", "proxyrank_var_semi"):
        a, b = states_of(one)[name], states_of(two)[name]
        assert a["labeled"] == b["labeled"] and [r["n_labeled"] for r in a["iterations"]] == [2, 4], name
        assert [r["mean_dice"] for r in a["iterations"]] == pytest.approx([r["mean_dice"] for r in b["iterations"]],
                                                                          nan_ok=True)
    run(phantom, one, "--strategy", "rand", "--iterations", "3", "--k", "3")
    assert [r["n_labeled"] for r in states_of(one)["rand"]["iterations"]] == [2, 4, 7]
