"""The notebooks: sine_demo.ipynb and exercises.ipynb run top to bottom in a fresh kernel (at a tiny
budget) and are committed executed; the exercises' release holds no answer, and every check passes
with our solutions, fails with the stubs and fails with wrong answers of the kinds students write.

    python test_notebooks.py --release DIR     # what a student gets: exercises.ipynb, merge.py, stacked.py
    python test_notebooks.py --grade FILE...   # the automatic points of returned exercises notebooks (--csv OUT)
"""
import ast
import contextlib
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).parent
EXERCISED = {"concat_weight": 1, "p_open": 2, "l_half": 2, "lambda_schedule": 3, "compress": 4}  # merge.py's
STUBBED = {  # what each stub in the handout's merge.py says of its exercise
    "concat_weight": "asks for what it does", "p_open": "asks for what it does",
    "l_half": "asks for it from the open probabilities; the notebook makes them of the locs with your p_open",
    "lambda_schedule": "asks for it without tuned_epochs (the rescaled step); the notebook calls yours without it",
    "compress": "asks for its special case, compress_mlp, for the sine MLP; this one stays a stub"}


def strip_solutions(notebook):
    """What nbgrader's generate_assignment does to the source: in each solution cell the code between
    ### BEGIN SOLUTION and ### END SOLUTION becomes a stub that raises NotImplementedError, and a written
    answer becomes YOUR ANSWER HERE; every output is cleared; cells are locked as its LockCells locks them
    (checks and read-only cells can be neither edited nor deleted, answer cells not deleted); a check's lines
    from ### BEGIN HIDDEN TESTS to ### END HIDDEN TESTS are removed (cut_hidden_tests). Its checksums are left
    out: --grade puts the key's checks back, hidden tests and all, whatever became of them."""
    for number, cell in enumerate(notebook.cells, 1):
        marks = cell.get("metadata", {}).get("nbgrader", {})
        if marks.get("solution") or marks.get("grade") or marks.get("locked"):
            cell.metadata["deletable"] = False
            if not marks.get("solution"):
                cell.metadata["editable"] = False
        check = bool(marks.get("grade")) and not marks.get("solution")
        kind = "answer cell" if marks.get("solution") else "check" if check else "cell"
        name = f"the {kind} {marks['grade_id']!r} (cell {number})" if marks.get("grade_id") else f"cell {number}"
        cell.source = cut_hidden_tests(cell.source, name, check)
        if marks.get("solution"):
            if cell.cell_type == "markdown":
                cell.source = "YOUR ANSWER HERE"
                continue
            lines, inside = [], False
            for line in cell.source.splitlines():
                if line.strip() == "### BEGIN SOLUTION":
                    indent, inside = line[:len(line) - len(line.lstrip())], True
                    lines += [f"{indent}# YOUR CODE HERE", f"{indent}raise NotImplementedError()"]
                elif line.strip() == "### END SOLUTION":
                    inside = False
                elif not inside:
                    lines.append(line)
            cell.source = "\n".join(lines)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)  # when our copy ran
    return notebook


def cut_hidden_tests(source, where, check):
    """A check's source without its hidden tests: every line from one holding BEGIN HIDDEN TESTS to one holding
    END HIDDEN TESTS, as nbgrader finds them. Hidden tests outside a check, or a marker without its pair, are
    a ValueError: nothing is released that would show them."""
    kept, inside = [], False
    for line in source.splitlines(keepends=True):
        begins, ends = "BEGIN HIDDEN TESTS" in line, "END HIDDEN TESTS" in line
        if (begins or ends) and not check:
            raise ValueError(f"{where} holds hidden tests: they belong in a check cell, and would be shown here")
        if (begins and inside) or (ends and not inside):
            raise ValueError(f"{where}: a hidden tests marker without its pair (the tests would be shown)")
        if begins or ends:
            inside = begins
        elif not inside:
            kept.append(line)
    if inside:
        raise ValueError(f"{where}: a BEGIN HIDDEN TESTS without its END HIDDEN TESTS (the tests would be shown)")
    return "".join(kept)


