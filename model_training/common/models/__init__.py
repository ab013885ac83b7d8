"""Backbones, offline weights and the CAM classifier shared by the training steps; IRNet
(``models.irnet``) and the smp segmentation network (``models.segmentation``) are imported
from their modules, so a step loads smp only where it needs it."""
from .backbones import (backbone_exists, build_backbone, build_multilevel_backbone,
                        check_backbone_keys, weights_error_names)
from .classifier import CamClassifier, build_cam_classifier, init_from_checkpoint, load_cam_classifier
from .weights import WeightsError, efficientnet_lite_state_dict

__all__ = [
    "CamClassifier", "WeightsError", "backbone_exists", "build_backbone",
    "build_cam_classifier", "build_multilevel_backbone", "check_backbone_keys",
    "efficientnet_lite_state_dict", "init_from_checkpoint", "load_cam_classifier",
    "weights_error_names",
]
