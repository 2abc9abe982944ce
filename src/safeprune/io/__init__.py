"""Stage 0 — infrastructure every other stage uses: file checks, atomic writes, output rules, hashing,
provenance, data paths, progress bars and terminal-safe text. Imports nothing from safeprune but errors."""
