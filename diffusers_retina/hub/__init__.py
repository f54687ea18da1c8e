"""Publishing to the Hugging Face Hub: model cards (:mod:`.model_cards`, one builder fed by per-kind templates), the
data provenance they record (:mod:`.provenance`), the measured records they report (:mod:`.evaluation_records`)
and the upload of a checkpoint folder (:mod:`.upload`)."""

from ..utils.io_utils import command_line, read_json, write_json  # noqa: F401 (re-exported: hub.read_json, ...)
from .evaluation_records import EVALUATION, METRIC_LABELS, TRAINING_INFO, recorded_training_args  # noqa: F401
from .model_cards import (  # noqa: F401
    CARD_KINDS,
    TEMPLATES,
    _card_data,
    adaptdiff_model_card,
    card_kind,
    default_repo_id,
    feature_head_model_card,
    mask2image_model_card,
    model_card,
    resolve_base_model,
    segmentation_model_card,
    segmenter_model_card,
    write_adaptdiff_card,
    write_feature_head_card,
    write_mask2image_card,
    write_model_card,
    write_segmentation_card,
    write_segmenter_card,
)
from .provenance import (  # noqa: F401
    PROVENANCE_FILES,
    data_description,
    data_scope,
    dataset_provenance,
    dataset_record,
    license_id,
    read_provenance_file,
)
from .upload import PushError, card_for_repo, create_repo, files_to_push, push_checkpoint  # noqa: F401
