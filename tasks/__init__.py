"""dermaflow stage code: one module per stage, pure functions, no Prefect, no argv."""
