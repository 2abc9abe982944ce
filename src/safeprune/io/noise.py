"""Warnings the libraries safeprune drives print on every run that say nothing to a safeprune user, silenced
by their exact text (anything else still shows)."""

from __future__ import annotations

import warnings

LIBRARY_NOISE: tuple[tuple[type[Warning], str], ...] = (
    # transformers 5: PEFT reads model.is_gradient_checkpointing on every PeftModel it builds
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # PEFT's save_pretrained when base_model_name_or_path has no config.json (a GGUF folder, another machine)
    (UserWarning, r"Could not find a config file in .* - will assume that the vocabulary was not modified"),
)


def silence_library_noise() -> None:
    """Install the filters (inside a ``warnings.catch_warnings()`` block, they end with it)."""
    for category, message in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
