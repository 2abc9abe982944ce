"""Training — making the adapters the rest of the tool repairs: ``finetune`` (transformers' Trainer, the
papers' recipe), the demo's small loop (``train_lora``) and the training data they share."""

from .data import (
    IGNORE,
    build_training_data,
    builtin_examples,
    encode_chat,
    load_chat_jsonl,
    load_id_list,
    load_task_rows,
    pad_collator,
    parse_targets,
    task_rows_to_chats,
)
from .lora import LoraSettings, TrainSettings, train_lora
from .trainer import finetune, partial_dir

__all__ = [
    "finetune",
    "partial_dir",
    "train_lora",
    "LoraSettings",
    "TrainSettings",
    "build_training_data",
    "builtin_examples",
    "encode_chat",
    "load_chat_jsonl",
    "load_id_list",
    "load_task_rows",
    "pad_collator",
    "parse_targets",
    "task_rows_to_chats",
    "IGNORE",
]
