"""The paper's method: attribution scoring and core selection, the distillation cycles, transfer around a core."""
