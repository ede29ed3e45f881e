"""What leaves a run: Hub repos with model cards, other libraries' SAE formats in and out, the feature browser."""
