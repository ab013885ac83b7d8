"""Step 6: segmentation training on pseudo masks, exported for the submission folder."""
