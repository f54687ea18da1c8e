#!/usr/bin/env python
"""Train a SegmentationEnsemblePipeline (Wolleb et al. 2022: a DDPM over the mask, the image as a prior).

``--model unet`` (default) trains a stock ``UNet2DModel`` on the noisy mask concatenated with the image;
``--model medsegdiff`` trains a ``MedSegDiffUNet2DModel`` (condition encoder, dynamic conditional encoding, FF-Parser;
``--no_dynamic_encoding`` / ``--no_ff_parser`` for the ablation, ``--aux_loss_weight`` for the condition encoder's
auxiliary segmentation loss). Same loop, same data, same checkpoints for both.

``--objective supervised`` trains the same architecture as a plain deterministic segmenter instead (image in, mask
logits out at timestep 0, BCE + soft Dice): the same-budget baseline to report next to the diffusion model (same
patches in the same order, optimiser, schedule, EMA and steps). It saves the UNet alone (``<output_dir>/unet``);
``benchmarks/evaluate_segmentation.py --baseline <output_dir>`` scores it with the same tiles and metrics.
``--init_unet DIR`` starts it from a saved segmenter instead of random weights (fine-tuning: AdaptDiff's last step,
``training/adaptdiff_workflow.py``).

Prior-anchored diffusion: ``--prior_maps DIR`` gives every training image a prior probability map (made by
``training/make_prior_maps.py``, out of fold so that training priors look like test-time priors) and the denoiser
takes it as one more input channel. ``--anchor residual`` learns the residual ``y - p`` from pure noise;
``--anchor strength --anchor_strength S`` learns the mask only over the first ``S`` of the noise schedule (sampling
starts from the noised prior). ``--prior_segmenter DIR`` is the segmenter saved into the pipeline as its ``prior``
(the one that made the test-time priors). With ``--objective supervised`` the prior maps make a deterministic cascade
(``[image | prior]`` in, logits out: the control with no noise).

Feature-reusing refiner: ``--refiner features --prior_folds DIR`` trains a ``PriorFeatureRefinerModel`` (a light head
over the prior's last decoder features, computed once per image at inference) instead of a second U-Net. Its training
priors *and features* come, on every augmented patch, from the out-of-fold student that did not see the photograph
(``make_prior_maps.py --folds K --distill_from PRIOR``: students distilled from the shipped prior, so their features are
the prior's). ``--objective supervised --distill_from PRIOR`` is how those students are trained: no labels, the loss is
the distance to the prior's decoder features plus the BCE to its probabilities.

In the shape of diffusers' ``examples/unconditional_image_generation/train_unconditional.py``: one file, argparse at
the top, ``main()`` with the accelerate loop. Runs unchanged on CPU, one GPU or many
(``accelerate launch --multi_gpu training/train_segmentation_ensemble.py ...``).

Reference checkpoint (CHASE_DB1 train split, CPU):

    python training/train_segmentation_ensemble.py \
        --train_data_dir ../shared/data/chase_db1 --mask_dir 1stHO --mask_suffix _1stHO \
        --train_stems "Image_0*,Image_10*" --output_dir checkpoints/segmentation-ensemble-chase ...

(the exact command and its figures are in the checkpoint's model card and the README).
"""

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from diffusers_retina import SegmentationEnsemblePipeline
from diffusers_retina.image_processing import mask_to_diffusion
from diffusers_retina.metrics import dice as dice_score
from diffusers_retina.fold_priors import FoldPriors
from diffusers_retina.models import MedSegDiffUNet2DModel, PriorFeatureRefinerModel, segmenter_features
from diffusers_retina.pipelines.sampling import segmenter_probabilities
from diffusers_retina.training_data import training_field_of_view_diameter, training_vessel_fraction
from diffusers_retina.training_utils import (
    DataArguments,
    OptimizationArguments,
    PatchArguments,
    RunArguments,
    arguments_from,
    add_data_arguments,
    add_optimization_arguments,
    add_output_arguments,
    central_crop,
    check_data_arguments,
    check_optimization_arguments,
    ema_weights,
    epoch_dataloader,
    final_weights,
    make_accelerator,
    prepare_training,
    push_folder,
    resolve_data_format,
    save_checkpoint,
    step_generator,
    write_training_record,
)

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a diffusion segmentation ensemble (Wolleb et al.).")
    add_data_arguments(parser, default_resolution=64)
    # model
    parser.add_argument("--objective", type=str, default="diffusion", choices=["diffusion", "supervised"],
                        help="diffusion: the ensemble model; supervised: the same UNet as a deterministic segmenter "
                             "(the same-budget baseline; saved as a bare UNet, no pipeline).")
    parser.add_argument("--model", type=str, default="unet", choices=["unet", "medsegdiff"],
                        help="unet: stock UNet2DModel (image concatenated); medsegdiff: MedSegDiffUNet2DModel.")
    parser.add_argument("--no_dynamic_encoding", dest="dynamic_encoding", action="store_false",
                        help="medsegdiff: fuse by plain addition instead of (LN(m_I) * LN(m_x)) * m_I.")
    parser.add_argument("--no_ff_parser", dest="ff_parser", action="store_false",
                        help="medsegdiff: no FF-Parser on the mask-stream features before each fusion.")
    parser.add_argument("--ff_parser_grid", type=str, default="16,9",
                        help="medsegdiff: rows,cols of the FF-Parser's stored frequency grid.")
    parser.add_argument("--aux_loss_weight", type=float, default=0.0,
                        help="medsegdiff: weight of the condition encoder's own segmentation loss (0: no head; "
                             "the published code uses 10 with its loss scale).")
    parser.add_argument("--init_unet", type=str, default=None,
                        help="--objective supervised: start from this saved UNet2DModel folder (fine-tuning, e.g. "
                             "AdaptDiff's adaptation of a source segmenter); its config replaces the model flags.")
    parser.add_argument("--block_out_channels", type=str, default="32,64,128")
    parser.add_argument("--layers_per_block", type=int, default=1)
    parser.add_argument("--norm_num_groups", type=int, default=8)
    parser.add_argument("--attention", action="store_true", help="Use attention blocks at the lowest resolution.")
    parser.add_argument("--prediction_type", type=str, default="sample", choices=["epsilon", "sample", "v_prediction"],
                        help="Wolleb et al. use epsilon; x0 ('sample') learned faster on CPU and works at 2 DDIM steps.")
    parser.add_argument("--num_train_timesteps", type=int, default=1000)
    # prior anchoring
    parser.add_argument("--prior_maps", type=str, default=None,
                        help="Folder of <stem>.png prior probability maps of the training images "
                             "(training/make_prior_maps.py); the model takes the prior as an input channel.")
    parser.add_argument("--anchor", type=str, default=None, choices=["residual", "strength"],
                        help="Diffusion objective with --prior_maps: residual (y - p from noise) or strength "
                             "(img2img from the noised prior).")
    parser.add_argument("--anchor_strength", type=float, default=0.4,
                        help="--anchor strength: fraction of the noise schedule trained and sampled from.")
    parser.add_argument("--prior_segmenter", type=str, default=None,
                        help="The deterministic segmenter (a UNet2DModel folder) saved as the pipeline's prior.")
    parser.add_argument("--refiner", type=str, default="unet", choices=["unet", "features"],
                        help="The anchored denoiser: a second UNet2DModel over [state | image | prior] (unet), or a "
                             "PriorFeatureRefinerModel over the prior's decoder features (features; needs "
                             "--prior_folds and --anchor residual).")
    parser.add_argument("--refiner_channels", type=int, default=16,
                        help="--refiner features: width of the head (hidden_channels).")
    parser.add_argument("--prior_folds", type=str, default=None,
                        help="--refiner features: the output folder of make_prior_maps.py --folds K --distill_from "
                             "PRIOR (out-of-fold students whose features are the prior's).")
    parser.add_argument("--distill_from", type=str, default=None,
                        help="--objective supervised: train without labels to reproduce this segmenter's decoder "
                             "features and probabilities (an out-of-fold student for --prior_folds).")
    parser.add_argument("--default_denoising_steps", type=int, default=None,
                        help="Steps stored with the saved pipeline as its default (Marigold's convention).")
    parser.add_argument("--beta_schedule", type=str, default="linear")
    # validation
    parser.add_argument("--validation_ensemble_size", type=int, default=3)
    parser.add_argument("--validation_inference_steps", type=int, default=2)
    add_optimization_arguments(parser, default_learning_rate=1e-3)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    # flag combinations first (they need no file), then the data and the numbers
    if args.model == "unet" and args.aux_loss_weight:
        parser.error("--aux_loss_weight needs --model medsegdiff (a stock UNet2DModel has no condition encoder).")
    if args.objective == "supervised" and args.model != "unet":
        parser.error("--objective supervised trains a stock UNet2DModel (--model unet).")
    if args.init_unet is not None:
        if args.objective != "supervised" or args.prior_maps:
            parser.error("--init_unet fine-tunes a deterministic segmenter: it needs --objective supervised and no "
                         "--prior_maps.")
        if not os.path.isfile(os.path.join(args.init_unet, "config.json")):
            parser.error(f"--init_unet {args.init_unet!r} has no config.json (a saved UNet2DModel folder).")
    if args.loss_mask_dir is not None and (args.objective != "supervised" or args.distill_from is not None
                                           or args.train_data_dir is None or args.data_format != "folder"):
        parser.error("--loss_mask_dir masks the supervised loss of an image folder: it needs --objective supervised, "
                     "--train_data_dir with --data_format folder, and no --distill_from.")
    check_data_arguments(parser, args)
    check_optimization_arguments(parser, args)  # zero steps/intervals, a batch larger than an epoch, ...
    resolve_data_format(parser, args)  # --data_format brats: image channels = modalities
    if args.objective == "diffusion" and args.prior_maps and args.anchor is None:
        parser.error("--prior_maps with the diffusion objective needs --anchor residual|strength.")
    check_refiner_arguments(parser, args)
    if args.anchor is not None:
        if not (args.prior_maps or args.prior_folds) or not args.prior_segmenter:
            parser.error("--anchor needs --prior_maps (training priors; --prior_folds with --refiner features) and "
                         "--prior_segmenter (the saved prior).")
        if args.objective != "diffusion" or args.model != "unet" or args.num_classes != 2:
            parser.error("--anchor is implemented for the diffusion objective, --model unet and binary masks.")
        if not 0.0 < args.anchor_strength <= 1.0:
            parser.error(f"--anchor_strength must lie in (0, 1], got {args.anchor_strength}.")
        if not os.path.isfile(os.path.join(args.prior_segmenter, "config.json")):
            parser.error(f"--prior_segmenter {args.prior_segmenter!r} has no config.json (a saved UNet2DModel folder).")
    if args.prior_maps and args.validation_stems and not args.prior_segmenter:
        parser.error("Validation with --prior_maps needs --prior_segmenter (it makes the validation images' priors).")
    if args.prior_maps and not os.path.isdir(args.prior_maps):
        parser.error(f"--prior_maps {args.prior_maps!r} is not a folder.")
    if args.default_denoising_steps is not None and args.default_denoising_steps < 1:
        parser.error("--default_denoising_steps must be a positive integer.")
    return args


