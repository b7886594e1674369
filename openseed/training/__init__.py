"""The training glue: the Lightning module, callbacks, loggers, distributed helpers (FSDP, SLURM signals) and
safe checkpoint writing. The model, losses and data know nothing of it; ``openseed.train`` assembles it from the
configs."""
