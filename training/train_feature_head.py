#!/usr/bin/env python
"""Train a segmentation head on diffusion features (ddpm-segmentation / DiffDGSSv2) from N labelled images.

The DDPM (``--ddpm``: a ``DDPMPipeline`` folder, e.g. trained by ``train_mask2image.py --task fundus``) stays frozen;
``DiffusionFeaturePipeline`` extracts the features of ``--crops_per_image`` random crops of each of the
``--num_labelled`` training images (cached on disk with ``--cache_dir``), and the head learns from them:

* ``--head pixel_mlp``: ``PixelMLPEnsemble`` -- every member trains on its own random pixels (``--pixels_per_step``
  per step, read bilinearly from the native-resolution maps), Adam 1e-3 (ddpm-segmentation's recipe);
* ``--head freq_agg``: ``FreqAggHead`` -- cross-entropy on whole crops, AdamW.

Both use cross-entropy weighted by 1/sqrt(class frequency) by default (``--class_weights none`` for the published
unweighted recipe): vessels cover ~10% of a photograph, and unweighted heads trained on one image predicted almost no
vessel pixel.

Whole photographs: the pipeline predicts background outside each photograph's field of view (the circular aperture,
``field_of_view="auto"``, with the surround filled by the mean colour of the field of view before the UNet sees it),
so the heads learn from pixels inside it only, on images filled the same way (``--field_of_view``, default on), and
``--edge_crop_fraction`` of the crops are centred on the field-of-view boundary, so that the bright rim of the aperture
and the dark periphery -- where heads trained on random crops marked false vessels -- are well represented.
``--feature_context image`` computes the features of each labelled photograph whole and cuts the crops from its maps:
the UNet's group normalisation pools over its whole input, so features of a crop differ from the features of the
same pixels inside a photograph; such heads segment whole photographs (``tile_size=None``).

The result is saved as a ``DiffusionFeaturePipeline`` (UNet + scheduler + head) with a ``training_info.json``.

    python training/train_feature_head.py --ddpm checkpoints/fundus-ddpm-chase --head pixel_mlp \
        --train_data_dir ../shared/data/chase_db1 --mask_dir 1stHO --mask_suffix _1stHO --num_labelled 5 \
        --blocks up.1,up.2 --timesteps 50,150,250 --policy noise --output_dir runs/head-mlp-n5
"""

import argparse
import logging
import os
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline
from tqdm.auto import tqdm

