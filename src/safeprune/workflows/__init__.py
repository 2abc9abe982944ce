"""Workflows — whole jobs built from the stages: ``experiment`` (``safeprune run``: a study with controls
and a report), ``search`` (the budgeted τ search on probes) and ``demo``."""
