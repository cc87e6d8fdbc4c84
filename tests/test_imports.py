"""Data flows one way: nothing below the launcher imports back up to it, and no module imports itself round.

Every `import` statement of `mmflow` and `hydra_plugins` is read with `ast` (module level and inside
functions alike: a lazy import is still a dependency), so the test needs no import side effects and
fails listing the offending edges. Imports under `if TYPE_CHECKING:` count too, for the direction and
for cycles: they never run, but they still tie the modules together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmflow", "hydra_plugins")
# What shows results or drives runs: the launcher, the sweep core, the report, the W&B logger, CLIs.
UPPER = (
    "hydra_plugins",
    "mmflow.sweep",
    "mmflow.report",
    "mmflow.wandb_logger",
    "mmflow.cli",
    "mmflow.bench",  # the benchmark and GPU-check CLIs; nothing below imports them
    "mmflow.__main__",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "conf" not in path.relative_to(ROOT).parts:
                found[module_name(path)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (the deepest known module of each imported name)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base_pkg = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base_pkg}.{base}" if base else base_pkg
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def is_upper(name: str) -> bool:
    return any(name == u or name.startswith(u + ".") for u in UPPER)


def test_the_walk_sees_the_project():
    edges = graph()
    assert {
        "mmflow.execution.runtime",
        "mmflow.execution.cell",
        "mmflow.analyses.base",
        "mmflow.models.registry",
    } <= set(edges)
    assert (
        "mmflow.analyses.base" in edges["mmflow.execution.cell"]
        or "mmflow.analyses" in edges["mmflow.execution.cell"]
    )
    assert {"mmflow.storage.store", "mmflow.execution.cell"} <= edges["mmflow.execution.runtime"]
    assert (
        "mmflow.execution.runtime" not in edges["mmflow.execution.cell"]
    )  # the lifecycle never drives the batch


def test_nothing_below_imports_the_launcher_sweep_report_or_logger():
    bad = sorted(
        f"{a} -> {b}" for a, targets in graph().items() if not is_upper(a) for b in targets if is_upper(b)
    )
    assert not bad, "imports up the data flow:\n" + "\n".join(bad)


def test_no_import_cycle():
    edges = graph()  # type-only imports included
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("analysis", ["knockout", "answer_tracking", "patching", "attribution"])
def test_resolving_and_planning_cells_does_not_import_transformers(analysis: str, tmp_path: Path) -> None:
    """The sweep driver resolves, ids and plans every cell before any worker starts: it needs the
    analyses' config rules, not the model code (importing transformers costs seconds per launch)."""
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from mmflow.cli import cell_config\n"
        "from mmflow.storage.store import cell_id\n"
        "from mmflow.config.dirs import CONF_DIR\n"
        "with initialize_config_dir(config_dir=str(CONF_DIR), version_base='1.3'):\n"
        f"    cfg = compose('config', overrides=['analysis={analysis}', 'results_dir={tmp_path}'])\n"
        "from mmflow.sweep.plan import plan_models\n"
        "from mmflow.sweep.settings import SweepSettings\n"
        "cell = cell_config(cfg)\n"
        "(plan,) = plan_models({cell_id(cell): cell}, SweepSettings())\n"
        "print(plan.queue[0].cell_ids[0], 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cell, imported = out.stdout.split()
    assert len(cell) == 16 and imported == "False"
