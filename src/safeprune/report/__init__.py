"""Stage 6 — reports: plots (heatmaps, score curves, study figures) and the Markdown/HTML document builder
the study report is written with."""