def check_refiner_arguments(parser, args) -> None:
    """The flags of the feature-reusing refiner and of its distilled students."""
    if args.refiner == "features":
        if args.objective != "diffusion" or args.anchor != "residual" or not args.prior_folds:
            parser.error("--refiner features trains the diffusion objective with --anchor residual and --prior_folds.")
        if args.prior_maps:
            parser.error("--refiner features takes its training priors from --prior_folds, not --prior_maps.")
        if args.num_classes != 2 or args.model != "unet":
            parser.error("--refiner features is implemented for binary masks (--num_classes 2, --model unet).")
        if args.refiner_channels < 1:
            parser.error(f"--refiner_channels must be a positive integer, got {args.refiner_channels}.")
    elif args.prior_folds:
        parser.error("--prior_folds is the training prior of --refiner features.")
    if args.distill_from is not None:
        if args.objective != "supervised" or args.prior_maps or args.init_unet:
            parser.error("--distill_from trains a deterministic student: --objective supervised, without "
                         "--prior_maps or --init_unet.")
        if not os.path.isfile(os.path.join(args.distill_from, "config.json")):
            parser.error(f"--distill_from {args.distill_from!r} has no config.json (a saved UNet2DModel folder).")


def build_unet(args):
    if args.refiner == "features":
        prior = UNet2DModel.load_config(args.prior_segmenter)
        return PriorFeatureRefinerModel(feature_channels=int(prior["block_out_channels"][0]),
                                        hidden_channels=args.refiner_channels)
    if args.init_unet is not None:  # fine-tuning: the saved segmenter, in float32 for training
        unet = UNet2DModel.from_pretrained(args.init_unet, torch_dtype=torch.float32)
        if unet.config.in_channels != args.image_channels or unet.config.out_channels != (
                1 if args.num_classes == 2 else args.num_classes):
            raise ValueError(f"--init_unet {args.init_unet!r} takes {unet.config.in_channels} channels and returns "
                             f"{unet.config.out_channels}; the data has {args.image_channels} image channels and "
                             f"{args.num_classes} classes.")
        return unet
    mask_channels = 1 if args.num_classes == 2 else args.num_classes
    channels = tuple(int(c) for c in args.block_out_channels.split(","))
    down = ["DownBlock2D"] * len(channels)
    up = ["UpBlock2D"] * len(channels)
    if args.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    # the supervised baseline sees the image alone; the diffusion model the noisy mask and the image
    in_channels = args.image_channels + (mask_channels if args.objective == "diffusion" else 0)
    if args.prior_maps:  # the prior is one more input channel
        in_channels += 1
    common = dict(sample_size=args.resolution, in_channels=in_channels,
                  out_channels=mask_channels, block_out_channels=channels, layers_per_block=args.layers_per_block,
                  down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=args.norm_num_groups)
    if args.model == "medsegdiff":
        return MedSegDiffUNet2DModel(
            image_channels=args.image_channels, dynamic_encoding=args.dynamic_encoding, ff_parser=args.ff_parser,
            ff_parser_grid=tuple(int(n) for n in args.ff_parser_grid.split(",")),
            condition_head=args.aux_loss_weight > 0, **common,
        )
    return UNet2DModel(**common)