def stub_merge(source):
    """merge.py with the functions the exercises ask for (their docstrings too) replaced by stubs, and without
    its command line, which needs the whole project: run as a command, the handout's says so in one line."""
    lines = source.splitlines(keepends=True)
    body = ast.parse(source).body
    functions = [node for node in body if isinstance(node, ast.FunctionDef) and node.name in EXERCISED]
    commands = [node for node in body if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"]
    for node in sorted(functions + commands, key=lambda node: -node.lineno):
        if node in commands:
            lines[node.lineno - 1:node.end_lineno] = []
            continue
        indent, number = " " * node.body[0].col_offset, EXERCISED[node.name]
        lines[node.body[0].lineno - 1:node.end_lineno] = [
            textwrap.fill(f'"""Left out: exercise {number} of exercises.ipynb {STUBBED[node.name]}."""', 116,
                          initial_indent=indent, subsequent_indent=indent) + "\n",
            f'{indent}raise NotImplementedError("exercise {number} of exercises.ipynb")\n']
    text = "".join(lines).replace("--runs 50     #", "--runs 50     # in the whole project, not this copy:")
    return text + ('\nif __name__ == "__main__":  # the handout\n    sys.exit("this merge.py is the exercises\' '
                   'copy: its command line is the whole project\'s")\n')


def release(folder):
    """Everything a student gets, in folder: the exercises without our answers and outputs, merge.py without
    the functions they ask for, and stacked.py, the fast trainer that exercise 5's experiment uses. The folder
    must be new or empty: never the repository, whose exercises.ipynb and merge.py are the answer key."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{folder} is not a new or empty folder; the release writes into one of its own")
    handout = strip_solutions(nbformat.read(ROOT / "exercises.ipynb", as_version=4))  # before any folder is made
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(handout, folder / "exercises.ipynb")
    (folder / "merge.py").write_text(stub_merge((ROOT / "merge.py").read_text()))
    (folder / "stacked.py").write_text((ROOT / "stacked.py").read_text())  # the fast trainer of exercise 5
    return folder


def execute(notebook, folder, monkeypatch, allow_errors=False, path=None):
    """The notebook run in a fresh kernel from a clean state, at its tiny budget, in folder, importing the
    merge.py of path (the project's by default)."""
    monkeypatch.setenv("NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("PYTHONPATH", str(path or ROOT))
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(notebook, timeout=600, kernel_name="python3", allow_errors=allow_errors,
                   resources={"metadata": {"path": str(folder)}}).execute()  # raises on a cell's error
    return notebook


def graded(notebook):
    return [c for c in notebook.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade")]


def failed(cell):
    return any(o.get("output_type") == "error" for o in cell.outputs)


@pytest.mark.slow
def test_the_demo_runs_top_to_bottom_in_a_fresh_kernel_and_writes_nothing(tmp_path, monkeypatch):
    notebook = execute(nbformat.read(ROOT / "sine_demo.ipynb", as_version=4), tmp_path, monkeypatch)
    assert all(cell.outputs for cell in notebook.cells if cell.cell_type == "code")
    assert list(tmp_path.iterdir()) == []  # nothing to the working folder


@pytest.mark.parametrize("name, images", [("sine_demo.ipynb", 9), ("exercises.ipynb", 0)])
def test_the_committed_notebooks_are_executed_without_errors_and_linked(name, images):
    notebook = json.loads((ROOT / name).read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    counts = [cell["execution_count"] for cell in code]
    assert code and counts == list(range(1, len(code) + 1)), f"commit {name} executed top to bottom"
    assert sum(bool(cell["outputs"]) for cell in code) >= len(code) / 2  # what a cell defines shows nothing
    assert not any(o.get("output_type") == "error" for cell in code for o in cell["outputs"])
    assert len([o for cell in code for o in cell["outputs"] if "image/png" in o.get("data", {})]) >= images
    assert name in (ROOT / "README.md").read_text()


@pytest.fixture(scope="session")  # once a worker, whatever order the tests run in
def released(tmp_path_factory):
    return release(tmp_path_factory.mktemp("release"))


def test_the_release_holds_no_answer_and_no_output(released):
    student = nbformat.read(released / "exercises.ipynb", as_version=4)
    key = nbformat.read(ROOT / "exercises.ipynb", as_version=4)
    text = "\n".join(cell.source for cell in student.cells)
    answers = "\n".join(cell.source for cell in key.cells).count("### BEGIN SOLUTION")
    assert "BEGIN SOLUTION" not in text and text.count("raise NotImplementedError()") == answers == 6
    assert text.count("# YOUR CODE HERE") == answers  # where the students write
    for cell in (c for c in student.cells if c.cell_type == "code"):
        ast.parse(cell.source)  # the stubs indented as our solutions were: no cell is a syntax error
    hidden = re.findall(r"### BEGIN HIDDEN TESTS\n(.*?)### END HIDDEN TESTS", "\n".join(c.source for c in key.cells),
                        re.S)
    assert hidden and "HIDDEN TESTS" not in text and not [line for part in hidden for line in part.splitlines()
                                                          if line.strip() and line.strip() in text]  # worked values
    assert not any(cell.get("outputs") or cell.get("execution_count") or "execution" in cell.metadata
               for cell in student.cells)  # no output, and no trace of when our copy ran
    answer = [c for c in key.cells if c.cell_type == "markdown" and c.metadata.get("nbgrader", {}).get("solution")]
    assert len(answer) == 1 and answer[0].source not in text and "YOUR ANSWER HERE" in text
    marked = [c for c in student.cells if "nbgrader" in c.metadata]
    checks = [c for c in marked if not c.metadata.nbgrader.get("solution")]  # checks and read-only cells
    assert len(checks) > len(graded(student)) and not any(c.metadata.editable for c in checks)
    assert not any(c.metadata.deletable for c in marked)  # nbgrader's locks: no check edited or deleted in Jupyter
    assert all(c.metadata.get("editable", True) for c in marked if c.metadata.nbgrader.get("solution"))  # answers
    assert sorted(p.name for p in released.iterdir()) == ["exercises.ipynb", "merge.py", "stacked.py"]
    assert (released / "stacked.py").read_text() == (ROOT / "stacked.py").read_text()  # exercise 5's trainer
    merge_py = (released / "merge.py").read_text()
    assert "import startup" not in merge_py and "import sine" not in merge_py  # no command of the whole project
    assert "--runs 50     # in the whole project, not this copy:" in merge_py
    assert merge_py.rstrip().endswith('sys.exit("this merge.py is the exercises\' copy: its command line is the whole '
                                      'project\'s")')
    intro = re.sub(r"\(.*?\)", "", key.cells[0].source, flags=re.S)  # (of which exercise 4's compress_mlp ...)
    stated = re.search(r"would give\s+the answers away:(.*?)raise", intro, re.S)
    assert sorted(re.findall(r"`(\w+)`", stated.group(1))) == sorted(EXERCISED)  # the stubs the students are told of
    stubs = {node.name: node for node in ast.parse(merge_py).body if isinstance(node, ast.FunctionDef)}
    for name in EXERCISED:  # no line of our solutions, no line of merge.py's functions they ask for
        assert f'raise NotImplementedError("exercise {EXERCISED[name]} of exercises.ipynb")' in merge_py
        assert len(stubs[name].body) == 2 and isinstance(stubs[name].body[1], ast.Raise)  # a docstring, a raise
    solutions = [line.strip() for cell in key.cells if cell.get("metadata", {}).get("nbgrader", {}).get("solution")
                 for line in cell.source.split("### BEGIN SOLUTION")[-1].split("### END SOLUTION")[0].splitlines()]
    assert not [line for line in solutions if len(line) > 20 and line in merge_py]
    project = (ROOT / "merge.py").read_text()
    answers = [ast.get_source_segment(project, node) for node in ast.parse(project).body
               if isinstance(node, ast.FunctionDef) and node.name in EXERCISED]
    bodies = {line.strip() for answer in answers for line in answer.splitlines()[1:] if len(line.strip()) > 12}
    assert not [line for line in merge_py.splitlines() if line.strip() in bodies]
    assert len(merge_py.splitlines()) < len(project.splitlines()) and "def make_big_student" in merge_py


def test_strip_solutions_indents_stubs_keeps_code_after_them_and_cuts_every_hidden_block():
    """strip_solutions on cells unlike the key's: a solution with code after it, two hidden blocks in one check
    (the visible line between them kept) and one at the very end of a check, as nbgrader's examples put them;
    hidden tests it cannot cut are refused, never released."""
    marks = dict(grade=False, solution=True, locked=False, grade_id="f", schema_version=3)
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n\n\n"
                                  "def g():\n    return 1", metadata={"nbgrader": marks}),
        nbformat.v4.new_code_cell("a = 1\n### BEGIN HIDDEN TESTS\nassert f(2) == 2\n### END HIDDEN TESTS\nb = 2\n"
                                  "if a:\n    ### BEGIN HIDDEN TESTS\n    assert f(3) == 3\n    ### END HIDDEN TESTS",
                                  metadata={"nbgrader": {**marks, "grade_id": "check_f", "grade": True,
                                                         "solution": False, "locked": True, "points": 1}}),
        nbformat.v4.new_markdown_cell("the answer", metadata={"nbgrader": {**marks, "grade_id": "answer"}}),
        nbformat.v4.new_markdown_cell("a text", metadata={"nbgrader": {**marks, "grade_id": "text", "solution": False,
                                                                       "locked": True}})])
    solution, check, answer, text = strip_solutions(notebook).cells
    namespace = {}
    exec(solution.source, namespace)  # the stub is indented as the solution was, and what follows it is kept
    with pytest.raises(NotImplementedError):
        namespace["f"](1)
    assert namespace["g"]() == 1 and "    # YOUR CODE HERE\n    raise NotImplementedError()" in solution.source
    assert "HIDDEN" not in check.source and "f(2)" not in check.source and "f(3)" not in check.source
    assert check.source.startswith("a = 1\nb = 2\nif a:")  # the visible lines between the hidden blocks stay
    assert (answer.source, text.source) == ("YOUR ANSWER HERE", "a text")
    assert solution.metadata.get("editable", True) and answer.metadata.get("editable", True)  # for the answers
    assert not any(c.metadata.deletable for c in (solution, check, answer, text))
    assert not check.metadata.editable and not text.metadata.editable
    assert cut_hidden_tests("a = 1\n# BEGIN HIDDEN TESTS\nassert f(2) == 2\n#  END HIDDEN TESTS  \r\nb = 2\n",
                            "check_f", check=True) == "a = 1\nb = 2\n"  # any marker nbgrader would find
    refused = {"a BEGIN without its END": ("### BEGIN HIDDEN TESTS\nassert f(2) == 2", check.metadata.nbgrader),
               "an END first": ("### END HIDDEN TESTS\n### BEGIN HIDDEN TESTS\n", check.metadata.nbgrader),
               "in an answer cell": ("### BEGIN HIDDEN TESTS\nx = 1\n### END HIDDEN TESTS", marks),
               "in a setup cell": ("### BEGIN HIDDEN TESTS\nx = 1\n### END HIDDEN TESTS",
                                   dict(marks, grade_id="setup", solution=False, locked=True))}
    for why_refused, (source, nbgrader) in refused.items():
        with pytest.raises(ValueError, match="would be shown"):  # refused, not a leak
            strip_solutions(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source, metadata={
                "nbgrader": nbgrader})]))
            pytest.fail(why_refused)


