"""The house rules of docs/ARCHITECTURE.md that a machine can check, by reading the source (no imports run)."""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hdml_tf"
TOOLS = ROOT / "tools"

#: Floors of docs/ARCHITECTURE.md: a module's MODULE-LEVEL imports of hdml_tf stay on its floor or below.
FLOORS = {
    0: ("config", "errors", "atomic", "progress", "statistics"),
    1: ("losses", "hardness", "layouts", "running_mean", "generator", "data", "variants"),
    2: ("model", "distribute", "backbones", "evaluation", "serving"),
    3: ("rundir", "retrieval", "checkpointing", "callbacks", "benchmarking", "paper", "training_progress",
        "run_summary", "diagnostics", "run_record"),
    4: ("experiment", "comparison"),
}
FLOOR_OF = {name: floor for floor, names in FLOORS.items() for name in names}


def _module_name(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: pathlib.Path, module_level_only: bool):
    """Absolute module names imported by a file (relative imports resolved), with their line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _top(module: str) -> str:
    """'hdml_tf.data.sampler' -> 'data'; 'hdml_tf.model' -> 'model'."""
    return module.split(".")[1]


LIBRARY = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: _module_name(p))
def test_module_level_imports_never_go_up_a_floor(path):
    name = _module_name(path)
    if name in ("hdml_tf.__init__",):
        return  # the public API re-exports every floor, lazily
    own = FLOOR_OF[_top(name)]
    upward = [(m, line) for m, line in _imports(path, module_level_only=True)
              if m.startswith("hdml_tf.") and _top(m) in FLOOR_OF and FLOOR_OF[_top(m)] > own]
    assert not upward, f"{name} (floor {own}) imports upward: {upward}"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: _module_name(p))
def test_the_library_never_reads_flags(path):
    bad = [(m, line) for m, line in _imports(path, module_level_only=False) if m in ("absl.flags", "absl.app")]
    assert not bad, f"{_module_name(path)} imports {bad}: only tools parse flags"


@pytest.mark.parametrize("name", ["serving", "losses", "hardness", "layouts", "data"])
def test_low_floors_never_import_the_training_model_or_the_run(name):
    paths = sorted((PACKAGE / name).rglob("*.py")) if (PACKAGE / name).is_dir() else [PACKAGE / f"{name}.py"]
    for path in paths:
        bad = [(m, line) for m, line in _imports(path, module_level_only=False)
               if m.startswith(("hdml_tf.model", "hdml_tf.experiment", "hdml_tf.rundir"))]
        assert not bad, f"{_module_name(path)} imports {bad} (even lazily): it sits below the model"


def test_data_does_not_import_the_methods_config():
    for path in sorted((PACKAGE / "data").rglob("*.py")):
        bad = [(m, line) for m, line in _imports(path, module_level_only=False) if m.startswith("hdml_tf.config")]
        assert not bad, f"{_module_name(path)} imports {bad}; data/ asks hdml_tf.layouts / errors instead"


def test_no_tool_imports_another_tool():
    tools = {p.stem for p in TOOLS.glob("*.py")} - {"common_flags"}
    for path in sorted(TOOLS.glob("*.py")):
        bad = [(m, line) for m, line in _imports(path, module_level_only=False) if m.split(".")[0] in tools]
        assert not bad, f"tools/{path.name} imports another tool: {bad}"


def test_the_layout_table_lives_only_in_layouts():
    table = re.compile(r"""["'](npair|triplet|contrastive)["']\s*:\s*[234]\b""")
    for path in sorted(list(PACKAGE.rglob("*.py")) + list(TOOLS.glob("*.py")) + list(ROOT.glob("tests/*.py"))):
        if path.name in ("layouts.py", "test_architecture.py"):
            continue
        hits = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if table.search(line)]
        assert not hits, f"{path.relative_to(ROOT)} lines {hits} spell a tuple size; ask hdml_tf.layouts"