def auxiliary_loss(condition_logits, masks, num_classes):
    """The condition encoder's own segmentation loss: BCE (binary) or cross-entropy (K classes) on its logits."""
    if num_classes == 2:
        return F.binary_cross_entropy_with_logits(condition_logits[:, 0].float(), (masks > 0).float())
    return F.cross_entropy(condition_logits.float(), masks.long())


def diffusion_loss(unet, noise_scheduler, images, masks, args, generator, prior=None, features=None):
    """Wolleb et al.: noise the mask to a random timestep and regress the target from ``[noisy mask | image]``.
    With a ``prior`` (probabilities, ``(N, 1, H, W)``) the denoiser also sees ``q = 2p - 1``; ``--anchor residual``
    diffuses the residual ``y - p`` instead of the mask, ``--anchor strength`` only trains the timesteps below
    ``anchor_strength * T`` (sampling starts there). With ``features`` (``--refiner features``) the denoiser is a
    ``PriorFeatureRefinerModel`` reading them and ``q`` instead of the image. Returns ``(model output, MSE loss)``."""
    clean_masks = mask_to_diffusion(masks, args.num_classes).to(images.dtype)
    condition = images
    max_timestep = noise_scheduler.config.num_train_timesteps
    if prior is not None:
        prior_masks = (2.0 * prior - 1.0).to(images.dtype)
        condition = torch.cat([images, prior_masks], dim=1)
        if args.anchor == "residual":
            clean_masks = (clean_masks - prior_masks) / 2.0  # = y - p, in [-1, 1]
        elif args.anchor == "strength":
            max_timestep = max(1, int(round(args.anchor_strength * max_timestep)))
    noise = torch.randn(clean_masks.shape, generator=generator).to(images.device)
    timesteps = torch.randint(0, max_timestep, (images.shape[0],), generator=generator).to(images.device)
    noisy_masks = noise_scheduler.add_noise(clean_masks, noise, timesteps)
    if args.prediction_type == "epsilon":
        target = noise
    elif args.prediction_type == "sample":
        target = clean_masks
    else:
        target = noise_scheduler.get_velocity(clean_masks, noise, timesteps)
    if features is not None:
        output = unet(noisy_masks, timesteps, features=features.to(images.dtype), prior_masks=prior_masks)
    else:
        output = unet(torch.cat([noisy_masks, condition], dim=1), timesteps)
    return output, F.mse_loss(output.sample[:, : clean_masks.shape[1]].float(), target.float())


