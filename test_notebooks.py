"""Tests for the notebooks: sine_demo.ipynb and exercises.ipynb run top to bottom in a fresh
kernel (at a tiny budget), are committed executed, and the exercises' checks pass with our
solutions and fail, every one, with the solutions stripped as nbgrader strips them.

    python test_notebooks.py exercises.ipynb release.ipynb    # the students' copy, without nbgrader
"""
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parent


def strip_solutions(notebook):
    """What nbgrader's ClearSolutions does: the code between ### BEGIN SOLUTION and ### END
    SOLUTION of each solution cell becomes a stub that raises NotImplementedError."""
    for cell in notebook.cells:
        if cell.get("metadata", {}).get("nbgrader", {}).get("solution"):
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
    return notebook


def execute(notebook, tmp_path, monkeypatch, allow_errors=False):
    """The notebook run in a fresh kernel from a clean state, at its tiny budget, in tmp_path."""
    monkeypatch.setenv("NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(notebook, timeout=600, kernel_name="python3", allow_errors=allow_errors,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a cell's error
    return notebook


def checks(notebook):
    return [c for c in notebook.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade")]


def failed(cell):
    return any(o.get("output_type") == "error" for o in cell.outputs)


def test_the_demo_runs_top_to_bottom_in_a_fresh_kernel_and_writes_nothing(tmp_path, monkeypatch):
    notebook = execute(nbformat.read(ROOT / "sine_demo.ipynb", as_version=4), tmp_path, monkeypatch)
    assert all(cell.outputs for cell in notebook.cells if cell.cell_type == "code")
    assert list(tmp_path.iterdir()) == []  # phases go to a temporary folder, nothing to the working folder


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


def test_every_exercise_check_passes_with_our_solutions(tmp_path, monkeypatch):
    notebook = execute(nbformat.read(ROOT / "exercises.ipynb", as_version=4), tmp_path, monkeypatch)
    graded = checks(notebook)
    assert len(graded) == 5 and sum(c.metadata.nbgrader.points for c in graded) == 12
    assert all("passed" in "".join(o.get("text", "") for o in c.outputs) or "valid" in
               "".join(o.get("text", "") for o in c.outputs) for c in graded)


def test_every_exercise_check_fails_with_the_solutions_stripped(tmp_path, monkeypatch):
    """Graders that cannot fail are worthless: each check must fail on the stubs nbgrader leaves."""
    notebook = strip_solutions(nbformat.read(ROOT / "exercises.ipynb", as_version=4))
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert "### BEGIN SOLUTION" not in code and code.count("raise NotImplementedError()") == 6
    notebook = execute(notebook, tmp_path, monkeypatch, allow_errors=True)
    graded = checks(notebook)
    assert len(graded) == 5 and all(failed(cell) for cell in graded)


def test_the_reference_table_of_exercise_5_is_what_the_committed_run_printed():
    notebook = nbformat.read(ROOT / "exercises.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for o in notebook.cells[-1].outputs)
    table = "\n".join(line for line in printed.splitlines() if line.startswith("|"))
    assert table.count("\n") == 4 and table in notebook.cells[-2].source


if __name__ == "__main__":  # python test_notebooks.py exercises.ipynb release.ipynb
    nbformat.write(strip_solutions(nbformat.read(sys.argv[1], as_version=4)), sys.argv[2])
