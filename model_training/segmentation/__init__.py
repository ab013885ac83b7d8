"""Step 6: segmentation training on pseudo masks, exported for the submission folder."""
from .segmentation_training import DEFAULTS, train_segmentation

__all__ = ["DEFAULTS", "train_segmentation"]
