"""Using a model: decoding options and greedy/beam search, the Captioner, result lines and files,
sidecars, shares of a collection, attention pictures, and scoring a dataset split."""