def supervised_loss(logits, masks, num_classes, loss_mask=None):
    """The deterministic baseline's loss: BCE (binary) or cross-entropy (K classes) plus a soft Dice loss over the
    batch (foreground classes; binary: its sums run over the batch and the columns, one Dice per patch row, as the
    shipped segmenters were trained). ``loss_mask`` (bool ``(N, H, W)``, ``--loss_mask_dir``): only these pixels
    count, in both terms."""
    weight = None if loss_mask is None else loss_mask.float()
    if num_classes == 2:
        target = (masks > 0).float()
        probability = logits[:, 0].float().sigmoid()
        pixel_loss = F.binary_cross_entropy_with_logits(logits[:, 0].float(), target, reduction="none")
    else:
        target = F.one_hot(masks.long(), num_classes).permute(0, 3, 1, 2)[:, 1:].float()
        probability = logits.float().softmax(dim=1)[:, 1:]
        pixel_loss = F.cross_entropy(logits.float(), masks.long(), reduction="none")
        weight = None if weight is None else weight[:, None]
    if weight is None:
        overlap_loss = pixel_loss.mean()
    else:
        overlap_loss = (pixel_loss * weight.reshape(pixel_loss.shape)).sum() / weight.sum().clamp(min=1.0)
        probability, target = probability * weight, target * weight
    dims = (0, *range(2, probability.dim()))
    dice = (2 * (probability * target).sum(dims) + 1) / (probability.sum(dims) + target.sum(dims) + 1)
    return overlap_loss + (1 - dice).mean()


