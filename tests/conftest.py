"""Fixtures shared by the test files (helpers to import are in tiny.py): one torch thread for the session, the
phantom data sets (`phantom`: 10 cases, `phantom12`: 12, `msd`: 6 small ones in a Task09_ folder), finished tiny
studies (`reference`: rand and proxyrank_var_semi; `msd_run`: with the all-data reference), and no nnU-Net folder
variable leaking in from the shell. Under pytest-xdist (pytest.ini's -n 2) the tests that share one finished
study run on one worker, and the costliest units start first (pytest_xdist_make_scheduler below)."""
import ast
from pathlib import Path

import pytest
import torch

import al_loop
import tiny
from phantom import make_phantom_dataset


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny test models run fastest on one thread, and a busy machine cannot oversubscribe it: this process
    (each pytest-xdist worker) and the Pythons the tests start (OMP_NUM_THREADS) use one thread each."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """10 phantom cases of 24 x 24 x 16 voxels at 5 x 5 x 6 mm, in MSD layout."""
    root = tmp_path_factory.mktemp("phantom") / "Phantom"
    make_phantom_dataset(root, 10, seed=3, shape_vox=(24, 24, 16), spacing_mm=(5.0, 5.0, 6.0))
    return root


@pytest.fixture(scope="module")
def reference(phantom, tmp_path_factory):
    """A finished tiny study on the 10 phantoms: (run folder, its states)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return out, tiny.run(phantom, out)


@pytest.fixture(scope="module")
def phantom12(tmp_path_factory):
    """12 phantom cases as the `phantom` fixture makes its 10."""
    root = tmp_path_factory.mktemp("phantom12") / "Phantom"
    make_phantom_dataset(root, 12, seed=3, shape_vox=(24, 24, 16), spacing_mm=(5.0, 5.0, 6.0))
    return root


@pytest.fixture(autouse=True)
def no_nnunet_env(monkeypatch):
    """No nnU-Net folder leaks in from the shell: an export writes only where a test says."""
    for name in tiny.NNUNET_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def msd_run(phantom, tmp_path_factory):
    """A finished tiny study of rand, proxyrank_var_semi and the all-data reference on the MSD phantom."""
    out = tmp_path_factory.mktemp("msd") / "run"
    assert al_loop.main(tiny.args(phantom, out, *tiny.WITH_FULL)) == 0
    return out


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    """6 phantom cases of 12 x 10 x 8 voxels, MSD layout, in a folder named as MSD names its tasks."""
    root = tmp_path_factory.mktemp("msd") / "Task09_Phantom"
    return make_phantom_dataset(root, 6, seed=1, shape_vox=(12, 10, 8), spacing_mm=(6.0, 6.0, 8.0))


# ------------------------------------------------------------------------------------ pytest-xdist's schedule

