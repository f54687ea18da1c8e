"""Images in and out of the pipelines: :class:`RetinaImageProcessor` and the functions it is built from.

* :mod:`.decoding` -- PIL images and numpy arrays to validated image / mask arrays, the pixel cap, :class:`DataError`;
* :mod:`.conversion` -- user inputs to the models' ``[-1, 1]`` tensors and back (``prepare_images``, ``prepare_masks``,
  padding, PIL outputs);
* :mod:`.field_of_view` -- the circular field of view of fundus photographs;
* :mod:`.intensity` -- inversion, histogram matching and the stored ``input_transform`` of adapted checkpoints;
* :mod:`.image_processor` -- :class:`RetinaImageProcessor`, the one object the pipelines and the demo use.

This package imports no other module of diffusers_retina.
"""

from .conversion import (
    ImageInput,
    MaskInput,
    diffusion_to_probabilities,
    mask_to_diffusion,
    numpy_to_pil_maps,
    numpy_to_pil_masks,
    pad_to_multiple,
    prepare_images,
    prepare_masks,
)
from .decoding import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    DataError,
    ImageTooLargeError,
    check_pixel_count,
    image_array_from_numpy,
    image_array_from_pil,
    mask_array_from_numpy,
    mask_array_from_pil,
    max_pixels,
)
from .field_of_view import (
    PROCESSING_MODES,
    SCALE_TOLERANCE,
    ProcessingPlan,
    check_field_of_view_degrees,
    check_processing_resolution,
    downscale,
    field_of_view_diameter,
    field_of_view_mask,
    field_of_view_masks,
    fill_outside_field_of_view,
    plan_processing,
    plan_processing_batch,
    processing_diameter,
    rescale_to_field_of_view,
)
from .intensity import (
    INTENSITY_TRANSFORMS,
    apply_source_intensity_transform,
    check_source_intensity_transform,
    source_intensity_transform,
    tensor_to_source_intensities,
    transform_name,
)
from .image_processor import OUTPUT_TYPES, RetinaImageProcessor, colormap

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_PIXELS_ENV",
    "OUTPUT_TYPES",
    "PROCESSING_MODES",
    "SCALE_TOLERANCE",
    "ProcessingPlan",
    "INTENSITY_TRANSFORMS",
    "DataError",
    "ImageInput",
    "ImageTooLargeError",
    "MaskInput",
    "RetinaImageProcessor",
    "check_field_of_view_degrees",
    "check_pixel_count",
    "check_processing_resolution",
    "apply_source_intensity_transform",
    "check_source_intensity_transform",
    "colormap",
    "diffusion_to_probabilities",
    "downscale",
    "field_of_view_diameter",
    "field_of_view_mask",
    "field_of_view_masks",
    "fill_outside_field_of_view",
    "rescale_to_field_of_view",
    "image_array_from_numpy",
    "image_array_from_pil",
    "mask_array_from_numpy",
    "mask_array_from_pil",
    "mask_to_diffusion",
    "max_pixels",
    "numpy_to_pil_maps",
    "numpy_to_pil_masks",
    "pad_to_multiple",
    "prepare_images",
    "plan_processing",
    "plan_processing_batch",
    "prepare_masks",
    "processing_diameter",
    "source_intensity_transform",
    "tensor_to_source_intensities",
    "transform_name",
]
