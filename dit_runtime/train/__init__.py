"""Training: the dit-train entry point, its typed config, data sets and the trainer."""
