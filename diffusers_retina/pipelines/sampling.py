"""Pieces shared by the pipelines' denoising loops: one generator per sample, tiled denoiser calls, scheduler facts
and the checks every ``__call__`` makes.

Kept in one place so the segmentation and synthesis pipelines cannot drift apart (same seeding rule, same
sliding-window blending, same scheduler handling).
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

try:  # MONAI blends the tiles; remote code loaded from the Hub bundle may run without it (untiled calls then work)
    from monai.inferers import sliding_window_inference
except ImportError:  # pragma: no cover - depends on the environment
    sliding_window_inference = None

from ..image_processing import ProcessingPlan, pad_to_multiple

OUTPUT_TYPES = ("pil", "np", "pt")
AUTO_BATCH = "auto"
# On a CPU one denoiser call is fastest per pixel up to about this many float32 pixels (batch x window; half as many
# bytes per pixel in bfloat16/float16 let twice as many through): bigger batches fall out of the caches and run slower
# per sample. 2-core EPYC, reference UNet, E=5, all members in one call vs one by one: float32 2.2x at 64^2, 1.6x at
# 96^2 (46k pixels), equal at 128^2, 0.74x at 256^2; bfloat16 2.5x / 1.7x / 1.4x (82k pixels) / 0.90x
# (benchmarks/bench_ensemble_batching.py --crop-sizes).
CPU_PIXELS_PER_FORWARD = 48_000


def per_sample_generators(
    generator: Optional[Union[torch.Generator, List[torch.Generator]]], count: int, device: torch.device,
    what: str = "sample",
) -> List[torch.Generator]:
    """One generator per sample.

    * A list is used as given (it must hold ``count`` generators), as diffusers does.
    * A single generator for one sample is used as given too, so ``generator=g`` and ``generator=[g]`` give the same
      result, as in diffusers (where both draw the noise from ``g``).
    * A single generator for several samples (or none, meaning torch's global RNG) is split into ``count`` seeded
      generators, so results do not depend on how the samples are batched (``batch_size``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> per_sample_generators(g, 1, torch.device("cpu"))[0] is g
        True
        >>> len(per_sample_generators(g, 3, torch.device("cpu")))
        3
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != count:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators; pass one per {what} ({count}), or a single "
                "generator."
            )
        if not all(isinstance(item, torch.Generator) for item in generator):
            kinds = sorted({type(item).__name__ for item in generator})
            raise TypeError(f"`generator` must be a torch.Generator or a list of them, got a list of {kinds}.")
        return list(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}.")
    if generator is not None and count == 1:
        return [generator]
    seeds = torch.randint(0, 2**62, (count,), generator=generator, device=generator.device if generator else "cpu")
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def samples_per_call(batch_size: Union[int, str, None], num_samples: int, pixels_per_sample: int,
                     device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """How many samples go through the denoiser together: an int as given; ``None`` all at once; ``"auto"`` all at
    once on an accelerator and, on a CPU, as many as fit in ``CPU_PIXELS_PER_FORWARD`` float32 pixels (scaled by the
    bytes of ``dtype``; at least one). ``pixels_per_sample`` is what one sample puts through one call (a tile when
    tiling, doubled with guidance)."""
    if batch_size is None:
        return num_samples
    if batch_size == AUTO_BATCH:
        if torch.device(device).type != "cpu":
            return num_samples
        budget = CPU_PIXELS_PER_FORWARD * 4 // dtype.itemsize
        return max(1, min(num_samples, budget // max(pixels_per_sample, 1)))
    return batch_size


def sample_chunks(num_samples: int, chunk: int) -> List[range]:
    """Consecutive index ranges of at most ``chunk`` samples covering ``range(num_samples)``."""
    return [range(start, min(start + chunk, num_samples)) for start in range(0, num_samples, chunk)]


def window_pixels(height: int, width: int, tile_size: Optional[int]) -> int:
    """Pixels one sample puts through one denoiser call: the whole (padded) image, or one tile when tiling."""
    if tile_size is None:
        return height * width
    return min(tile_size, height) * min(tile_size, width)


def tiled_predict(forward: Callable[[torch.Tensor], torch.Tensor], model_input: torch.Tensor,
                  tile_size: Optional[int], tile_overlap: float) -> torch.Tensor:
    """``forward(model_input)``; with ``tile_size`` and a larger input, overlapping windows blended with a Gaussian
    (MONAI ``sliding_window_inference``). Windows of different batch rows may share one ``forward`` call, so
    everything per-row that the model needs must travel as channels of ``model_input``."""
    if model_input.device.type == "cpu":
        # channels-last convolutions ran 14-27 % faster on the CPU (same values up to float rounding)
        forward = _channels_last(forward)
    height, width = model_input.shape[-2:]
    if tile_size is None or (height <= tile_size and width <= tile_size):
        return forward(model_input)
    return blend_windows(forward, model_input, tile_size, tile_overlap, windows_per_call=model_input.shape[0])


def blend_windows(predictor: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, tile_size: int,
                  tile_overlap: float, windows_per_call: int = 1) -> torch.Tensor:
    """``predictor`` over overlapping ``tile_size`` windows of ``inputs``, blended with a Gaussian (MONAI
    ``sliding_window_inference``; ``windows_per_call`` windows go through one ``predictor`` call)."""
    if sliding_window_inference is None:
        raise ImportError(f"tile_size={tile_size} blends tiles with MONAI, which is not installed: "
                          "`pip install monai` (or pass tile_size=None).")
    roi = (min(tile_size, inputs.shape[-2]), min(tile_size, inputs.shape[-1]))
    return sliding_window_inference(inputs, roi_size=roi, sw_batch_size=windows_per_call, predictor=predictor,
                                    overlap=tile_overlap, mode="gaussian", progress=False)


def _channels_last(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def channels_last_forward(window: torch.Tensor) -> torch.Tensor:
        return forward(window.contiguous(memory_format=torch.channels_last))

    return channels_last_forward


def step_accepts_generator(scheduler) -> bool:
    """Not every scheduler's ``step`` takes a generator (e.g. UniPC)."""
    return "generator" in inspect.signature(scheduler.step).parameters


def check_common_inputs(size_multiple: int, batch_size, tile_size, tile_overlap, output_type,
                        callback_on_step_end_tensor_inputs: Sequence[str], allowed_tensor_inputs: Sequence[str]):
    """Checks shared by every pipeline's ``__call__``; raise ``ValueError`` naming the argument."""
    if batch_size is not None and batch_size != AUTO_BATCH and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"`batch_size` must be a positive integer, None or {AUTO_BATCH!r}, got {batch_size!r}.")
    if tile_size is not None and (tile_size < size_multiple or tile_size % size_multiple):
        raise ValueError(
            f"`tile_size` must be a positive multiple of the UNet's down-sampling factor {size_multiple}, "
            f"got {tile_size!r}."
        )
    if not 0.0 <= tile_overlap < 1.0:
        raise ValueError(f"`tile_overlap` is a fraction of the tile in [0, 1), got {tile_overlap!r}.")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    unknown = [k for k in callback_on_step_end_tensor_inputs if k not in allowed_tensor_inputs]
    if unknown:
        raise ValueError(
            f"`callback_on_step_end_tensor_inputs` has {unknown}; allowed: {list(allowed_tensor_inputs)}."
        )


@torch.no_grad()
def segmenter_probabilities(segmenter, images: torch.Tensor, tile_size: Optional[int] = None,
                            tile_overlap: float = 0.25, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Foreground probabilities ``(B, 1, H, W)`` (float32) of a deterministic segmenter: a ``UNet2DModel`` that takes
    the image (``[-1, 1]``, plus ``extra`` channels such as a prior, if given) at timestep 0 and returns one logit
    channel. Reflect-padded to the segmenter's down-sampling factor and, with ``tile_size``, run on Gaussian-blended
    windows, exactly like the diffusion pipelines' denoiser calls.

    Example:
        >>> from diffusers import UNet2DModel
        >>> unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=1, block_out_channels=(8, 16),
        ...                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
        ...                    norm_num_groups=4, layers_per_block=1)
        >>> segmenter_probabilities(unet, torch.zeros(2, 3, 20, 20)).shape
        torch.Size([2, 1, 20, 20])
    """

    model_input = images if extra is None else torch.cat([images, extra.to(images.dtype)], dim=1)
    model_input = model_input.to(segmenter.device, segmenter.dtype)
    multiple = 2 ** (len(segmenter.config.block_out_channels) - 1)
    padded, (height, width) = pad_to_multiple(model_input, multiple)
    timestep = torch.zeros((), dtype=torch.long, device=segmenter.device)

    def forward(window: torch.Tensor) -> torch.Tensor:
        return segmenter(window, timestep, return_dict=False)[0]

    logits = tiled_predict(forward, padded, tile_size, tile_overlap)
    return logits[:, :1, :height, :width].float().sigmoid()


def processing_groups(plans: Sequence[ProcessingPlan]) -> List[Tuple[Tuple[int, int], List[int]]]:
    """Images of one call grouped by the size they are processed at (``processing_resolution``), in order of first
    appearance: ``[(size, [image indices]), ...]``. Images of one camera land in one group and run together.

    Example:
        >>> from diffusers_retina.image_processing import ProcessingPlan
        >>> processing_groups([ProcessingPlan(1.0, (8, 8), "native"), ProcessingPlan(2.0, (16, 16), "fixed"),
        ...                    ProcessingPlan(1.0, (8, 8), "native")])
        [((8, 8), [0, 2]), ((16, 16), [1])]
    """
    groups: Dict[Tuple[int, int], List[int]] = {}
    for index, plan in enumerate(plans):
        groups.setdefault(tuple(plan.size), []).append(index)
    return list(groups.items())


def rows_of(tensor: torch.Tensor, rows: List[int]) -> torch.Tensor:
    """``tensor[rows]``, as a view when every row is the same one (the members of one image: no copy of its
    condition per member)."""
    if len(set(rows)) == 1:
        return tensor[rows[0]: rows[0] + 1].expand(len(rows), *tensor.shape[1:])
    return tensor[rows]
