"""Run files: checkpoints, metrics and plots of one run directory."""