from diffusers_retina import DiffusionFeaturePipeline
from diffusers_retina.data.modality import field_of_view_masks, fill_outside_field_of_view
from diffusers_retina.feature_cache import cached_extract
from diffusers_retina.hub import write_feature_head_card
from diffusers_retina.models import FreqAggHead, PixelMLPEnsemble, read_pixels
from diffusers_retina.training_data import training_field_of_view_diameter
from diffusers_retina.training_utils import (
    build_datasets,
    check_feature_head_arguments,
    select_stems,
    write_training_record,
)

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a segmentation head on frozen diffusion features.")
    parser.add_argument("--ddpm", type=str, required=True, help="DDPMPipeline folder (UNet2DModel + scheduler).")
    parser.add_argument("--head", type=str, default="pixel_mlp", choices=["pixel_mlp", "freq_agg"])
    parser.add_argument("--blocks", type=str, default="up.1,up.2", help="Comma-separated block names (describe()).")
    parser.add_argument("--timesteps", type=str, default="50,150,250")
    parser.add_argument("--policy", type=str, default="noise", choices=["noise", "anchor", "ddim_inversion"])
    parser.add_argument("--train_data_dir", type=str, required=True)
    parser.add_argument("--image_dir", type=str, default="images")
    parser.add_argument("--mask_dir", type=str, default="masks")
    parser.add_argument("--image_suffix", type=str, default="")
    parser.add_argument("--mask_suffix", type=str, default="")
    parser.add_argument("--train_stems", type=str, default=None, help="Glob patterns of the candidate images.")
    parser.add_argument("--num_labelled", type=int, default=5, help="N: the first N candidate images (sorted).")
    parser.add_argument("--field_of_view_degrees", type=float, default=None,
                        help="The photographs' field-of-view angle in degrees (CHASE_DB1: 30), recorded in the "
                             "pipeline's config for a call's camera_degrees. Default: not recorded.")
    parser.add_argument("--crop", type=int, default=128, help="Side of the random crops features are taken from.")
    parser.add_argument("--crops_per_image", type=int, default=8)
    parser.add_argument("--field_of_view", type=int, default=1, choices=[0, 1],
                        help="1: learn from pixels inside each photograph's field of view only, the surround filled with "
                             "the field of view's mean colour (as the pipeline segments); 0: every pixel, unfilled.")
    parser.add_argument("--feature_context", type=str, default="crop", choices=["crop", "image"],
                        help="crop: the features of each crop are computed on the crop alone (segment photographs in "
                             "windows of about --crop, tile_size); image: on the whole photograph (surround filled), "
                             "the crops cut from its feature maps -- the UNet's group normalisation then sees what it "
                             "sees when a whole photograph is segmented at once (tile_size=None).")
    parser.add_argument("--edge_crop_fraction", type=float, default=0.25,
                        help="Fraction of the crops centred on a random pixel of the field-of-view boundary (the rest "
                             "are uniform over the photograph).")
    parser.add_argument("--ensemble_size", type=int, default=10, help="pixel_mlp: members.")
    parser.add_argument("--embed_dim", type=int, default=32, help="freq_agg: projection width.")
    parser.add_argument("--max_train_steps", type=int, default=2000, help="Steps (per member for pixel_mlp).")
    parser.add_argument("--pixels_per_step", type=int, default=64, help="pixel_mlp: batch of pixels.")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--class_weights", type=str, default="inverse_sqrt", choices=["none", "inverse_sqrt"],
                        help="Cross-entropy class weights: 'inverse_sqrt' weighs each class by 1/sqrt(its pixel "
                             "frequency in the labelled masks) -- vessels are ~10%% of a fundus photograph, and "
                             "unweighted heads predict almost no vessel pixel; 'none' is ddpm-segmentation's recipe.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Feature cache folder (reused across runs).")
    parser.add_argument("--save_dtype", type=str, default="float16", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the saved pipeline weights (UNet and head).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=str, required=True)
    args = parser.parse_args(argv)
    args.num_classes, args.image_channels = 2, 3
    args.dataset_name = None
    args.validation_stems = None
    if args.num_labelled < 1:
        parser.error("--num_labelled must be at least 1.")
    if not 0.0 <= args.edge_crop_fraction <= 1.0:
        parser.error(f"--edge_crop_fraction must lie in [0, 1], got {args.edge_crop_fraction}.")
    check_feature_head_arguments(parser, args)  # counts, learning rate, timesteps, --ddpm folder
    return args


def labelled_dataset(args):
    stems = select_stems(args.train_data_dir, args.train_stems or "*", args.image_dir, args.image_suffix)  # sorted
    args.train_stems = ",".join(stems[: args.num_labelled])
    train, _ = build_datasets(args)
    if len(train) < args.num_labelled:
        raise ValueError(f"--num_labelled {args.num_labelled} but only {len(train)} labelled images were found.")
    return [train[i] for i in range(args.num_labelled)]


def prepare_photographs(items, args):
    """``(image, fov)`` of each labelled photograph, computed once: the image the UNet sees (its surround filled with
    the field of view's mean colour with ``--field_of_view 1``, as the pipeline segments) and its field of view."""
    photographs = []
    for item in items:
        fov = field_of_view_masks(item["image"][None])[0]
        image = fill_outside_field_of_view(item["image"][None], fov[None])[0] if args.field_of_view else item["image"]
        photographs.append((image, fov))
    return photographs


