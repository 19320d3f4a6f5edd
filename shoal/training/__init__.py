"""The training loop every algorithm shares, and the learner that owns the optimizer steps."""
