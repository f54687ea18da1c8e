"""``RetinaImageProcessor``: every conversion between a user's pictures and the pipelines' tensors, in one object.

Shaped like diffusers' ``VaeImageProcessor`` and Marigold's ``MarigoldImageProcessor``: a ``ConfigMixin`` that each
pipeline builds in its ``__init__`` (it is not a saved component). It owns

* ``preprocess`` / ``preprocess_mask``: PIL images, numpy arrays or tensors to the models' ``[-1, 1]`` tensors, with
  the pixel cap checked before decoding (:mod:`.conversion`, :mod:`.decoding`);
* ``pad`` / ``unpad``: reflect padding to the UNet's down-sampling multiple and back;
* ``postprocess`` (images), ``postprocess_masks`` and ``postprocess_maps``: the ``output_type`` of every pipeline
  (``"pt"``, ``"np"`` or ``"pil"``);
* ``visualize_uncertainty``: an uncertainty map as an inferno-like colour picture (the demo and the Space);
* the field of view of fundus photographs: find, measure, fill (:mod:`.field_of_view`);
* ``processing_resolution``: ``plan_processing`` picks each image's working size (``"auto"``: its field of view
  matched to the model's training diameter) and ``resize`` takes tensors there and back.

It imports no other module of the package.

Example:
    >>> import torch
    >>> processor = RetinaImageProcessor(size_multiple=8)
    >>> pixels = processor.preprocess(torch.rand(3, 30, 30), num_channels=3)
    >>> padded, size = processor.pad(pixels)
    >>> padded.shape[-2:], processor.unpad(padded, size).shape[-2:]
    (torch.Size([32, 32]), torch.Size([30, 30]))
    >>> processor.postprocess_maps(torch.full((1, 4, 4), 0.5), output_type="pil")[0].getpixel((0, 0))
    128
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

from .conversion import (
    ImageInput,
    MaskInput,
    numpy_to_pil_maps,
    numpy_to_pil_masks,
    pad_to_multiple,
    prepare_images,
    prepare_masks,
)
from .field_of_view import (
    downscale,
    field_of_view_diameter,
    field_of_view_mask,
    field_of_view_masks,
    fill_outside_field_of_view,
    plan_processing_batch,
    rescale_to_field_of_view,
)

OUTPUT_TYPES = ("pt", "np", "pil")

# An "inferno"-like colour map (dark = certain, bright = uncertain): anchor colours interpolated linearly, written out
# because matplotlib is not a dependency.
_COLORMAP_ANCHORS = np.array(
    [
        (0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99),
        (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164),
    ],
    dtype=np.float64,
)

Outputs = Union[torch.Tensor, np.ndarray, List[PIL.Image.Image]]


def colormap(values: np.ndarray) -> np.ndarray:
    """Map ``values`` in ``[0, 1]`` (clipped; NaN as 0) to an ``(..., 3)`` uint8 inferno-like colour array."""
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    positions = np.linspace(0.0, 1.0, len(_COLORMAP_ANCHORS))
    channels = [np.interp(values, positions, _COLORMAP_ANCHORS[:, channel]) for channel in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")


class RetinaImageProcessor(ConfigMixin):
    """Pre- and post-processing for the diffusers-retina pipelines.

    Args:
        size_multiple: the factor ``pad`` pads height and width to (the UNet's down-sampling factor).
        max_pixels: the pixel cap of one input image; ``None`` uses the environment variable
            ``DIFFUSERS_RETINA_MAX_PIXELS``, else 64 megapixels.
    """

    config_name = "image_processor_config.json"

    @register_to_config
    def __init__(self, size_multiple: int = 8, max_pixels: Optional[int] = None):
        super().__init__()
        if int(size_multiple) < 1:
            raise ValueError(f"`size_multiple` must be a positive integer, got {size_multiple!r}.")

    # ------------------------------------------------------------------------------------------------ inputs
    def preprocess(self, image: ImageInput, num_channels: int, name: str = "image") -> torch.Tensor:
        """Images (PIL, numpy or tensors; single or batched) as a float ``NCHW`` tensor in ``[-1, 1]``; see
        :func:`~diffusers_retina.image_processing.prepare_images` for the accepted forms and errors."""
        return prepare_images(image, num_channels, name=name, max_pixels=self.config.max_pixels)

    def preprocess_mask(self, mask: MaskInput, num_classes: int, name: str = "mask") -> torch.Tensor:
        """Masks (hard or soft; single or batched) in diffusion space ``(N, C, H, W)``; see
        :func:`~diffusers_retina.image_processing.prepare_masks`."""
        return prepare_masks(mask, num_classes, name=name, max_pixels=self.config.max_pixels)

    def pad(self, tensor: torch.Tensor, multiple: Optional[int] = None) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Reflect-pad the bottom/right of ``NCHW`` to a multiple of ``multiple`` (default ``size_multiple``);
        returns the padded tensor and the original ``(height, width)`` for :meth:`unpad`."""
        return pad_to_multiple(tensor, int(multiple or self.config.size_multiple))

    @staticmethod
    def unpad(tensor: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """Crop ``(..., H, W)`` back to ``size`` (the second value :meth:`pad` returned)."""
        return tensor[..., : size[0], : size[1]]

    # ------------------------------------------------------------------------------------------------ outputs
    @staticmethod
    def postprocess(images: torch.Tensor, output_type: str = "pil") -> Outputs:
        """Images ``(N, C, H, W)`` in ``[0, 1]`` as ``"pt"`` (unchanged, on the CPU), ``"np"`` (``NHWC`` float32) or
        ``"pil"`` (RGB, or L for one channel)."""
        _check_output_type(output_type)
        images = images.detach().cpu()
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return array
        pixels = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        return [PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in pixels]

    @staticmethod
    def postprocess_masks(masks: Union[torch.Tensor, np.ndarray], num_classes: int, output_type: str = "pil") -> Outputs:
        """Class-index masks ``(N, H, W)`` as ``"pt"`` / ``"np"`` (unchanged) or ``"pil"`` (L images; binary masks
        0/255, class indices as values)."""
        _check_output_type(output_type)
        if output_type == "pt":
            return torch.as_tensor(masks).cpu()
        array = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        return array if output_type == "np" else numpy_to_pil_masks(array, num_classes)

    @staticmethod
    def postprocess_maps(maps: Union[torch.Tensor, np.ndarray], max_value: float = 1.0,
                         output_type: str = "pil") -> Outputs:
        """Float maps ``(N, H, W)`` (probabilities, uncertainty) as ``"pt"`` / ``"np"`` (unchanged) or ``"pil"``
        (8-bit L images with ``max_value`` at 255)."""
        _check_output_type(output_type)
        if output_type == "pt":
            return torch.as_tensor(maps).cpu()
        array = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
        return array if output_type == "np" else numpy_to_pil_maps(array, max_value)

    @classmethod
    def postprocess_segmentation(cls, masks: torch.Tensor, probabilities: torch.Tensor,
                                 uncertainty: Dict[str, torch.Tensor], members: Optional[torch.Tensor],
                                 num_classes: int, output_type: str = "pil") -> Dict[str, Any]:
        """An ensemble's outputs as ``output_type``: ``"pt"`` unchanged; ``"np"`` with channels last (probabilities
        ``(N, H, W, C)``, members ``(N, E, H, W, C)``); ``"pil"`` as "L" images (masks 0/255 or class indices, the
        foreground or winning-class probability, variance with 0.25 white, entropy and mutual information with
        ``ln K`` white, one list of member maps per image). ``uncertainty`` holds ``variance``, ``entropy`` and
        ``mutual_information``."""
        _check_output_type(output_type)
        output = {"masks": masks, "probabilities": probabilities, **uncertainty, "members": members}
        if output_type == "pt":
            return output
        output = {k: (None if v is None else v.cpu().numpy()) for k, v in output.items()}
        output["probabilities"] = np.moveaxis(output["probabilities"], 1, -1)
        if members is not None:
            output["members"] = np.moveaxis(output["members"], 2, -1)
        if output_type == "np":
            return output
        max_entropy = float(np.log(num_classes))
        winning = output["probabilities"].max(axis=-1) if num_classes > 2 else output["probabilities"][..., 0]
        pil = {
            "masks": cls.postprocess_masks(output["masks"], num_classes),
            "probabilities": cls.postprocess_maps(winning),
            "variance": cls.postprocess_maps(output["variance"], 0.25),
            "entropy": cls.postprocess_maps(output["entropy"], max_entropy),
            "mutual_information": cls.postprocess_maps(output["mutual_information"], max_entropy),
            "members": None,
        }
        if members is not None:
            member_maps = output["members"].max(axis=-1) if num_classes > 2 else output["members"][..., 0]
            pil["members"] = [cls.postprocess_maps(per_image) for per_image in member_maps]
        return pil

    @staticmethod
    def visualize_uncertainty(maps: Union[np.ndarray, torch.Tensor, Sequence[np.ndarray]],
                              max_value: float = 1.0) -> List[PIL.Image.Image]:
        """Uncertainty maps (one ``(H, W)`` map or a batch ``(N, H, W)``; ``0..max_value``) as RGB pictures with an
        inferno-like colour map: dark where the members agree, bright where they do not.

        Example:
            >>> import numpy as np
            >>> RetinaImageProcessor.visualize_uncertainty(np.zeros((2, 3)), max_value=0.69)[0].getpixel((0, 0))
            (0, 0, 4)
        """
        if isinstance(maps, torch.Tensor):
            maps = maps.detach().cpu().float().numpy()
        array = np.asarray(maps, dtype=np.float64)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise ValueError(f"`maps` must be (H, W) or (N, H, W), got shape {array.shape}.")
        return [PIL.Image.fromarray(colormap(m / max(float(max_value), 1e-12))) for m in array]

    # ------------------------------------------------------------------------------------------------ resolution
    plan_processing = staticmethod(plan_processing_batch)

    @staticmethod
    def resize(tensor: torch.Tensor, size: Tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
        """``(N, C, H, W)`` resized to ``size`` (antialiased when shrinking; bicubic for images, bilinear for maps),
        clamped to the input's range; unchanged when it already has that size."""
        if tuple(tensor.shape[-2:]) == tuple(size):
            return tensor
        low, high = tensor.min(), tensor.max()
        resized = torch.nn.functional.interpolate(tensor.float(), size=tuple(size), mode=mode, align_corners=False,
                                                  antialias=True)
        return resized.clamp(low, high).to(tensor.dtype)

    # ------------------------------------------------------------------------------------------------ field of view
    field_of_view_mask = staticmethod(field_of_view_mask)
    field_of_view_masks = staticmethod(field_of_view_masks)
    field_of_view_diameter = staticmethod(field_of_view_diameter)
    fill_outside_field_of_view = staticmethod(fill_outside_field_of_view)
    rescale_to_field_of_view = staticmethod(rescale_to_field_of_view)
    downscale = staticmethod(downscale)


__all__ = ["OUTPUT_TYPES", "RetinaImageProcessor", "colormap"]
