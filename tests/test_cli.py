"""cli.py: the command line: strategies and presets, flags of the wrong type or value named before any work, --help."""
import dataclasses
import json

import pytest
import torch

import al_loop
import cli
import run_folder
from files import ProxyAlError


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


def test_query_vox_takes_whole_voxels_only():
    with pytest.raises(SystemExit, match=r"--query-vox 8.5,8,8: three whole numbers of voxels"):
        cli.check_options(al_loop.parse_args(["--query", "patch", "--query-vox", "8.5,8,8"])[0])
    cli.check_options(al_loop.parse_args(["--query", "patch", "--query-vox", "8,8,8"])[0])


def test_query_vox_without_query_patch_is_refused_and_not_compared_on_rerun(capsys, tmp_path):
    with pytest.raises(SystemExit, match="^2$"):
        al_loop.parse_args(["--query-vox", "4,4,4"])
    assert "--query-vox 4,4,4: used only with --query patch (this run has --query volume); drop it" in \
        capsys.readouterr().err
    cfg = al_loop.parse_args([])[0]
    assert cli.moot(cfg) == {"query_vox"} and cli.moot(dataclasses.replace(cfg, query="patch")) == set()
    old = {**dataclasses.asdict(cfg), "query_vox": [4, 4, 4]}           # a run made when the flag was ignored
    (tmp_path / "config.json").write_text(json.dumps(old))
    run_folder.check_rerun_settings(tmp_path, dataclasses.asdict(cfg), cli.moot(cfg))      # taken: it meant nothing
    with pytest.raises(ProxyAlError, match=r"--query-vox 32,32,32 \(the run has 4,4,4\)"):
        run_folder.check_rerun_settings(tmp_path, {**dataclasses.asdict(cfg), "query": "patch"}, set())


def test_a_warning_reads_as_its_message_without_the_source_line():
    text = cli.format_warning(UserWarning("3 label file(s) listed"), UserWarning, "/x/folders.py", 87)
    assert text == "warning: 3 label file(s) listed\n"
