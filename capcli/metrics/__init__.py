"""Scores: caption metrics, CIDEr-D, sequence metrics, chemistry, and the validation score."""
