"""The Core AI target (``.aimodel``, iOS 27 / macOS 27): macq's records as Core AI's own compressed-weight ops.

Entry points for the target table: :func:`check_coreai` (before any weight is read), :func:`export_coreai`
(the writer), :data:`COREAI_CAPS` (the records it holds), :class:`CoreAIOptions` (its options). Read-back
and running: :mod:`coreai_backend.readback`, :mod:`coreai_backend.runner`. ``coreai`` / ``coreai_torch`` are
imported lazily, inside the functions that need them.
"""

from coreai_backend.export import CoreAIResult, export_coreai, is_coreai_export, read_manifest
from coreai_backend.options import COREAI_CAPS, HARDWARE, CoreAIOptions, check_coreai, check_records

__all__ = ["COREAI_CAPS", "HARDWARE", "CoreAIOptions", "CoreAIResult", "check_coreai", "check_records", "export_coreai",
           "is_coreai_export", "read_manifest"]
