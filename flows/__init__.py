"""dermaflow's outer edge: the CLI and the Prefect flows."""