def test_the_release_refuses_a_folder_that_holds_files(tmp_path):
    """The repository above all: its exercises.ipynb and merge.py are the answer key, which the stubs would
    replace (a folder of the key's files stands in for it, so that a release that wrote would harm nothing)."""
    for name in ("exercises.ipynb", "merge.py"):
        (tmp_path / name).write_text(name)
    for folder in (tmp_path, tmp_path / "merge.py"):
        with pytest.raises(ValueError, match="not a new or empty folder"):
            release(folder)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"exercises.ipynb": "exercises.ipynb",
                                                                   "merge.py": "merge.py"}


# Wrong answers of the kinds students write, for each graded function: every one must fail its check.
CONCAT = """
k = len(weights)
if position == "first":
    return FIRST
if position == "last":
    return LAST
out, inp = weights[0].shape[:2]
big = weights[0].new_zeros(k * out, k * inp, *weights[0].shape[2:])
for i, w in enumerate(weights):
    big[i * out:(i + 1) * out, i * inp:(i + 1) * inp] = w
return MIDDLE
"""
PARTS = dict(FIRST="torch.cat(weights, 0)", LAST="torch.cat(weights, 1) / k", MIDDLE="big")


def concat(**wrong):
    text = CONCAT
    for place, code in {**PARTS, **wrong}.items():
        text = text.replace(place, code)
    return text

SCHEDULE = """
lam, lambdas = start, []
for _ in range(epochs):
    FIRST
    SECOND
return lambdas
"""
COMPRESS = """
student = merge.SineMLP(widths=big_student.hparams["widths"])
state, keep = big_student.state_dict(), KEEP
student.load_state_dict({"hidden.weight": state["hidden.weight"][keep], "hidden.bias": state["hidden.bias"][keep],
                         "out.weight": state["out.weight"][:, keep], "out.bias": OUT_BIAS})
return student
"""
WRONG = {
    "concat_weight": [
        concat(LAST="torch.cat(weights, 1)"),  # last: not divided by k
        concat(MIDDLE="big + 0.01"),  # middle: no zero blocks
        concat(FIRST="torch.cat(weights, 1)", LAST="torch.cat(weights, 0) / k"),  # the axes swapped
        concat(LAST="torch.cat(weights, 1) / 2"),  # k = 2 only
        concat(FIRST="torch.cat(weights[::-1], 0)"),  # teacher 1 first
        concat(MIDDLE="big.double()"),  # float64 whatever the teachers' dtype
        concat().replace("weights[0].new_zeros(", "torch.zeros("),  # the default dtype (and device), not theirs
    ],
    "p_open": [
        "return torch.sigmoid(loc)",  # the test-time s, not P[g > 0]
        "return torch.sigmoid(loc + merge.Gate.beta * torch.log(torch.tensor(-merge.Gate.gamma / merge.Gate.zeta)))",
        "return torch.sigmoid(loc - torch.log(torch.tensor(-merge.Gate.gamma / merge.Gate.zeta)))",  # no beta
        "return torch.sigmoid(loc + 1.6)",  # a shift fitted to how often the gate opens: the hidden values fail it
        "return torch.sigmoid(loc.detach() - merge.Gate.beta * torch.log(torch.tensor(-merge.Gate.gamma / "
        "merge.Gate.zeta)))",  # right values, no gradient
    ],
    "l_half": [
        "return (share - torch.cat(list(open_probs)).mean()) ** 2",  # one mean pooled over every layer
        "return sum((share - p.mean()).abs() for p in open_probs)",  # |.| for (.)^2
        "return sum(((share - p) ** 2).mean() for p in open_probs)",  # the mean of squares, unit by unit
        "return sum((share - p.mean()) ** 2 for p in open_probs) / len(open_probs)",  # a mean over layers
        "return torch.stack([(share - p.mean()) ** 2 for p in open_probs]).sum()",  # fails on a teacher's []
        "return torch.as_tensor(sum((share - p.detach().mean()) ** 2 for p in open_probs))",  # no gradient
    ],
    "lambda_schedule": [
        SCHEDULE.replace("FIRST", "lambdas.append(lam)").replace("SECOND", "lam += step * lam ** 0.5"),  # from start
        SCHEDULE.replace("FIRST", "lam += step * lam").replace("SECOND", "lambdas.append(lam)"),  # step lambda
        "return [start + step * (t + 1) for t in range(epochs)]",  # linear
    ],
    "compress_mlp": [
        COMPRESS.replace("KEEP", "keep").replace("OUT_BIAS", 'state["out.bias"] / big_student.hparams["k"]'),
        COMPRESS.replace("KEEP", 'torch.arange(big_student.hparams["widths"][0])').replace(  # the first units
            "OUT_BIAS", 'state["out.bias"]'),
        COMPRESS.replace("KEEP", "keep").replace("OUT_BIAS", 'state["out.bias"]').replace(  # inputs, not outputs
            '"out.weight": state["out.weight"][:, keep]', '"out.weight": state["out.weight"][:, :len(keep)]'),
        COMPRESS.replace("KEEP", "merge.top_units(big_student)[0]").replace(  # its own choice by loc, not keep
            "OUT_BIAS", 'state["out.bias"]'),
    ],
    "choose_units": [
        "return merge.top_units(big_student)",  # the paper's rule
        "return [g.loc.detach().sigmoid().topk(len(g.loc) // big_student.hparams['k']).indices.sort().values\n"
        "        for g, _, _ in big_student.unit_groups()]",  # the test-time value: loc's order again
        "return [torch.arange(len(g.loc) // big_student.hparams['k']) + len(g.loc) // 2 + 1\n"
        "        for g, _, _ in big_student.unit_groups()]",  # past the end of a group
        "return [torch.randperm(len(g.loc))[:len(g.loc) // big_student.hparams['k']]\n"
        "        for g, _, _ in big_student.unit_groups()]",  # not sorted
        "return [p[0].weight.detach().flatten(1).norm(dim=1).topk(p[0].weight.shape[0] // 2).indices.sort().values\n"
        "        for _, p, _ in big_student.unit_groups()]",  # half the units, whatever k
        "k = big_student.hparams['k']\n"
        "return [p[0].weight.detach().flatten(1).norm(dim=1).topk(p[0].weight.shape[0] // k).indices.sort().values\n"
        "        for _, p, _ in big_student.unit_groups()][:1]",  # the first unit group only
    ],
}

