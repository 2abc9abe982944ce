"""File names and key prefixes of a PEFT adapter directory."""

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
MANIFEST_NAME = "safeprune.json"
# the files that change what an adapter generates (a manifest or training log beside them does not)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
