"""Tests for the pure parts of benchmarks/bench.py (the timed stages run in the benchmark itself, never in tests)."""
import dataclasses
import importlib.util
from pathlib import Path

import pytest

import al_loop
import strategies
from proxy_al import window_starts

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("roi, overlap", [(96, 0.25), (64, 0.25), (32, 0.5), (16, 0.0)])
def test_same_layout_crop_gives_monai_and_our_windows(roi, overlap):
    for size in range(1, 400, 7):
        crop = bench.same_layout_shape((size,), roi, overlap)[0]
        assert crop <= size and (crop == size or size - crop < int(roi * (1 - overlap)))
        assert window_starts(max(crop, roi), roi, overlap) == bench.monai_starts(crop, roi, overlap)


def test_monai_starts_moves_the_last_window_back():
    """The layout the crop avoids: 273 voxels, roi 96, overlap 0.25 -> MONAI 0, 72, 144, 177; ours even."""
    assert bench.monai_starts(273, 96, 0.25) == [0, 72, 144, 177]
    assert window_starts(273, 96, 0.25) == [0, 59, 118, 177]


def test_paper_workload_counts_by_hand():
    cfg = dataclasses.replace(al_loop.PAPER, k=2, iterations=2, steps=10, semi_steps=10, proxy_epochs=4,
                              proxy_val_every=2, proxy_patches_per_case=2, batch_size=2, keep="last")
    n = bench.paper_workload(pool=20, val=4, seeds=1, cfg=cfg)
    # proxy: 20 steps x 4 epochs; 12 strategies x 2 iterations x 10 steps
    assert n["proxy_steps"] == 80 and n["train_steps"] == 240
    assert n["semi_steps"] == 6 * 2 * 10
    # proxy ranking of the pool; 6 semi strategies score the rest (18, 16) for the most certain cases;
    # 8 strategies acquire by variance or entropy after iteration 1 only (the last one acquires nothing)
    assert n["mc_volumes"] == 20 + 6 * (18 + 16) + 8 * 18
    # validation of the proxy every 2 epochs and after every iteration; noisy labels for len(Tl) cases
    assert n["predictions"] == 2 * 4 + 12 * 2 * 4 + 6 * (2 + 4)
    assert bench.paper_workload(pool=20, val=4, seeds=3, cfg=cfg)["mc_volumes"] == 3 * n["mc_volumes"]
    # --keep best, validated every 4 steps: after steps 4, 8 and 10 of each of the 24 + 12 stages
    best = bench.paper_workload(pool=20, val=4, seeds=1, cfg=dataclasses.replace(cfg, keep="best", val_every=4))
    assert best["predictions"] == n["predictions"] + (24 + 12) * 3 * 4


def test_command_line_quick_preset_and_overrides():
    assert bench.parse_args([]) == bench.FULL
    assert bench.parse_args(["--quick"]) == bench.QUICK
    cfg = bench.parse_args(["--quick", "--steps", "5", "--shape-vox", "64,64,32", "--spacing-mm", "1.5,1.5,2",
                            "--compare-monai"])
    assert (cfg.quick, cfg.patch_vox, cfg.steps, cfg.compare_monai) == (True, 64, 5, True)
    assert cfg.shape_vox == (64, 64, 32) and cfg.spacing_mm == (1.5, 1.5, 2)


@pytest.mark.parametrize("argv, message", [
    (["--patch-vox", "50"], "--patch-vox a multiple of 16"),
    (["--shape-vox", "64,64"], "--shape-vox and --spacing-mm take three values: X,Y,Z")])
def test_bad_command_line_is_a_parser_error_naming_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit, match="^2$"):          # argparse prints the message and exits with 2
        bench.parse_args(argv)
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err


def test_schedule_one_rank_is_the_sum_and_many_ranks_the_critical_path():
    unit_s = {"proxy": 100.0, "score": 1.0, **{s: 10.0 * (i + 1) for i, s in enumerate(strategies.PAPER)}}
    total = 2 * (100 + 20 * 1 + sum(10.0 * (i + 1) for i in range(12)))
    assert bench.schedule_s(unit_s, pool=20, seeds=2, gpus=1) == pytest.approx(total)
    # enough ranks: a proxy, its pool scored in parallel (1 s), then the longest proxyrank run
    longest_proxy_run = max(unit_s[s] for s in strategies.PAPER if strategies.parse(s).proxy)
    assert bench.schedule_s(unit_s, pool=20, seeds=2, gpus=200) == pytest.approx(100 + 1 + longest_proxy_run)
    assert total / 8 <= bench.schedule_s(unit_s, pool=20, seeds=2, gpus=8) < total / 4


def test_mc_stage_scores_the_case_for_region_queries_too_and_reports_the_ratio():
    """Stage 5 runs the region-query scoring (maps and box means) beside the volume scoring, on a tiny case."""
    import numpy as np
    import torch
    from unet import UNet
    cfg = dataclasses.replace(bench.QUICK, patch_vox=16, mc_passes=2, query_vox=8)
    torch.manual_seed(0)
    model = UNet(1, 2, (4, 8), 0.2)
    image = np.random.default_rng(0).random((24, 20, 17), dtype=np.float32)
    res = bench.stage_mc(cfg, model, image, torch.device("cpu"), None, bench.RssSampler())
    assert set(res["ours"]["scores"]) == {"variance", "entropy", "bald"}
    n_boxes = res["ours_patch"]["scores"]["variance"]
    assert n_boxes == 9 * 7 * 6           # 8-voxel boxes 2 apart on 24, 20, 17 voxels: 9, 7, 6 starts (last: the edge)
    rows = bench.mc_rows(res, cfg, torch.device("cpu"), None)
    assert any(r[0].startswith("MC scoring for region queries (8^3 boxes") and r[4] == "<= 1.2x" for r in rows)