RIGHT = {  # answers other than ours that a check must pass: a schedule in float32; exercise 5's other rules
    "lambda_schedule": ["lam, lambdas = torch.tensor(start, dtype=torch.float32), []\n"
                        "for _ in range(epochs):\n"
                        "    lam = lam + step * torch.sqrt(lam)\n"
                        "    lambdas.append(lam.item())\n"
                        "return lambdas"],
    "choose_units": [
        # a rule that changes the big student it is given (the check and the experiment give it a copy)
        "merge.with_masks(big_student)  # the gates replaced by masks, in place\n"
        "k = big_student.hparams['k']\n"
        "return [p[0].weight.detach().flatten(1).norm(dim=1).topk(p[0].weight.shape[0] // k).indices.sort().values\n"
        "        for _, p, _ in big_student.unit_groups()]",
        # as many from each teacher by loc, a leftover place to the best unit left (its choice can be loc's)
        "k, keep = big_student.hparams['k'], []\n"
        "for gate, _, _ in big_student.unit_groups():\n"
        "    loc, w = gate.loc.detach(), len(gate.loc) // k\n"
        "    chosen = torch.cat([i * w + loc[i * w:(i + 1) * w].topk(w // k).indices for i in range(k)]).tolist()\n"
        "    rest = [u for u in loc.argsort(descending=True).tolist() if u not in chosen]\n"
        "    keep.append(torch.tensor(chosen + rest[:w - len(chosen)]).sort().values)\n"
        "return keep",
        # the better teacher's units whole, judged on the validation set with only its units open
        "k, groups = big_student.hparams['k'], big_student.unit_groups()\n"
        "saved, scores = [gate.loc.data.clone() for gate, _, _ in groups], []\n"
        "for i in range(k):\n"
        "    for gate, _, _ in groups:\n"
        "        w = len(gate.loc) // k\n"
        "        gate.loc.data = torch.full_like(gate.loc, -10.0)\n"
        "        gate.loc.data[i * w:(i + 1) * w] = 10.0\n"
        "    score = data.evaluate(big_student, 'val')\n"
        "    scores.append(score if data.metric == 'accuracy' else -score)\n"
        "for (gate, _, _), loc in zip(groups, saved):\n"
        "    gate.loc.data = loc\n"
        "best = max(range(k), key=scores.__getitem__)\n"
        "return [torch.arange(best * (len(g.loc) // k), (best + 1) * (len(g.loc) // k)) for g, _, _ in groups]",
    ],
}


@contextlib.contextmanager
def stubbed_merge(folder):
    """`import merge` gives the released merge.py while the checks run in this process."""
    spec = importlib.util.spec_from_file_location("merge", folder / "merge.py")
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:  # sys.modules as it was after: merge and stacked the project's
        patch.setitem(sys.modules, "merge", module)
        patch.delitem(sys.modules, "stacked", raising=False)  # a stacked imported here takes this merge
        spec.loader.exec_module(module)
        yield module


def run_check(cells, name, body):
    """Defines `name` with body (or our solution, body None) and runs its check: the error it raises, or None."""
    setup = next(c for c in cells if c.metadata.get("nbgrader", {}).get("grade_id") == "setup")
    solution = next(c for c in cells if c.metadata.get("nbgrader", {}).get("grade_id") == name)
    check = next(c for c in cells if c.metadata.get("nbgrader", {}).get("grade_id") == f"check_{name}")
    namespace = {}
    exec(setup.source, namespace)
    source = solution.source if body is None else re.sub(  # body in the place of our solution, indented as it
        r"^( *)### BEGIN SOLUTION.*### END SOLUTION", lambda m: textwrap.indent(body.strip("\n"), m.group(1)),
        solution.source, flags=re.S | re.M)
    exec(source, namespace)
    try:
        exec(check.source, namespace)
    except Exception as e:  # noqa: BLE001 - a failed check, whatever it raised
        return e
    return None


@pytest.mark.parametrize("name", WRONG)
def test_each_check_passes_our_solution_and_fails_stubs_and_wrong_answers(released, name, capsys):
    """Against the released merge.py (the function under test is a stub there, so no check can lean on it)."""
    cells = nbformat.read(ROOT / "exercises.ipynb", as_version=4).cells
    with stubbed_merge(released):
        assert run_check(cells, name, None) is None, f"our solution of {name} fails its check"
        for body in RIGHT.get(name, []):
            assert run_check(cells, name, body) is None, f"a right {name} fails its check: {body}"
        assert isinstance(run_check(cells, name, "raise NotImplementedError()"), NotImplementedError)
        for body in WRONG[name]:
            assert run_check(cells, name, body) is not None, f"a wrong {name} passes: {body}"
    capsys.readouterr()


def test_the_released_checks_pass_our_solutions_and_only_the_hidden_values_catch_a_fitted_shift(released):
    """The students' checks, their hidden tests cut out, still run and pass our solutions; a p_open with a shift
    fitted to how often the gate opens passes what the students see, and fails the graded check."""
    key = nbformat.read(ROOT / "exercises.ipynb", as_version=4).cells
    checks = {nbgrader_id(c): c for c in nbformat.read(released / "exercises.ipynb", as_version=4).cells
              if nbgrader_id(c, "").startswith("check_")}
    theirs = [checks.get(nbgrader_id(c), c) for c in key]  # our solutions, the students' checks
    with stubbed_merge(released):
        for name in WRONG:
            assert run_check(theirs, name, None) is None, f"our {name} fails the students' check"
        assert run_check(theirs, "p_open", "return torch.sigmoid(loc + 1.6)") is None
        assert run_check(key, "p_open", "return torch.sigmoid(loc + 1.6)") is not None