def distillation_loss(student, teacher, images):
    """An out-of-fold student's loss (``--distill_from``): mean squared distance to the teacher's last decoder
    features plus the BCE of its logits to the teacher's probabilities (no labels)."""
    logits, features = segmenter_features(student, images)
    with torch.no_grad():
        teacher_logits, teacher_features = segmenter_features(teacher, images)
    return (F.mse_loss(features.float(), teacher_features.float())
            + F.binary_cross_entropy_with_logits(logits[:, :1].float(), teacher_logits[:, :1].float().sigmoid()))


def supervised_masks(logits, num_classes):
    """Hard masks from the baseline's logits: sigmoid > 0.5 (binary) or argmax (K classes)."""
    if num_classes == 2:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def inference_scheduler(noise_scheduler):
    """DDIM with "trailing" spacing: with few steps the first one starts at t = T - 1 (pure noise), which is what
    the initial latents are; the default "leading" spacing would start 2 steps at t = T / 2."""
    return DDIMScheduler.from_config(noise_scheduler.config, timestep_spacing="trailing")


def run_validation(unet, noise_scheduler, validation, args, seed):
    """Sample the validation images with a few DDIM steps (the supervised baseline: one forward) and return their mean
    Dice (monitoring only)."""
    prior = None
    if args.prior_maps or args.prior_folds:  # validation priors come from the segmenter the pipeline will ship
        prior = UNet2DModel.from_pretrained(args.prior_segmenter).to(unet.device, unet.dtype).eval()
    if args.objective == "diffusion":
        anchoring = {} if prior is None else dict(prior=prior, anchor=args.anchor, anchor_strength=args.anchor_strength)
        pipeline = SegmentationEnsemblePipeline(unet=unet, scheduler=inference_scheduler(noise_scheduler), **anchoring)
        pipeline.set_progress_bar_config(disable=True)
    scores = []
    for index in range(len(validation)):
        item = validation[index]
        image, mask = central_crop(item["image"], args.validation_crop), central_crop(item["mask"], args.validation_crop)
        if args.objective == "supervised":
            inputs = image[None].to(unet.device, unet.dtype)
            with torch.no_grad():
                if prior is not None:
                    inputs = torch.cat([inputs, 2.0 * segmenter_probabilities(prior, inputs).to(inputs.dtype) - 1.0], 1)
                logits = unet(inputs, 0).sample
            predicted = supervised_masks(logits, args.num_classes)[0].cpu()
        else:
            predicted = pipeline((image + 1) / 2, num_inference_steps=args.validation_inference_steps,
                                 ensemble_size=args.validation_ensemble_size,
                                 generator=torch.Generator().manual_seed(seed), output_type="pt").masks[0]
        if args.num_classes == 2:
            scores.append(dice_score(predicted, mask))
        else:
            scores.append(np.mean([dice_score(predicted == k, mask == k) for k in range(1, args.num_classes)]))
    return float(np.mean(scores))