def random_crops(items, photographs, args, multiple):
    """``--crops_per_image`` random crops of each labelled image (sizes rounded down to the UNet's factor): a fraction
    ``--edge_crop_fraction`` centred on the field-of-view boundary, the rest uniform. ``photographs``: from
    :func:`prepare_photographs`. Returns images, masks, the field of view of every crop (all ``True`` with
    ``--field_of_view 0``) and the crop boxes ``(image index, top, left, size)``."""
    generator = torch.Generator().manual_seed(args.seed)
    crop = max(multiple, args.crop - args.crop % multiple)
    num_edge = round(args.crops_per_image * args.edge_crop_fraction)
    images, masks, fovs, boxes = [], [], [], []
    for item_index, (item, (image, fov)) in enumerate(zip(items, photographs)):
        height, width = item["mask"].shape
        inner = F.max_pool2d((~fov)[None, None].float(), 3, stride=1, padding=1)[0, 0].bool() & fov
        boundary = inner.nonzero()  # field-of-view pixels next to the outside
        for index in range(args.crops_per_image):
            if index < num_edge and len(boundary):
                row, col = boundary[int(torch.randint(0, len(boundary), (1,), generator=generator))].tolist()
                top = min(max(row - crop // 2, 0), max(height - crop, 0))
                left = min(max(col - crop // 2, 0), max(width - crop, 0))
            else:
                top = int(torch.randint(0, max(height - crop, 0) + 1, (1,), generator=generator))
                left = int(torch.randint(0, max(width - crop, 0) + 1, (1,), generator=generator))
            if args.feature_context == "image":  # on the grid of every block's feature map
                top, left = top - top % multiple, left - left % multiple
            boxes.append((item_index, top, left, crop))
            images.append(image[:, top: top + crop, left: left + crop])
            masks.append(item["mask"][top: top + crop, left: left + crop])
            fovs.append(fov[top: top + crop, left: left + crop] if args.field_of_view else
                        torch.ones(masks[-1].shape, dtype=torch.bool))
    return torch.stack(images), torch.stack(masks), torch.stack(fovs), boxes


def extract_features(pipe, images, blocks, timesteps, args, batch_size):
    """The features of prepared images: through the on-disk cache with ``--cache_dir`` (reused across runs and heads),
    else straight from the UNet."""
    settings = dict(blocks=blocks, timesteps=timesteps, policy=args.policy, seed=args.seed, batch_size=batch_size)
    if args.cache_dir:
        return cached_extract(pipe, images, args.cache_dir, **settings)
    return pipe.extract(images, **settings)


def whole_image_features(pipe, photographs, boxes, blocks, timesteps, args):
    """``--feature_context image``: each labelled photograph as the UNet sees it (:func:`prepare_photographs`) goes
    through the UNet whole, and the crops' windows are cut from its native-resolution maps (one photograph's maps in
    memory at a time). With ``--cache_dir`` the whole maps are cached too, so another head on the same photographs
    skips the UNet."""
    from diffusers_retina.image_processing import pad_to_multiple

    strides = {d["name"]: d["stride"] for d in pipe.describe()}
    features = {name: [None] * len(boxes) for name in blocks}
    for item_index, (image, _) in enumerate(tqdm(photographs, desc="whole-photograph features", leave=False)):
        padded, _ = pad_to_multiple(image[None], pipe.size_multiple)
        maps = extract_features(pipe, padded, blocks, timesteps, args, batch_size=len(timesteps))
        for position, (owner, top, left, crop) in enumerate(boxes):
            if owner == item_index:
                for name in blocks:
                    s = strides[name]
                    features[name][position] = maps[name][0, :, :, top // s: (top + crop) // s,
                                                          left // s: (left + crop) // s].clone()
    return {name: torch.stack(crops) for name, crops in features.items()}


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    torch.manual_seed(args.seed)
    started = time.time()
    ddpm = DDPMPipeline.from_pretrained(args.ddpm)
    pipe = DiffusionFeaturePipeline(unet=ddpm.unet.float(), scheduler=ddpm.scheduler)
    pipe.set_progress_bar_config(disable=True)
    blocks = [b.strip() for b in args.blocks.split(",")]
    timesteps = [int(t) for t in args.timesteps.split(",")]
    channels = {d["name"]: d["channels"] for d in pipe.describe()}
    unknown = [b for b in blocks if b not in channels]
    if unknown:
        raise SystemExit(f"--blocks {unknown} are not blocks of this UNet; choose from {list(channels)}.")

    items = labelled_dataset(args)
    photographs = prepare_photographs(items, args)
    # the scale the head learns at: processing_resolution="auto" brings every photograph's field of view to it
    pipe.register_to_config(field_of_view_diameter=training_field_of_view_diameter(
        ((item["image"] + 1) / 2).permute(1, 2, 0).numpy() for item in items),
        field_of_view_degrees=args.field_of_view_degrees)
    images, masks, fovs, boxes = random_crops(items, photographs, args, pipe.size_multiple)
    logger.info(f"{len(images)} crops of {images.shape[-1]} px from {args.num_labelled} labelled image(s); "
                f"{fovs.float().mean().item():.1%} of their pixels inside the field of view; features of the "
                f"{'crops' if args.feature_context == 'crop' else 'whole photographs'}")
    if args.feature_context == "crop":
        features = extract_features(pipe, images, blocks, timesteps, args, batch_size=len(timesteps) * 4)
    else:
        features = whole_image_features(pipe, photographs, boxes, blocks, timesteps, args)
    size = tuple(images.shape[-2:])
    common = dict(blocks=blocks, timesteps=timesteps, block_channels=[channels[b] for b in blocks],
                  policy=args.policy, num_classes=2)
    weights = class_weights(masks[fovs], 2, args.class_weights)
    logger.info(f"class weights: {None if weights is None else weights.tolist()}")
    if args.head == "pixel_mlp":
        head = PixelMLPEnsemble(ensemble_size=args.ensemble_size, **common)
        train_pixel_mlp(head, features, masks, fovs, size, args, weights)
    else:
        head = FreqAggHead(embed_dim=args.embed_dim, **common)
        train_freq_agg(head, features, masks, fovs, size, args, weights)

    pipe.set_head(head.eval())
    pipe.to(getattr(torch, args.save_dtype)).save_pretrained(args.output_dir)
    write_training_record(args.output_dir, vars(args), "training/train_feature_head.py", args.max_train_steps,
                          time.time() - started, head,
                          argv=argv, num_labelled=args.num_labelled, ddpm=args.ddpm,
                          unet_parameters=sum(p.numel() for p in pipe.unet.parameters()))
    write_feature_head_card(args.output_dir)
    logger.info(f"Saved {args.output_dir}")


def class_weights(masks: torch.Tensor, num_classes: int, scheme: str):
    """Cross-entropy weights from the labelled masks: None, or 1/sqrt(frequency) normalised to mean 1."""
    if scheme == "none":
        return None
    counts = torch.bincount(masks.reshape(-1).long(), minlength=num_classes).float().clamp_min(1)
    weights = (counts / counts.sum()).rsqrt()
    return weights / weights.mean()


def train_pixel_mlp(head, features, masks, fovs, size, args, weights):
    """Each member on its own random pixels (inside the field of view) of random crops, Adam 1e-3
    (ddpm-segmentation); a pixel's vector is read from the native-resolution maps (its four neighbours only)."""
    candidates = fovs.nonzero()  # (crop, row, col) of every pixel a member may learn from
    if len(candidates) == 0:
        raise ValueError("No crop pixel lies inside a field of view: check the images, or use --field_of_view 0.")
    for member in range(len(head.members)):
        generator = torch.Generator().manual_seed(args.seed * 1000 + member)
        optimizer = torch.optim.Adam(head.members[member].parameters(), lr=args.learning_rate)
        head.train()
        for _ in tqdm(range(args.max_train_steps), desc=f"member {member + 1}/{len(head.members)}", leave=False):
            crop, rows, cols = candidates[torch.randint(0, len(candidates), (args.pixels_per_step,),
                                                        generator=generator)].unbind(-1)
            vectors = read_pixels(features, head.config.blocks, torch.stack([rows, cols], dim=-1), size,
                                  image_index=crop)
            loss = F.cross_entropy(head(vectors, member=member).logits, masks[crop, rows, cols].long(), weight=weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def train_freq_agg(head, features, masks, fovs, size, args, weights):
    """Cross-entropy on whole crops (batches of 4; pixels outside the field of view ignored), AdamW."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    head.train()
    for _ in tqdm(range(args.max_train_steps), desc="freq_agg", leave=False):
        batch = torch.randint(0, masks.shape[0], (4,), generator=generator)
        logits = head({name: maps[batch] for name, maps in features.items()}, size=size).logits
        targets = masks[batch].long().masked_fill(~fovs[batch], -100)
        loss = F.cross_entropy(logits, targets, weight=weights, ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
