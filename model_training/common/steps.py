"""The seven steps, declared once: number, word, step module and script.

The word names the step's output folder (``<n>_<word>``), its config file
(``configs/<dataset>/<n>_<word>.yaml``), its config section and its log prefix. The core
imports no step, so the modules are named here, not imported: ``run_pipeline.py`` imports
them, and ``tests/test_layout.py`` checks the files and the import order against this table.
"""
from __future__ import annotations

from typing import NamedTuple


class Step(NamedTuple):
    number: int
    word: str
    module: str  # the step module: DEFAULTS, step_inputs, run, summary_line
    script: str  # its thin entry point, relative to the repository root
    helpers: tuple[str, ...] = ()  # modules of this step's own beside the step module

    @property
    def folder(self) -> str:
        return f"{self.number}_{self.word}"


STEPS = (
    Step(1, "classifier", "model_training.cam_generation.classifier_training",
         "model_training/cam_generation/train_classifier.py"),
    Step(2, "cams", "inference.irn_steps.cams_step", "inference/irn_steps/multiscale_cam.py",
         ("inference.irn_steps.cam",)),
    Step(3, "ir_labels", "inference.irn_steps.ir_labels_step",
         "inference/irn_steps/crf_cam_processing.py", ("inference.irn_steps.ir_labels",)),
    Step(4, "irn", "model_training.cam_generation.irn_training",
         "model_training/cam_generation/train_irn.py",
         ("model_training.cam_generation.irn_targets",)),
    Step(5, "pseudo_masks", "inference.irn_steps.pseudo_masks_step",
         "inference/irn_steps/irn_inference.py", ("inference.irn_steps.random_walk",)),
    Step(6, "segmentation", "model_training.segmentation.segmentation_training",
         "model_training/segmentation/train_segmentation.py"),
    Step(7, "predictions", "inference.segmentation.predictions_step",
         "inference/segmentation/predict.py"),
)

# step number -> output folder name: ``STEP_DIRS[3]`` is ``3_ir_labels``
STEP_DIRS = {step.number: step.folder for step in STEPS}
