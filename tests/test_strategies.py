"""strategies.py: the table of strategy names, and the recipe for a new score, as its docstring gives
it, works: applied to a copy of the project, a `margin` score ranks lines 4, 9 and 12 of a tiny study."""
import json
import re
import shutil
import subprocess
import sys

import pytest

import strategies
import tiny
from tiny import REPO


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


def recipe(text):
    """The recipe's lines, from 'Adding a strategy' to 'follow the name.', joined (README wraps them as code)."""
    found = re.search(r"Adding a strategy: .*?both follow the name\.", text, re.S)
    assert found, "no recipe"
    return " ".join(found.group(0).split())


def test_readme_points_to_the_recipe_that_strategies_gives():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "takes three edits, listed in `strategies.py`'s docstring" in readme
    assert recipe(strategies.__doc__).startswith("Adding a strategy: its name")


def apply_recipe(copy):
    """The recipe's three edits, as a user makes them: margin = 1000 - variance, a ranking opposite to the
    variance's, in values no other score takes."""
    path = copy / "proxy_al.py"
    text = path.read_text(encoding="utf-8")
    text, n = re.subn(r'(\n    if return_map:\n        out\["variance_map"\])',
                      r'\n    out["margin"] = 1000.0 - out["variance"]\1', text)
    assert n == 1
    path.write_text(text, encoding="utf-8")
    path = copy / "strategies.py"
    text = path.read_text(encoding="utf-8")
    text = text.replace('MC_MEASURES = ("variance", "entropy", "bald")',
                        'MC_MEASURES = ("variance", "entropy", "bald", "margin")')
    text = text.replace('"bald": "bald"}', '"bald": "bald", "margin": "margin"}')
    text = text.replace('"proxyrank_bald_semi")', '"proxyrank_bald_semi", "proxyrank_margin_semi")')
    assert text.count("margin") == 4 + strategies.__doc__.count("margin")     # each edit took
    path.write_text(text, encoding="utf-8")


SPY = """import json, sys
sys.path.insert(0, sys.argv[1])          # the copy, not the repository
import al_loop
calls, real = [], al_loop.score_cases


def spy(study, model, ids, key):          # every MC scoring of the study, as it was
    scores = real(study, model, ids, key)
    calls.append([key, scores])
    return scores


al_loop.score_cases = spy
code = al_loop.main(sys.argv[3:])
json.dump(calls, open(sys.argv[2], "w"))
sys.exit(code)
"""


def test_a_new_score_added_by_the_recipe_ranks_lines_4_9_and_12(phantom, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in REPO.glob("*.py"):
        shutil.copy(path, copy / path.name)
    apply_recipe(copy)
    out, calls = tmp_path / "run", tmp_path / "calls.json"
    subprocess.run([sys.executable, "-c", SPY, str(copy), str(calls),
                    *tiny.args(phantom, out, "--strategy", "proxyrank_margin_semi")], check=True, cwd=tmp_path,
                   capture_output=True, timeout=600)
    state = json.loads((out / "state" / "seed0_proxyrank_margin_semi.json").read_text())
    scored = {}
    for key, scores in json.loads(calls.read_text()):
        scored.setdefault(key, {}).update(scores)
    proxy = {c: json.loads((out / "scores" / "seed0" / f"{c}.json").read_text()) for c in scored["seed0/proxy"]}
    by = lambda measure, scores, reverse: sorted(scores, key=lambda c: scores[c][measure], reverse=reverse)
    # line 4 (and 5): the pool ranked by the proxy's margin, not its variance
    assert all("margin" in s for s in proxy.values())
    assert state["initial"] == by("margin", proxy, True)[:tiny.K] != by("variance", proxy, True)[:tiny.K]
    first = state["iterations"][0]
    # line 9: the most certain unlabeled cases under Ms, by the margin
    certain = scored["seed0/proxyrank_margin_semi/iter0/certain"]
    assert first["certain"] == by("margin", certain, False)[:len(state["initial"])]
    # line 12: the acquisition scores are the margins under Msemi
    acquired = scored["seed0/proxyrank_margin_semi/iter0"]
    assert first["scores"] == {c: s["margin"] for c, s in acquired.items()}
    assert first["acquired"] == by("margin", acquired, True)[:tiny.K]
