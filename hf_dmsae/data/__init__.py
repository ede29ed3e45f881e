"""Where activations come from: text sources and their token stream, the LM read at a hook, disjoint slices of the
stream, and harvested rows streamed or cached on disk."""
