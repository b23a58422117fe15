"""The shape of the code, read with `ast` (nothing is imported): imports between the project's modules go one
way, proxy_al.py ports on its own, al_loop.py is Algorithm 1 and nothing around it, under the paper's line
numbers."""
import ast
import re
import sys
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in sorted(REPO.glob("*.py"))}       # the project: every top-level module
ALGORITHM_LINES = set(range(1, 19))                              # Algorithm 1 has 18 numbered lines


def imported(path):
    """Top-level names of every module `path` imports, anywhere in the file (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def graph():
    """{module: project modules it imports}."""
    return {name: imported(path) & MODULES.keys() - {name} for name, path in MODULES.items()}


def find_circle(edges):
    """A list of modules [a, b, ..., a] that import each other in a circle, or None."""
    state = {}                                                   # "open" while on the path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt, path + [nxt])):
                return circle
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (circle := visit(start, [start])):
            return circle
    return None


def test_find_circle_finds_one_and_only_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_project_modules_are_found():
    assert {"al_loop", "proxy_al", "losses", "study", "train"} <= MODULES.keys()
    assert "proxy_al" in graph()["al_loop"] and "losses" in graph()["proxy_al"]   # the reader sees imports


def test_imports_between_modules_have_no_circle():
    circle = find_circle(graph())
    assert circle is None, "modules import each other in a circle: " + " -> ".join(f"{m}.py" for m in circle)


def test_proxy_al_ports_on_its_own():
    """proxy_al.py needs torch, numpy, scipy and losses.py only; losses.py needs no project module."""
    allowed = {"torch", "numpy", "scipy", "losses"} | set(sys.stdlib_module_names)
    assert imported(MODULES["proxy_al"]) - allowed == set()
    assert imported(MODULES["losses"]) & MODULES.keys() == set()
    assert imported(MODULES["losses"]) - {"torch", "numpy", "scipy"} - set(sys.stdlib_module_names) == set()


def test_al_loop_opens_no_lock_store_csv_or_parser():
    """The run around the method (locks, the group's store, files, the command line) lives in other modules."""
    path = MODULES["al_loop"]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    forbidden = {"argparse", "csv", "fcntl", "torch.distributed"}
    assert not {m for m in modules if m in forbidden or m.startswith("torch.distributed.")}
    opens = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and
             (getattr(node.func, "id", None) == "open" or getattr(node.func, "attr", None) == "open")]
    assert opens == [], f"al_loop.py calls open() on lines {opens}"
    n_lines = len(path.read_text(encoding="utf-8").splitlines())
    assert n_lines <= 450, f"al_loop.py has {n_lines} lines (at most 450)"


LINE_REF = re.compile(r"\blines?\s+(\d+(?:\s*(?:-|/|,|and)\s*\d+)*)", re.IGNORECASE)


def line_numbers(text):
    """Algorithm 1 line numbers named in `text`: "line 7", "lines 10-11" (a range), "lines 12 / 15",
    "lines 5, 13 and 16"."""
    numbers = set()
    for ref in LINE_REF.findall(text):
        for part in re.split(r"\s*(?:/|,|and)\s*", ref):
            lo, _, hi = part.partition("-")
            numbers |= set(range(int(lo), int(hi or lo) + 1))
    return numbers


def labelled_lines(source):
    """The Algorithm 1 lines that label the code that does them: a "# line N" comment at the end of a line
    of code, or a function's or class's docstring that opens with "Line N:" / "Lines N-M (what):". Overviews
    (the module docstring, section headers, "Lines 5-18 for one strategy") name lines without doing them."""
    numbers, lines = set(), source.splitlines()
    for tok in tokenize.generate_tokens(iter(source.splitlines(keepends=True)).__next__):
        row, col = tok.start
        if tok.type == tokenize.COMMENT and lines[row - 1][:col].strip():
            numbers |= line_numbers(tok.string)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            opening = re.match(LINE_REF.pattern + r"\s*(\([^)]*\))?:", ast.get_docstring(node) or "", re.IGNORECASE)
            numbers |= line_numbers(opening.group(0)) if opening else set()
    return numbers


