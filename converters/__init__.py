"""Framework-neutral conversion layer: timm checkpoints <-> canonical tree <-> Haiku / Flax.

Imports neither jax nor torch at module level (torch is imported lazily, and only to read
``.pth`` files or inspect live timm models).
"""

from .errors import (CheckpointError, ConversionError, HubError, HubUnreachableError, InvalidArgumentError,
                     MissingFileError, OutputExistsError, OutputWriteError, UnsupportedArchitectureError,
                     VitportError)
from .frameworks import (FRAMEWORKS, canonical_to_framework, flat_keys, framework_path,
                         framework_to_canonical, stack_blocks, unflatten_keys, unstack_blocks)
from .keymap import Entry, canonical_to_timm, check_finite, key_table, timm_to_canonical
from .specs import CaiTSpec, EvaSpec, RelPosSpec, Spec, ViTSpec, spec_from_dict, spec_from_timm_model, spec_to_dict

__all__ = [
    "CaiTSpec", "EvaSpec", "RelPosSpec", "CheckpointError", "ConversionError", "HubError", "HubUnreachableError", "InvalidArgumentError",
    "MissingFileError", "OutputExistsError", "OutputWriteError", "VitportError", "Entry", "FRAMEWORKS", "Spec", "UnsupportedArchitectureError",
    "ViTSpec", "canonical_to_framework", "canonical_to_timm", "check_finite", "flat_keys",
    "framework_path", "framework_to_canonical", "key_table", "spec_from_dict",
    "spec_from_timm_model", "spec_to_dict", "stack_blocks", "timm_to_canonical", "unflatten_keys",
    "unstack_blocks",
]
