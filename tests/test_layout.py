"""The import DAG of README's "Where step N lives": submit <- core <- steps, scoring <- run_pipeline.

Every module of ``model_training/`` and ``inference/`` belongs to one group below; a module
may import its own group and the groups listed as below it, nothing else. So the submission
folder works when copied alone, the core never reaches into a step, and no step imports
another (what two steps share belongs in the core).
"""
import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

SUBMIT = ("inference.segmentation.submit",)
CORE = ("model_training.common",)
STEPS = {
    "step 1": ("model_training.cam_generation.train_classifier",
               "model_training.cam_generation.classifier_training"),
    "step 2": ("inference.irn_steps.multiscale_cam", "inference.irn_steps.cams_step",
               "inference.irn_steps.cam"),
    "step 3": ("inference.irn_steps.crf_cam_processing", "inference.irn_steps.ir_labels_step",
               "inference.irn_steps.ir_labels"),
    "step 4": ("model_training.cam_generation.train_irn",
               "model_training.cam_generation.irn_training",
               "model_training.cam_generation.irn_targets"),
    "step 5": ("inference.irn_steps.irn_inference", "inference.irn_steps.pseudo_masks_step",
               "inference.irn_steps.random_walk"),
    "step 6": ("model_training.segmentation.train_segmentation",
               "model_training.segmentation.segmentation_training"),
    "step 7": ("inference.segmentation.predict", "inference.segmentation.predictions_step"),
}
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
            if module.startswith(SUBMIT[0]) and node.level == 0 and base == "model":
                base = f"{SUBMIT[0]}.model"  # the submission script's own sibling
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
