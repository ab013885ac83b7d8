"""Steps 1 and 4: the CAM classifier and IRNet training."""
