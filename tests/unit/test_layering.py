"""The import structure of sd_train/: one layering rule, imports only downward, no cycles, and no
function-local imports except the deliberately lazy heavy ones. Read from the source with `ast`, so
an import hidden inside a function counts as much as one at the top of a file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "sd_train").is_dir()) / "sd_train"

# Top to bottom. A module may import its own layer or any lower one, never a higher one.
LAYERS: list[tuple[str, ...]] = [
    ("sd_train.cli", "sd_train.__main__", "sd_train.tools"),
    ("sd_train.entry",),
    ("sd_train.trainer", "sd_train.preflight", "sd_train.run_plan"),
    (
        "sd_train.evaluation",
        "sd_train.sample_quality",
        "sd_train.metrics",
        "sd_train.checkpoint",
        "sd_train.export",
        "sd_train.step_signals",
        "sd_train.train_state",
    ),
    (
        "sd_train.parallel",
        "sd_train.data",
        "sd_train.model",
        "sd_train.objective",
        "sd_train.optim",
        "sd_train.langevin",
        "sd_train.rng",
        "sd_train.faults",
        "sd_train.host_sync",
        "sd_train.perf",
        "sd_train.background_writer",
        "sd_train.memory",
        "sd_train.run_summary",
    ),
    # Below the strategies: their layouts implement the EMA's contracts (sd_train.ema.contracts).
    ("sd_train.ema",),
    ("sd_train.config",),
    ("sd_train.errors", "sd_train.paths", "sd_train.console", "sd_train"),
]
# Third-party imports that may sit inside a function, each for a stated reason: heavy, optional, or
# only one code path needs it (DeepSpeed's strategy and export, the wandb and tensorboard sinks).
LAZY_OK = (
    "deepspeed",
    "accelerate",
    "transformers.integrations.deepspeed",
    "wandb",
    "torch.utils.tensorboard",
    "matplotlib",  # the optional `plot` extra (sd_train.tools.posthoc_eval)
)
# The entry point validates the config before torch is imported: the trainer (and torch) only then.
LAZY_OK_INTERNAL = {("sd_train.entry", "sd_train.trainer")}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or (p != "sd_train" and module.startswith(p + ".")) for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    out: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module == "sd_train":  # `from sd_train import config` names a module
                    out.extend((f"sd_train.{a.name}", in_function, child.lineno) for a in child.names)
                else:
                    out.append((child.module, in_function, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return out


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def internal_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, _, _ in imports(path):
            if target.startswith("sd_train"):
                # `from sd_train.config import X` imports the package sd_train.config.
                while target not in MODULES and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != mod:
                    graph[mod].add(target)
    return graph


def test_every_module_has_a_layer():
    assert len(MODULES) > 20
    for mod in MODULES:
        layer_of(mod)


def test_imports_only_go_down():
    upward = []
    for mod, targets in internal_graph().items():
        for target in targets:
            if layer_of(target) < layer_of(mod):
                upward.append(f"{mod} (layer {layer_of(mod)}) imports {target} (layer {layer_of(target)})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = internal_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            walk(mod, [mod])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_function_local_imports_are_only_the_lazy_heavy_ones():
    found = []
    for mod, path in MODULES.items():
        for target, in_function, line in imports(path):
            if (mod, target) in LAZY_OK_INTERNAL:
                continue
            if in_function and not any(target == ok or target.startswith(ok + ".") for ok in LAZY_OK):
                found.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} inside a function")
    assert not found, "\n".join(found)


def test_runtime_never_imports_tools():
    graph = internal_graph()
    runtime = [m for m in graph if layer_of(m) > 0]
    bad = [f"{m} -> {t}" for m in runtime for t in graph[m] if t.startswith("sd_train.tools")]
    assert not bad, bad


@pytest.mark.parametrize(
    "module", ["sd_train.config", "sd_train.preflight", "sd_train.entry", "sd_train.paths", "sd_train.memory.build"]
)
def test_startup_modules_stay_torch_free(module):
    """What runs before the config is validated imports no torch (a bad config fails in well under
    a second)."""
    import subprocess
    import sys

    code = (
        f"import sys, {module}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT.parent)


def test_the_model_knows_nothing_of_the_data_path():
    """The model (its parts, tokenization, conditioning) is used by the data path (loader workers
    tokenize with it), never the other way: sd_train.model imports no sd_train.data module."""
    graph = internal_graph()
    bad = [
        f"{m} -> {t}"
        for m in graph
        if m.startswith("sd_train.model")
        for t in graph[m]
        if t.startswith("sd_train.data")
    ]
    assert not bad, bad