def test_grading_many_notebooks_prints_each_and_writes_one_csv_row_a_notebook(tmp_path, monkeypatch, capsys):
    points = {"a.ipynb": {"check_x": (2, 2, ""), "check_y": (0, 1, "AssertionError: no")},
              "b.ipynb": {"check_x": (1, 2, ""), "check_y": (1, 1, "")}}
    monkeypatch.setattr(sys.modules[__name__], "grade", lambda file, folder, timeout: (
        points[Path(file).name], ["l_half"] * (file == "b.ipynb")))
    key = nbformat.read(ROOT / "exercises.ipynb", as_version=4)
    for name in points:
        nbformat.write(key, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    grade_all(["a.ipynb", "b.ipynb"], "points.csv")
    out, err = capsys.readouterr()
    assert out.count("== ") == 2 and "check_y: 0 of 1 (AssertionError: no)" in out and out.count("Our answer") == 2
    assert "automatic points: 2 of 3;" in out and "b.ipynb has no cell 'l_half'" in err
    assert (tmp_path / "points.csv").read_text().splitlines() == [  # the most each column holds, then each file
        "file,check_x,check_y,automatic,written_answer", "(out of),2,1,3,3", "a.ipynb,2,0,2,", "b.ipynb,1,1,2,"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ipynb", "b.ipynb", "points.csv"]  # no .partial left


def test_a_key_without_the_written_answer_grades_without_its_column(tmp_path, monkeypatch, capsys):
    """An instructor's key with exercise 5's written answer taken out: no written_answer column, no line
    asking to grade it by hand, the automatic points as before."""
    key = nbformat.read(ROOT / "exercises.ipynb", as_version=4)
    key.cells = [cell for cell in key.cells if nbgrader_id(cell) != "answer_choose_units"]
    (tmp_path / "key").mkdir()
    nbformat.write(key, tmp_path / "key" / "exercises.ipynb")
    nbformat.write(key, tmp_path / "a.ipynb")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "key")
    monkeypatch.setattr(sys.modules[__name__], "grade", lambda file, folder, timeout: ({"check_x": (1, 2, "")}, []))
    monkeypatch.chdir(tmp_path)
    grade_all(["a.ipynb"], "points.csv")
    out = capsys.readouterr().out
    assert "automatic points: 1 of 2\n" in out and "written answer" not in out and "no answer cell" not in out
    assert (tmp_path / "points.csv").read_text().splitlines() == ["file,check_x,automatic", "(out of),2,2",
                                                                  "a.ipynb,1,1"]


def test_an_interrupted_grading_keeps_the_csv_rows_of_the_notebooks_graded_before(tmp_path, monkeypatch, capsys):
    """The CSV file is rewritten whole after each notebook: Ctrl-C while grading the second, or a write that
    fails halfway, leaves the first notebook's row as it was."""
    key = nbformat.read(ROOT / "exercises.ipynb", as_version=4)
    for name in ("a.ipynb", "b.ipynb"):
        nbformat.write(key, tmp_path / name)

    def interrupted(file, folder, timeout):
        if Path(file).name == "b.ipynb":
            raise KeyboardInterrupt
        return {"check_x": (2, 2, "")}, []

    monkeypatch.setattr(sys.modules[__name__], "grade", interrupted)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        grade_all(["a.ipynb", "b.ipynb"], "points.csv")
    assert (tmp_path / "points.csv").read_text().splitlines() == ["file,check_x,automatic,written_answer",
                                                                  "(out of),2,2,3", "a.ipynb,2,2,"]
    monkeypatch.setattr(sys.modules[__name__], "grade", lambda file, folder, timeout: ({"check_x": (1, 2, "")}, []))
    writes, original = [], csv.DictWriter.writerows

    def disk_full(self, rows):  # the second file's write fails after its header
        writes.append(rows)
        if len(writes) == 2:
            raise OSError("no space left on device")
        return original(self, rows)

    monkeypatch.setattr(csv.DictWriter, "writerows", disk_full)
    with pytest.raises(OSError):
        grade_all(["a.ipynb", "b.ipynb"], "again.csv")
    capsys.readouterr()
    assert (tmp_path / "again.csv").read_text().splitlines() == ["file,check_x,automatic,written_answer",
                                                                 "(out of),2,2,3", "a.ipynb,1,1,"]


def test_why_a_cell_failed_is_its_first_error_in_one_line_without_the_kernels_file_name():
    def cell(*errors):
        return nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output("stream", text="printed\n"), *(
            nbformat.v4.new_output("error", ename=name, evalue=value, traceback=[]) for name, value in errors)])

    assert why(cell()) == ""
    assert why(cell(("SyntaxError", "'(' was never closed (2795372471.py, line 2)"), ("NameError", "x"))) == \
        "SyntaxError: '(' was never closed (line 2)"
    assert why(cell(("AssertionError", "not the mean\nof 2 teachers"))) == "AssertionError: not the mean"
    assert why(cell(("NotImplementedError", ""))) == "NotImplementedError"
    assert why(cell(("KeyboardInterrupt", ""))) == "KeyboardInterrupt (interrupted: it ran too long)"
    assert why(cell(("RuntimeError", "Error(s) in loading state_dict for SineMLP:\n\n\tsize mismatch for hidden.weight: "
                     "copying a param with shape [8, 1]\n\tsize mismatch for out.weight"))) == "RuntimeError: Error(s) " \
        "in loading state_dict for SineMLP: size mismatch for hidden.weight: copying a param with shape [8, 1]"


class InProcessKernel:
    """NotebookClient's stand-in for grade(): runs the code cells here, one namespace, beside the handout's
    merge.py, and records each cell's error as a kernel's error output (ipykernel names a cell's file N.py)."""

    def __init__(self, notebook, km, timeout, interrupt_on_timeout, allow_errors, resources):
        self.notebook, self.folder = notebook, Path(resources["metadata"]["path"])

    def execute(self, cleanup_kc):
        assert os.environ.get("NBGRADER_EXECUTION") == "autograde", "graded as nbgrader autogrades: no experiment"
        namespace = {}
        with stubbed_merge(self.folder):
            for n, cell in enumerate(c for c in self.notebook.cells if c.cell_type == "code"):
                cell.outputs = []
                try:
                    exec(compile(cell.source, f"{4000 + n}.py", "exec"), namespace)
                except Exception as e:  # noqa: BLE001 - a cell's error, whatever it raised
                    cell.outputs = [nbformat.v4.new_output("error", ename=type(e).__name__, evalue=str(e),
                                                           traceback=[])]


def test_grading_puts_back_the_keys_checks_and_hidden_tests_and_keeps_the_students_answers_where_they_wrote_them(
        tmp_path, monkeypatch, capsys):
    """grade() with the kernel stood in for (the slow round trip runs a real one): a student's answers are graded
    by the key's checks, hidden tests and all, whatever the student did to a check; an answer written in a cell
    of their own below the stub counts, and so does a helper in a cell of their own, above the answer after a
    pasted copy of a check too; a deleted answer cell is missing and graded as the stub; the points of each check
    are the key's, whatever a cell's metadata says, and each check counts once."""
    monkeypatch.setattr(sys.modules[__name__], "NotebookClient", InProcessKernel)
    key = nbformat.read(ROOT / "exercises.ipynb", as_version=4)
    answers = {nbgrader_id(cell): cell.source for cell in key.cells}
    student = strip_solutions(nbformat.read(ROOT / "exercises.ipynb", as_version=4))
    cells = {nbgrader_id(cell): cell for cell in student.cells}
    # a copy of the answer cell (its grade id too) below the stub, holding the right answer: 2 points, as the
    # later cell wins in the student's kernel
    copied = nbformat.v4.new_code_cell(answers["concat_weight"], metadata=cells["concat_weight"].metadata)
    # a p_open fitted to how often the gate opens (only the hidden values catch it), its check emptied and
    # worth 9 points by its metadata; below it two cells of the student's own that raise
    cells["p_open"].source = "def p_open(loc):\n    return torch.sigmoid(loc + 1.6)"
    cells["check_p_open"].source = "pass"
    cells["check_p_open"].metadata.nbgrader.points = 9
    cells["p_open"].metadata.nbgrader.update(grade=True, points=9)  # an answer cell made a check: no points
    own = [nbformat.v4.new_code_cell("print(p_open(torch.zeros(1))"), nbformat.v4.new_code_cell("1 / 0")]
    # lambda_schedule through a helper of their own, in a cell above it after a copy of its check (grade id and
    # all); compress_mlp left a stub in its cell and written in a cell of their own below it; l_half's answer
    # cell deleted
    pasted = nbformat.v4.new_code_cell(cells["check_lambda_schedule"].source,
                                       metadata=cells["check_lambda_schedule"].metadata)
    helper = nbformat.v4.new_code_cell("def grow(lam, step):\n    return lam + step * lam ** 0.5")
    cells["lambda_schedule"].source = ("def lambda_schedule(epochs, start, step):\n    lambdas = [grow(start, step)]\n"
                                       "    while len(lambdas) < epochs:\n"
                                       "        lambdas.append(grow(lambdas[-1], step))\n"
                                       "    return lambdas[:epochs]")
    below = nbformat.v4.new_code_cell(answers["compress_mlp"].replace("### BEGIN SOLUTION", "").replace(
        "### END SOLUTION", ""))
    placed = {"concat_weight": [copied], "p_open": own, "compress_mlp": [below]}  # after those cells
    student.cells = [c for cell in student.cells if nbgrader_id(cell) != "l_half"
                     for c in ([pasted, helper] if nbgrader_id(cell) == "lambda_schedule" else []) +
                     [cell, *placed.get(nbgrader_id(cell), [])]]
    nbformat.write(student, tmp_path / "returned.ipynb")
    points, missing = grade(tmp_path / "returned.ipynb", tmp_path / "scratch")
    capsys.readouterr()
    assert missing == ["l_half"]
    assert {check: got[:2] for check, got in points.items()} == {
        "check_concat_weight": (2, 2), "check_p_open": (0, 2), "check_l_half": (0, 2), "check_lambda_schedule": (2, 2),
        "check_compress_mlp": (3, 3), "check_choose_units": (0, 1)}
    assert points["check_p_open"][2].startswith("AssertionError: P[g > 0] at loc")  # the hidden values, put back
    assert points["check_p_open"][2].endswith("; a cell of the student's own above it raised SyntaxError: '(' was "
                                              "never closed (line 1)")  # the first error since the check before
    assert points["check_l_half"][2] == points["check_choose_units"][2] == "unanswered: its answer cell is as " \
        "released"  # l_half's deleted, choose_units' left a stub: no error of the cells above the check before


