"""Outputs: Hugging Face safetensors directories with calibrant metadata; packed compressed-tensors directories."""

from calibrant.export.hf import (
    METADATA_FILE,
    check_output,
    inspect_weights,
    read_metadata,
    restore_activation_quant,
    save_model,
)
from calibrant.export.packed import ExportError, save_packed

__all__ = [
    "METADATA_FILE", "ExportError", "check_output", "inspect_weights", "read_metadata", "restore_activation_quant",
    "save_model", "save_packed",
]
