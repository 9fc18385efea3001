"""The expert review of trait datasets (``python -m pipeline.review``): a blinded, seeded sample of
builds' annotations (sample), the rating page (server), and the paper's Table 1 for them (score)."""
