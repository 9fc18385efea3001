"""The expert review of trait datasets (``sae-traits review``): a blinded, seeded sample of
builds' annotations (sample), the rating page (server), and the paper's Table 1 for them (score)."""
