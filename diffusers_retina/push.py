"""Compatibility alias: the upload code lives in :mod:`diffusers_retina.hub.upload` (``from diffusers_retina import
push`` and ``diffusers_retina.push.push_checkpoint`` keep working)."""

from .hub.upload import (  # noqa: F401 (re-exported)
    ALLOWED_FILES,
    EXCLUDED_FOLDERS,
    MAX_PNG_BYTES,
    TRAINING_STATE_FILES,
    PushError,
    card_for_repo,
    create_repo,
    files_to_push,
    push_checkpoint,
    stage_upload,
    upload_sources,
)