def test_a_failed_check_names_a_pasted_copy_that_raised_and_an_answer_that_calls_another_exercises_stub(
        tmp_path, monkeypatch, capsys):
    """Exercise 1 answered wrongly below a pasted copy of its check, which raised: its check says so, naming the
    copy; exercise 5 answered with a rule that calls p_open, left as released: a NotImplementedError, not
    'unanswered'; the others, left as released (an empty cell of their own below one too), are unanswered."""
    monkeypatch.setattr(sys.modules[__name__], "NotebookClient", InProcessKernel)
    student = strip_solutions(nbformat.read(ROOT / "exercises.ipynb", as_version=4))
    cells = {nbgrader_id(cell): cell for cell in student.cells}
    cells["concat_weight"].source = WRONG["concat_weight"][0]
    cells["choose_units"].source = "def choose_units(big_student, seed):\n    return p_open(torch.zeros(4)).argsort()"
    pasted = nbformat.v4.new_code_cell(cells["check_concat_weight"].source,
                                       metadata=cells["check_concat_weight"].metadata)
    empty = nbformat.v4.new_code_cell("")  # left under l_half's stub: it stays unanswered
    student.cells = [c for cell in student.cells for c in ([pasted] if cell is cells["concat_weight"] else []) + [cell]
                     + ([empty] if cell is cells["l_half"] else [])]
    nbformat.write(student, tmp_path / "returned.ipynb")
    points, _ = grade(tmp_path / "returned.ipynb", tmp_path / "scratch")
    assert points["check_concat_weight"][:2] == (0, 2) and points["check_concat_weight"][2].endswith(
        "; a copy of 'check_concat_weight' above it raised NameError: name 'concat_weight' is not defined")
    assert points["check_choose_units"] == (0, 1, "NotImplementedError (a stub's raise NotImplementedError() left in "
                                                  "an answer?)")
    assert {points[check][2] for check in ("check_p_open", "check_l_half", "check_lambda_schedule",
                                           "check_compress_mlp")} == {"unanswered: its answer cell is as released"}


def test_an_instructors_cells_without_nbgrader_marks_are_released_and_graded_as_the_students(tmp_path, monkeypatch,
                                                                                            capsys):
    """A key with a note and a code cell of the instructor's, unmarked (nbgrader leaves them to the students):
    released as they are, and graded where the student's copy has them, once, without a crash."""
    key = nbformat.read(ROOT / "exercises.ipynb", as_version=4)
    key.cells[1:1] = [nbformat.v4.new_markdown_cell("Due on Friday."), nbformat.v4.new_code_cell("note = 1")]
    for name in ("merge.py", "stacked.py"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    nbformat.write(key, tmp_path / "exercises.ipynb")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)  # the instructor's key
    monkeypatch.setattr(sys.modules[__name__], "NotebookClient", InProcessKernel)
    student = nbformat.read(release(tmp_path / "handout") / "exercises.ipynb", as_version=4)
    assert [c.source for c in student.cells[1:3]] == ["Due on Friday.", "note = 1"]
    answers = {nbgrader_id(cell): cell.source for cell in key.cells}
    student.cells[2].source = "note = 2  # the student's"
    next(c for c in student.cells if nbgrader_id(c) == "concat_weight").source = answers["concat_weight"]
    nbformat.write(student, tmp_path / "returned.ipynb")
    points, missing = grade(tmp_path / "returned.ipynb", tmp_path / "scratch")
    capsys.readouterr()
    assert missing == [] and points["check_concat_weight"][:2] == (2, 2)
    assert sum(got for got, _, _ in points.values()) == 2