def main(argv=None):
    args = parse_args(argv)
    accelerator, repo_id = make_accelerator(arguments_from(RunArguments, args))
    args.hub_model_id = repo_id or args.hub_model_id  # --push_to_hub: the full repo id, for the card and the upload

    # model and noise schedule; EMA, data, optimiser, checkpoints and resumption come from prepare_training
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
                                    prediction_type=args.prediction_type)
    state = prepare_training(accelerator, build_unet(args), DataArguments.from_args(args),
                             arguments_from(PatchArguments, args), arguments_from(OptimizationArguments, args), logger,
                             "train_segmentation_ensemble", tracker_config=vars(args))
    args.max_train_steps = state.max_train_steps
    unet, ema_unet, optimizer, lr_scheduler = state.model, state.ema_model, state.optimizer, state.lr_scheduler
    global_step = state.global_step
    # the scale the models learn at: processing_resolution="auto" brings every photograph's field of view to it
    args.field_of_view_diameter = None if args.data_format == "brats" else training_field_of_view_diameter(
        sample.image for sample in state.train_dataloader.dataset.samples)
    # what adaptation's label-free transform rule compares pseudo-labels to (diffusers_retina.adaptation)
    args.training_vessel_fraction = None if args.data_format == "brats" or args.num_classes != 2 else \
        training_vessel_fraction(state.train_dataloader.dataset.samples)
    teacher = fold_priors = None
    if args.distill_from:
        teacher = UNet2DModel.from_pretrained(args.distill_from, dtype=torch.float32)
        teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
    if args.prior_folds:
        stems = [sample.name for sample in state.train_dataloader.dataset.samples]
        fold_priors = FoldPriors(args.prior_folds, args.prior_segmenter, stems).to(accelerator.device)

    progress_bar = tqdm(range(global_step, args.max_train_steps), disable=not accelerator.is_local_main_process,
                        desc="Steps")
    validation_dice = None
    for epoch in range(state.first_epoch, state.num_epochs):
        unet.train()
        for batch in epoch_dataloader(accelerator, state.train_dataloader, epoch, state.first_epoch,
                                      state.resume_step):
            images = batch["image"]
            prior = batch.get("prior")  # (N, 1, H, W) probabilities with --prior_maps
            features = None
            if fold_priors is not None:  # the out-of-fold student's prior and features on this augmented patch
                prior_masks, features = fold_priors(batch["name"], images)
                prior = (prior_masks + 1.0) / 2.0
            with accelerator.accumulate(unet):
                if teacher is not None:
                    loss = distillation_loss(unet, teacher, images)
                elif args.objective == "supervised":
                    inputs = images if prior is None else torch.cat([images, 2.0 * prior - 1.0], dim=1)
                    output = unet(inputs, torch.zeros(images.shape[0], dtype=torch.long, device=images.device))
                    loss = supervised_loss(output.sample, batch["mask"], args.num_classes, batch.get("fov"))
                else:
                    generator = step_generator(args.seed, global_step, accelerator.process_index)
                    output, loss = diffusion_loss(unet, noise_scheduler, images, batch["mask"], args, generator,
                                                  prior=prior, features=features)
                if args.aux_loss_weight:
                    loss = loss + args.aux_loss_weight * auxiliary_loss(output.condition_logits, batch["mask"],
                                                                        args.num_classes)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                if ema_unet is not None:
                    ema_unet.step(unet.parameters())
                progress_bar.update(1)
                global_step += 1
                logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
                if ema_unet is not None:
                    logs["ema_decay"] = ema_unet.cur_decay_value
                progress_bar.set_postfix(**logs)

                if accelerator.is_main_process:
                    if global_step % args.checkpointing_steps == 0:
                        save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
                    if state.validation_dataset is not None and global_step % args.validation_steps == 0:
                        validation_dice = validate(accelerator, unet, ema_unet, noise_scheduler,
                                                   state.validation_dataset, args)
                        logs["validation_dice"] = validation_dice
                        logger.info(f"step {global_step}: validation Dice {validation_dice:.4f}")
                accelerator.log(logs, step=global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if state.validation_dataset is not None:
            validation_dice = validate(accelerator, unet, ema_unet, noise_scheduler, state.validation_dataset, args)
            logger.info(f"final validation Dice {validation_dice:.4f}")
        save_pipeline(accelerator, unet, ema_unet, noise_scheduler, args, global_step, validation_dice,
                      state.clock.elapsed(), argv)
    accelerator.end_training()


def validate(accelerator, unet, ema_unet, noise_scheduler, validation_dataset, args):
    with ema_weights(accelerator, unet, ema_unet) as model:
        return run_validation(model, noise_scheduler, validation_dataset, args, args.seed)


def save_pipeline(accelerator, unet, ema_unet, noise_scheduler, args, global_step, validation_dice, seconds,
                  argv=None):
    from diffusers_retina.hub import write_segmentation_card

    model = final_weights(accelerator, unet, ema_unet, args.save_dtype)
    if args.objective == "supervised":  # a bare UNet: the baseline is not a diffusion pipeline (and has no card)
        model.save_pretrained(os.path.join(args.output_dir, "unet"))
    else:
        anchoring = {}
        if args.anchor is not None:
            prior = UNet2DModel.from_pretrained(args.prior_segmenter).to(model.dtype)
            anchoring = dict(prior=prior, anchor=args.anchor, anchor_strength=args.anchor_strength)
        SegmentationEnsemblePipeline(unet=model, scheduler=inference_scheduler(noise_scheduler),
                                     default_denoising_steps=args.default_denoising_steps,
                                     field_of_view_diameter=getattr(args, "field_of_view_diameter", None),
                                     field_of_view_degrees=args.field_of_view_degrees,
                                     **anchoring).save_pretrained(args.output_dir)
    extra = {}
    if args.anchor is not None:  # the card names how the prior was made
        from diffusers_retina.hub import TRAINING_INFO, read_json

        for folder in (args.prior_segmenter, os.path.dirname(os.path.normpath(args.prior_segmenter))):
            prior_info = read_json(os.path.join(folder, TRAINING_INFO))
            if prior_info:
                extra["prior_command"] = prior_info["command"]
                break
    write_training_record(args.output_dir, vars(args), "training/train_segmentation_ensemble.py", global_step,
                          seconds, model, argv=argv,
                          validation_dice=validation_dice, **extra)
    if args.objective == "diffusion":
        write_segmentation_card(args.output_dir, repo_id=args.hub_model_id)
    elif not args.prior_maps:  # the deterministic segmenter is a model of its own: its folder gets the record + card
        import shutil

        from diffusers_retina.hub import TRAINING_INFO, write_segmenter_card

        shutil.copy(os.path.join(args.output_dir, TRAINING_INFO), os.path.join(args.output_dir, "unet", TRAINING_INFO))
        write_segmenter_card(os.path.join(args.output_dir, "unet"), repo_id=args.hub_model_id)
    if args.push_to_hub:
        push_folder(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)


if __name__ == "__main__":
    main()
