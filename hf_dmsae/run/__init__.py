"""A run: its arguments, its folder's state, the data it reads, its Trainer and its training."""
