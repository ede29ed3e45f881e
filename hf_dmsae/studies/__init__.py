"""Studies of the method: the ground-truth synthetic benchmark and the core's dynamics during training."""
