"""Datasets on disk (datasets.py: layouts; tables.py: caption tables; splits.py: splits) and images
(images.py: decoding and batches; urls.py: downloading URLs; listing.py: which images a run is given)."""