@pytest.mark.slow
def test_the_answer_key_passes_and_the_students_copy_fails_in_a_kernel_with_the_released_merge(released, tmp_path,
                                                                                               monkeypatch, capfd):
    """The round trip nbgrader makes: our solutions (the source) score every point, the release none, both
    run in a fresh kernel beside the released merge.py."""
    key = execute(nbformat.read(ROOT / "exercises.ipynb", as_version=4), tmp_path, monkeypatch, path=released)
    assert len(graded(key)) == 7 and sum(c.metadata.nbgrader.points for c in graded(key)) == 15
    assert not any(failed(c) for c in key.cells if c.cell_type == "code")
    printed = "".join(o.get("text", "") for c in key.cells for o in c.get("outputs", []))
    assert "| yours |" in printed  # the experiment ran, at its tiny budget
    # Grading a returned copy (--grade): a student who answered exercise 1 alone, left a syntax error in 2a's
    # answer and deleted its check, gets exercise 1's 2 points; the key's checks run again, whatever was done to
    # them, and a check that fails after an answer raised says what that answer raised.
    student = nbformat.read(released / "exercises.ipynb", as_version=4)
    answers = {nbgrader_id(cell): cell for cell in nbformat.read(ROOT / "exercises.ipynb", as_version=4).cells}
    student.cells = [answers["concat_weight"] if nbgrader_id(cell) == "concat_weight" else cell
                     for cell in student.cells if nbgrader_id(cell) != "check_p_open"]
    # ... a schedule that never returns is interrupted and fails alone, and an l_half pasted into a cell
    # without its grade id is said to be missing and counts as unanswered.
    endless = next(cell for cell in student.cells if nbgrader_id(cell) == "lambda_schedule")
    endless.source = "def lambda_schedule(epochs, start, step):\n    while True:\n        pass"
    broken = next(cell for cell in student.cells if nbgrader_id(cell) == "p_open")  # a syntax error: --grade says so
    broken.source = "def p_open(loc):\n    return (loc"
    pasted = next(cell for cell in student.cells if nbgrader_id(cell) == "l_half")
    pasted.source, pasted.metadata = answers["l_half"].source, {}
    nbformat.write(student, tmp_path / "returned.ipynb")
    capfd.readouterr()
    managers = []

    class Managed(AsyncKernelManager):  # each grading kernel's manager, to see it shut down after its notebook
        def __init__(self, **settings):
            super().__init__(**settings)
            managers.append(self)
    monkeypatch.setattr(sys.modules[__name__], "AsyncKernelManager", Managed)
    [(_, points, missing)] = grade_all([tmp_path / "returned.ipynb"], tmp_path / "points.csv", timeout=10)
    assert len(managers) == 1 and not managers[0].has_kernel  # no kernel left running
    printed, err = capfd.readouterr()  # --grade's printout: each check, the total, the written answer
    assert "TCP" not in err  # the kernel's warning of plain TCP: the grading kernel talks over files
    assert "check_concat_weight: 2 of 2\n" in printed and "automatic points: 2 of 12;" in printed
    assert printed.rstrip().endswith("    YOUR ANSWER HERE")  # the student's written answer, for the grader
    with open(tmp_path / "points.csv") as f:
        assert list(csv.DictReader(f)) == [
            {"file": "(out of)", "automatic": "12", "written_answer": "3",
             **{check: str(most) for check, (_, most, _) in points.items()}},
            {"file": str(tmp_path / "returned.ipynb"), "automatic": "2", "written_answer": "",
             **{check: str(got) for check, (got, _, _) in points.items()}}]
    assert len(points) == 6 and points["check_concat_weight"] == (2, 2, "")
    assert points["check_p_open"][:2] == (0, 2) and points["check_p_open"][2].startswith("NameError: ")
    assert "; the answer cell 'p_open' above it raised SyntaxError" in points["check_p_open"][2]
    assert ".py, line" not in points["check_p_open"][2]  # (line 2), not the kernel's scratch file's name
    assert "raised" not in points["check_l_half"][2]  # the stub above it raises when called, in the check
    assert points["check_lambda_schedule"][:2] == (0, 2) and "interrupted" in points["check_lambda_schedule"][2]
    assert points["check_l_half"][:2] == (0, 2) and missing == ["l_half"]
    assert sum(p[0] for p in points.values()) == 2 and sum(p[1] for p in points.values()) == 12


def test_the_reference_table_of_exercise_5_is_what_the_committed_run_printed():
    notebook = nbformat.read(ROOT / "exercises.ipynb", as_version=4)
    experiment = next(c for c in notebook.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "experiment")
    text = next(c for c in notebook.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "ex5_experiment_text")
    printed = "".join(o.get("text", "") for o in experiment.outputs)
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == 5 and "\n".join(table[:4]) in text.source  # header, loc and random: what a run repeats
    assert table[4].startswith("| yours |") and table[4] not in text.source  # our rule's row would be an answer
    seconds = re.search(r"\n(\d+) s\n", printed).group(1)
    intro = notebook.cells[0].source
    assert f"about {seconds} s" in intro.replace("\n", " "), "the time in the introduction is the one printed"


KEY = str(ROOT / "exercises.ipynb")


@pytest.mark.parametrize("argv", [[], ["--release", "a_file"], ["--release", "a_file/inside"],
                                  ["--grade", "missing.ipynb"], ["--grade", "a_file"], ["--grade", "."],
                                  ["--grade", KEY, "a_file"], ["--release", "new", "--csv", "points.csv"],
                                  ["--grade", KEY, "--csv", "no/such/folder.csv"], ["--grade", KEY, "--csv", "."],
                                  ["--grade", "a_file", "--csv", "a_file"], ["--grade", KEY, "--csv", KEY],
                                  ["--release", ""], ["--grade", KEY, "--csv", ""],
                                  ["--grade", KEY, "--csv", "another.ipynb"]])  # never written over a notebook