# Module-scoped finished studies (seconds to make, idle): the tests of one module that use one run on one
# worker, so that each worker does not make it again.
SHARED_STUDIES = {"reference": 5, "msd_run": 4, "one_rank": 7, "patch_run": 4}
# Seconds of a slow test (call, idle, each parameter; any other test counts 0.5), to start the costliest
# units first: the order only, never what a test checks.
SECONDS = {"test_all_strategies_two_iterations": 13, "test_killed_worker_is_restarted_and_the_study_ends_the_same": 20,
           "test_killed_torchrun_stops_its_workers_with_one_line_and_the_rerun_continues": 21,
           "test_two_ranks_give_the_results_and_reports_of_one": 15,
           "test_semi_strategy_with_every_pool_case_labeled_under_torchrun": 20,
           "test_a_new_score_added_by_the_recipe_ranks_lines_4_9_and_12": 9,
           "test_resume_after_stop_between_stages": 4, "test_bald_strategies_run_apart_from_the_paper": 5,
           "test_a_finished_run_given_more_iterations_acquires_first_as_an_uninterrupted_run": 5,
           "test_killed_run_resumes_to_the_same_results": 7, "test_annotation_mode_writes_to_annotate_and_continues": 4,
           "test_sigterm_ends_with_a_message_and_a_rerun_continues": 10,
           "test_nnunet_raw_copy_gives_the_results_of_the_msd_folder": 3,
           "test_full_disk_at_a_checkpoint_is_a_message_and_a_rerun_continues": 5,
           "test_oracle_uses_only_selected_labels": 2,
           "test_a_failing_rank_stops_the_others_naming_rank_and_unit": 11,
           "test_semi_strategy_with_every_pool_case_labeled_skips_lines_9_to_11": 3,
           "test_labels_named_by_case_are_used_and_an_orphan_is_named": 3,
           "test_annotation_mode_runs_to_its_end_when_the_user_labels_what_it_asks": 4,
           "test_annotation_mode_refuses_a_world_of_two": 7, "test_queue_hands_every_unit_to_exactly_one_rank": 6,
           "test_rand_and_rand_semi_are_paired": 4, "test_export_passes_nnunet_verify_dataset_integrity": 7,
           "test_unreadable_and_nan_cases_are_left_out_and_listed": 3,
           "test_labels_in_hand_join_tl_and_only_unlabeled_cases_are_selected": 3,
           "test_rerun_with_another_setting_of_the_saved_stages_is_refused": 2,
           "test_presegmentations_on_the_native_grid_and_labels_saved_from_them_continue": 3,
           "test_retrained_proxy_scores_the_pool_again": 3,
           "test_porting_example_runs_with_proxy_al_and_losses_alone": 5,
           "test_a_worker_reports_the_launchers_death_without_a_cpp_stack_trace": 5,
           "test_box_labels_round_trip_on_an_lps_scan_and_only_the_boxes_are_read": 8,
           "test_two_ranks_give_the_results_of_one_in_patch_mode": 20,
           "test_patch_results_do_not_depend_on_pool_labels_outside_the_acquired_boxes": 4,
           "test_a_patch_run_extended_by_an_iteration_ends_as_an_uninterrupted_one": 4,
           "test_next_sample_is_the_command_lines_ranking_then_the_fine_tuned_models": 14,
           "test_a_bad_conf_value_stops_the_server_with_the_command_lines_message": 7,
           "test_a_touched_or_copied_label_file_does_not_label_the_boxes_asked_in_it": 6,
           "test_a_rerun_on_another_data_folder_is_taken_only_with_the_same_files": 5}
TESTS = Path(__file__).resolve().parent


def shared_study_of_each_test():
    """{(file name, test function): the shared study it takes as an argument}, read from the test files' source."""
    found = {}
    for path in TESTS.glob("test_*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                shared = [a.arg for a in node.args.args if a.arg in SHARED_STUDIES]
                if shared:
                    found[path.name, node.name] = shared[0]
    return found


def scope(nodeid, shared=[]):
    """The unit of work of a test: the module's shared study it uses, or the test alone."""
    if not shared:
        shared.append(shared_study_of_each_test())
    path, _, name = nodeid.partition("::")
    study = shared[0].get((Path(path).name, name.split("[")[0]))
    return f"{path}::{study}" if study else nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n N` (xdist's default --dist load): tests go one by one to a free worker, except that the tests of a
    module that use one shared study go together, in the order of the workers' collection (costliest unit
    first, pytest_collection_modifyitems). Another --dist is xdist's own."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedStudiesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return scope(nodeid)

    config.option.loadscopereorder = False
    return SharedStudiesTogether(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["costliest_first"] = node.config.getoption("dist") == "load"


def pytest_collection_modifyitems(config, items):
    """In an xdist worker under the scheduler above: the costliest units first (the longest-processing-time
    rule, so that no long test starts last); a unit's tests keep their order."""
    if not getattr(config, "workerinput", {}).get("costliest_first"):
        return
    cost = {}
    for item in items:
        unit, study = scope(item.nodeid), scope(item.nodeid).partition("::")[2]
        cost[unit] = cost.get(unit, SHARED_STUDIES.get(study, 0)) + SECONDS.get(item.originalname, 0.5)
    items.sort(key=lambda item: -cost[scope(item.nodeid)])
