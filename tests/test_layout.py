"""The step registry and the import DAG of docs/design.md: submit <- core <- steps, scoring <- run_pipeline.

Every module of ``model_training/`` and ``inference/`` belongs to one group below; a module
may import its own group and the groups listed as below it, nothing else. So the submission
folder works when copied alone, the core never reaches into a step, and no step imports
another (what two steps share belongs in the core).
"""
import ast
from pathlib import Path

import pytest

from model_training.common.steps import STEP_DIRS, STEPS as REGISTRY
from tests.conftest import REPO

SUBMIT = ("inference.segmentation.submit",)
CORE = ("model_training.common",)
# each step's group: its script, its step module and its helpers, from the step registry
STEPS = {f"step {s.number}": (s.script[:-3].replace("/", "."), s.module, *s.helpers)
         for s in REGISTRY}
SCORING = ("inference.evaluate", "inference.scoring")
PACKAGE_DOCS = ("model_training", "model_training.cam_generation", "model_training.segmentation",
                "inference", "inference.irn_steps", "inference.segmentation")  # __init__ only

# group -> the groups it may import besides itself
GROUPS = {"submit": (SUBMIT, ()), "core": (CORE, ("submit",)),
          **{name: (modules, ("core", "submit")) for name, modules in STEPS.items()},
          "scoring": (SCORING, ("core", "submit")), "packages": (PACKAGE_DOCS, ())}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files = [p for top in ("model_training", "inference") for p in (REPO / top).rglob("*.py")]
    return {_module_name(p): p for p in files}


def _group(module: str) -> str | None:
    """The group a module belongs to (the longest matching prefix)."""
    best, best_length = None, -1
    for name, (prefixes, _) in GROUPS.items():
        for prefix in prefixes:
            matches = module == prefix or (module.startswith(prefix + ".") and name != "packages")
            if matches and len(prefix) > best_length:
                best, best_length = name, len(prefix)
    return best


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The repository modules ``path`` imports (anywhere in the file, relative ones resolved;
    ``from package import module`` counts as the module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if module.startswith(SUBMIT[0]) and node.level == 0 and f"{SUBMIT[0]}.{base}" in known:
                base = f"{SUBMIT[0]}.{base}"  # run as a script, the folder imports its siblings
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in ("model_training", "inference"))
    return found


def test_every_module_belongs_to_one_group():
    lost = sorted(m for m in _modules() if _group(m) is None)
    assert not lost, f"add these modules to a group of tests/test_layout.py: {lost}"


def test_imports_only_go_down_the_dag():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        group = _group(module)
        allowed = {group, *GROUPS[group][1]}
        for target in _imports(module, path, set(modules)):
            if _group(target) not in allowed:
                wrong.append(f"{module} ({group}) imports {target} ({_group(target)})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("source, target, expected", [
    ("model_training.common.step_io", "inference.irn_steps.cams_step", False),
    ("inference.irn_steps.pseudo_masks_step", "model_training.cam_generation.irn_training", False),
    ("inference.irn_steps.pseudo_masks_step", "model_training.common.models.irnet", True),
    ("model_training.segmentation.segmentation_training", "inference.segmentation.submit.generate_predictions", True),
    ("inference.segmentation.submit.generate_predictions", "model_training.common.config", False),
])
def test_the_rule_itself(source, target, expected):
    """The check would catch a core module importing a step, or one step another."""
    assert (_group(target) in {_group(source), *GROUPS[_group(source)][1]}) == expected


def test_the_registry_numbers_the_steps_and_names_their_files():
    assert [s.number for s in REGISTRY] == list(range(1, len(REGISTRY) + 1))
    assert len({s.word for s in REGISTRY}) == len(REGISTRY)
    modules = _modules()
    for step in REGISTRY:
        assert {step.module, *step.helpers} <= set(modules), step
        script = REPO / step.script
        imported = _imports(_module_name(script), script, set(modules))
        assert step.module in imported and "model_training.common.step_cli" in imported, \
            f"{step.script} should run {step.module} through step_cli.run_script"


def test_run_pipeline_runs_the_registry_in_order():
    import run_pipeline
    assert [m.__name__ for m in run_pipeline.STEPS] == [s.module for s in REGISTRY]


@pytest.mark.parametrize("config_dir", sorted(p for p in (REPO / "configs").iterdir() if p.is_dir()))
def test_every_config_folder_has_one_file_per_step(config_dir):
    missing = [f"{folder}.yaml" for folder in STEP_DIRS.values()
               if not (config_dir / f"{folder}.yaml").is_file()]
    assert not missing, f"{config_dir.name} lacks {missing}"


def test_the_readme_step_table_matches_the_registry():
    rows = [line for line in (REPO / "README.md").read_text().splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [int(row.split("|")[1]) for row in rows] == [s.number for s in REGISTRY]
    for row, step in zip(rows, REGISTRY):
        assert f"`{step.script}`" in row and f"`{step.folder}.yaml`" in row, row