def test_bad_input_to_the_release_and_grading_commands_is_one_line_and_exit_2(tmp_path, argv):
    (tmp_path / "a_file").write_text("not a notebook")
    done = subprocess.run([sys.executable, str(ROOT / "test_notebooks.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written


def nbgrader_id(cell, default=None):
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", default)


def grade(submission, folder, timeout=60):
    """The automatic points of a returned exercises notebook, as nbgrader's autograde gives them. The answer
    key's locked cells (setup, texts, checks) replace the student's, by grade id; the student's solution cells
    and cells of their own stay where they were (of a cell there twice, the last copy; an earlier one is theirs).
    It runs in a fresh kernel in folder, beside the released merge.py and stacked.py, exercise 5's experiment
    skipped; a cell running past timeout seconds is interrupted and fails. Returns {check: (points, out of, why
    it failed or "")}, where a failed check's why adds the first error of the cells run since the check before
    (a student's answer that raised), or says it is unanswered (its answer cell as released), and the solution
    cells the submission lacks (an answer pasted into a fresh notebook loses its grade id), graded as released."""
    key = nbformat.read(ROOT / "exercises.ipynb", as_version=4)
    theirs, after, last = {}, {}, None
    submitted = nbformat.read(submission, as_version=4).cells
    final = {nbgrader_id(cell): n for n, cell in enumerate(submitted)}  # a cell pasted twice: its last copy
    for n, cell in enumerate(submitted):
        if nbgrader_id(cell) and final[nbgrader_id(cell)] == n:
            theirs[last := nbgrader_id(cell)] = cell
        else:  # a cell of their own (or an earlier copy of a labelled one, now theirs), after the labelled one before
            if nbgrader_id(cell):  # an earlier copy: named as such where it raised
                cell.metadata["copy_of"] = cell.metadata.pop("nbgrader")["grade_id"]
            after.setdefault(last, []).append(cell)
    stubs = {nbgrader_id(cell): cell
             for cell in strip_solutions(nbformat.read(ROOT / "exercises.ipynb", as_version=4)).cells}
    marks = {nbgrader_id(cell): cell.metadata.get("nbgrader", {}) for cell in key.cells}  # its checks, their points
    cells = list(after.get(None, []))
    for cell in key.cells:
        if not nbgrader_id(cell):  # a cell nbgrader does not mark (a note of the instructor's) is the student's:
            continue  # their copy of it comes with their own cells
        locked = cell.metadata.nbgrader.get("locked")
        cells += [cell if locked else theirs.get(nbgrader_id(cell), stubs[nbgrader_id(cell)]),
                  *after.get(nbgrader_id(cell), [])]
    key.cells = cells
    released = release(Path(folder) / "handout")
    with contextlib.ExitStack() as stack:
        monkeypatch = stack.enter_context(pytest.MonkeyPatch.context())
        monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")  # exercise 5's experiment skips itself
        monkeypatch.setenv("PYTHONPATH", str(released))
        # the kernel talks over files in folder where it can (not TCP, of which ipykernel warns at each start)
        kernel = AsyncKernelManager(kernel_name="python3", **{"transport": "ipc", "ip": str(Path(folder) / "kernel")}
                               if os.name == "posix" else {})
        NotebookClient(key, km=kernel, timeout=timeout, interrupt_on_timeout=True, allow_errors=True,
                       resources={"metadata": {"path": str(released)}}).execute(cleanup_kc=True)  # then shut down
    missing = [i for i, cell in stubs.items() if cell.metadata.get("nbgrader", {}).get("solution") and i not in theirs]
    points, above = {}, ""  # above: the first error of a cell run since the last check (a student's answer, say)
    answered = True  # whether the last answer cell is other than the released stub
    for cell in (c for c in key.cells if c.cell_type == "code"):
        check = marks.get(nbgrader_id(cell), {})  # not what a student's cell says of itself (edited metadata)
        if check.get("solution"):
            answered = cell.source.strip() != stubs[nbgrader_id(cell)].source.strip()
        elif not nbgrader_id(cell) and cell.source.strip():  # a cell of their own: maybe the answer, written
            answered = True  # below the stub (an empty one is not)
        if not check.get("grade"):
            name = (f"the answer cell {nbgrader_id(cell)!r}" if nbgrader_id(cell) else
                    f"a copy of {cell.metadata['copy_of']!r}" if "copy_of" in cell.metadata else
                    "a cell of the student's own")
            above = above or (why(cell) and f"{name} above it raised {why(cell)}")
            continue
        reason = why(cell) + (f"; {above}" if failed(cell) and above else "")
        if failed(cell) and not answered:  # the stub raised in the check
            reason = "unanswered: its answer cell is as released"
        elif reason.startswith("NotImplementedError"):
            reason += " (a stub's raise NotImplementedError() left in an answer?)"
        points[nbgrader_id(cell)], above = (0 if failed(cell) else check.points, check.points, reason), ""
    return points, missing


def why(cell):
    """The error a cell ended with, in one line ("" if none): a check's message says what it found wrong; a first
    line that ends in ":" gets its next (torch's "Error(s) in loading state_dict ...:" and which sizes differ)."""
    errors = [o for o in cell.outputs if o.get("output_type") == "error"]
    if not errors:
        return ""
    name, value = errors[0].get("ename", ""), [line.strip() for line in errors[0].get("evalue", "").splitlines()]
    value = [re.sub(r"\(\d+\.py, (line \d+)\)", r"(\1)", line) for line in value if line]  # not the kernel's file
    first = " ".join(value[:2]) if value[:1] and value[0].endswith(":") else " ".join(value[:1])
    return (f"{name}: {first}" if value else name)[:200] + (" (interrupted: it ran too long)"
                                                            if name == "KeyboardInterrupt" else "")


def grade_all(files, csv_path=None, timeout=60):
    """--grade: each file graded in turn (grade), its points printed and then its written answer of exercise 5,
    which is graded by hand; with csv_path, a row of the most points each column can hold, then one row a file
    (each check's points, their sum, an empty column for the written answer), the CSV file written whole after
    each file, so an interrupted grading keeps the files done. Returns [(file, points, missing)]."""
    graded_files, rows = [], []
    written = next((cell.metadata.nbgrader.get("points", 0) for cell in nbformat.read(
        ROOT / "exercises.ipynb", as_version=4).cells if nbgrader_id(cell) == "answer_choose_units"), None)
    column = (lambda value: {} if written is None else {"written_answer": value})  # None: a key without one
    for file in files:
        with tempfile.TemporaryDirectory() as scratch:
            points, missing = grade(file, scratch, timeout)
        graded_files.append((file, points, missing))
        if len(files) > 1:
            print(f"== {file}")
        for cell in missing:
            print(f"warning: {file} has no cell {cell!r} (nbgrader's grade id lost, say by pasting into a fresh "
                  "notebook?): graded as unanswered", file=sys.stderr)
        for check, (got, most, reason) in points.items():
            print(f"{check}: {got} of {most}" + (f" ({reason})" if reason else ""))
        total = sum(p[0] for p in points.values())
        print(f"automatic points: {total} of {sum(p[1] for p in points.values())}" + ("" if written is None else
              f"; the written answer of exercise 5 ({written} points) is graded by hand "
              "(the rubric: docs/teaching.md):"))
        answer = [c.source for c in nbformat.read(file, as_version=4).cells if nbgrader_id(c) == "answer_choose_units"]
        if written is not None:  # the last copy, as grade() takes a cell pasted twice
            print(textwrap.indent(answer[-1].strip() if answer else "(no answer cell found)", "    "))
        if not rows:  # the first row: the most each column can hold
            rows.append({"file": "(out of)", **{check: most for check, (_, most, _) in points.items()},
                         "automatic": sum(p[1] for p in points.values()), **column(written)})
        rows.append({"file": str(file), **{check: got for check, (got, _, _) in points.items()}, "automatic": total,
                     **column("")})  # exercise 5's written answer: the grader's to fill in
        if csv_path:  # written whole: a temporary file, then renamed
            partial = Path(f"{csv_path}.partial")
            with open(partial, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            partial.replace(csv_path)
    return graded_files


if __name__ == "__main__":  # python test_notebooks.py --release DIR, or --grade FILE... [--csv OUT]
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: sys.exit(print(f"error: {message}", file=sys.stderr) or 2)  # one line
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--release", metavar="DIR", help="write the students' copy into DIR, a new or empty folder")
    task.add_argument("--grade", metavar="FILE", nargs="+",
                      help="the automatic points of each FILE, a returned exercises notebook, and its written answer")
    parser.add_argument("--csv", metavar="OUT", help="with --grade: every file's points also written to OUT, "
                        "a CSV file")
    args = parser.parse_args()
    for flag, value in (("--release", args.release), ("--csv", args.csv), *(("--grade", f) for f in args.grade or ())):
        if value == "":
            parser.error(f"{flag} names nothing: give a path")
    if args.csv is not None and args.grade is None:
        parser.error("--csv goes with --grade")
    if args.release is not None:
        try:
            print(f"wrote {release(args.release)}: exercises.ipynb, merge.py and stacked.py, for the students")
        except ValueError as e:
            parser.error(str(e))
        except OSError as e:
            parser.error(f"cannot write the release into {args.release} ({e.strerror or e})")
    else:
        for file in args.grade:  # every file checked before any is graded
            try:
                nbformat.read(file, as_version=4)
            except Exception as e:  # noqa: BLE001 - any file that is not a notebook: one line
                parser.error(f"--grade {file}: cannot read it as a notebook ({type(e).__name__})")
        if args.csv is not None:  # a file it can write, and none of the notebooks it grades
            out = Path(args.csv)
            if out.is_dir() or not out.resolve().parent.is_dir() or out.suffix == ".ipynb" or \
                    any(out.resolve() == Path(file).resolve() for file in args.grade):
                parser.error(f"--csv {args.csv}: give a CSV file in an existing folder, not a notebook")
            try:
                Path(f"{out}.partial").open("w").close()
                Path(f"{out}.partial").unlink()
            except OSError as e:
                parser.error(f"--csv {args.csv}: cannot write there ({e.strerror or e})")
        try:
            strip_solutions(nbformat.read(ROOT / "exercises.ipynb", as_version=4))  # the key's checks, put back
        except ValueError as e:
            parser.error(f"the answer key exercises.ipynb: {e}")
        grade_all(args.grade, args.csv)