def test_line_numbers_are_read_as_written():
    assert line_numbers("line 7: Ms") == {7}
    assert line_numbers("# lines 10-11: Msemi") == {10, 11}
    assert line_numbers("lines 12 / 15") == {12, 15}
    assert line_numbers("Lines 5, 13 and 16: the k") == {5, 13, 16}
    source = ('"""Lines 1-18 in an overview."""\n# ---- lines 2-4\n'
              'def f():\n    """Lines 5-6 (both): done here."""\n    x = 1  # line 9\n\n'
              'def g():\n    """Lines 10-18 for a summary: not a label."""\n')
    assert labelled_lines(source) == {5, 6, 9}


def test_al_loop_labels_every_line_of_algorithm_1():
    missing = ALGORITHM_LINES - labelled_lines(MODULES["al_loop"].read_text(encoding="utf-8"))
    assert not missing, (f"al_loop.py labels no code with Algorithm 1 line(s) {sorted(missing)}: add a "
                         f"'# line N' comment where the code does it, or open that function's docstring with 'Line N:'")


@pytest.mark.parametrize("name", ["DESIGN" + ".md", ".." + "/shared"])   # split: this file names neither
def test_no_file_refers_to_notes_outside_the_project(name):
    files = [p for p in REPO.rglob("*") if p.suffix in (".py", ".md", ".txt", ".ini", ".toml", ".cfg")
             and p.is_file() and not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    assert len(files) > len(MODULES)
    assert [str(p.relative_to(REPO)) for p in files if name in p.read_text(encoding="utf-8", errors="replace")] == []


ENTRY_POINTS = {"al_loop", "cli"}         # main turns the project's error into the message and exit users see


def test_no_system_exit_below_the_entry_points():
    """Below main, a problem is a value (files.ProxyAlError, a ValueError): no module raises SystemExit, and
    none catches it to branch. A porter or a test that calls a function gets an exception, not an exit."""
    found = []
    for name, path in MODULES.items():
        if name in ENTRY_POINTS:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Name) and node.id == "SystemExit":
                found.append(f"{name}.py:{node.lineno}")
    assert not found, f"SystemExit below the entry points: {found}"


# Attributes of torch's own objects the project sets on purpose: a layer's mode (proxy_al restores the caller's
# modes layer by layer after MC dropout) and cuDNN's autotuner on the GPU path.
FOREIGN_ATTRIBUTES = {"module.training", "torch.backends.cudnn.benchmark", "warnings.formatwarning"}


def assigned_attributes(source):
    """(line, target) of every attribute assignment whose object is not `self`: `x.a = 1`, `x.a += 1`,
    `self.x.a = 1`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for target in targets:
            for sub in ast.walk(target):
                if (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
                        and not (isinstance(sub.value, ast.Name) and sub.value.id == "self")):
                    found.append((node.lineno, ast.unparse(sub)))
    return found


def test_assigned_attributes_are_found():
    source = "def f(s):\n    s.a = 1\n    s.b += 2\n    self.c.d = 3\n    self.e = 4\n    x = s.f\n"
    assert assigned_attributes(source) == [(2, "s.a"), (3, "s.b"), (4, "self.c.d")]


def test_no_object_is_changed_from_outside():
    """An object's attributes are set by its own methods only (`self.x = ...`): nothing outside an object
    writes them, so a reader finds every change of a Study, Cases or RunFolder in its class."""
    found = [f"{name}.py:{line} {target}" for name, path in MODULES.items()
             for line, target in assigned_attributes(path.read_text(encoding="utf-8"))
             if target not in FOREIGN_ATTRIBUTES]
    assert not found, f"attributes assigned from outside their object: {found}"


def test_modules_and_classes_stay_small():
    """No top-level module above 600 lines and no class above 150: a room that would take every new feature
    is split along what it holds before it gets there."""
    long = []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 600:
            long.append(f"{name}.py: {len(text.splitlines())} lines")
        long += [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
                 for node in ast.walk(ast.parse(text)) if isinstance(node, ast.ClassDef)
                 and node.end_lineno - node.lineno + 1 > 150]
    assert not long, f"above 600 lines (module) or 150 (class): {long}"
