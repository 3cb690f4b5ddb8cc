"""Outputs: Hugging Face safetensors directories with calibrant metadata."""

from calibrant.export.hf import (
    METADATA_FILE,
    check_output,
    inspect_weights,
    read_metadata,
    restore_activation_quant,
    save_model,
)

__all__ = ["METADATA_FILE", "check_output", "inspect_weights", "read_metadata", "restore_activation_quant", "save_model"]
