"""The DMSAE itself: its config, its forward (dense or sparse kernels, BatchTopK), and a selected core as a Hub
artifact. `configuration_dmsae`, `modeling_dmsae`, `kernels` and `sparsity` travel with every saved model as its
remote code, so they import only each other, torch and transformers."""
