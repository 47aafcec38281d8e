"""Datasets on disk (layouts, caption tables, splits) and images (decoding, URLs, batches)."""
