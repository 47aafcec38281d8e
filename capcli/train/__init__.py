"""Training a model: its config, the loop, the objectives (cross-entropy, self-critical) and their
losses, the saved state, the feature sources and cache, and the curves."""
