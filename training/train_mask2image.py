#!/usr/bin/env python
"""Train the models of a Mask2ImagePipeline (ReTree: vessel mask -> fundus photograph).

``--task image`` (default) trains a ``ConditionalUNet2DModel`` that denoises image patches given their mask
(``--conditioning concat | spade | concat+spade``; ``--condition_dropout`` replaces the mask by the learned null
condition so classifier-free guidance works at sampling time) and saves a ``Mask2ImagePipeline``; with
``--mask_pipeline <folder>`` a trained mask model is included, so the saved pipeline samples masks and images.
``--task mask`` trains the unconditional mask model: a stock ``UNet2DModel`` over vessel masks, saved as a diffusers
``DDPMPipeline`` (it samples masks on its own too). ``--task fundus`` trains the same kind of unconditional model over
the photographs themselves -- the fundus DDPM that ``DiffusionFeaturePipeline`` reads features from.

In the shape of diffusers' ``examples/unconditional_image_generation/train_unconditional.py``; the flags and the
checkpoint/resume plumbing are those of ``train_segmentation_ensemble.py`` (``diffusers_retina.training_utils``).
Runs on CPU, one GPU or many (``accelerate launch --multi_gpu training/train_mask2image.py ...``).

Reference checkpoints (CHASE_DB1 train split, CPU; the exact commands are in the model cards):

    python training/train_mask2image.py --task mask --train_data_dir ../shared/data/chase_db1 --mask_dir 1stHO \
        --mask_suffix _1stHO --train_stems "Image_0*,Image_10*" --output_dir checkpoints/vessel-mask-ddpm-chase ...
    python training/train_mask2image.py --task image --conditioning concat+spade ... \
        --mask_pipeline checkpoints/vessel-mask-ddpm-chase --output_dir checkpoints/mask2image-chase
"""

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from diffusers_retina import Mask2ImagePipeline, SegmentationEnsemblePipeline
from diffusers_retina.image_processing import mask_to_diffusion
from diffusers_retina.models import ConditionalUNet2DModel
from diffusers_retina.synthesis import image_grid, mask_faithfulness
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
    check_pipeline_folder,
    ema_weights,
    epoch_dataloader,
    final_weights,
    make_accelerator,
    prepare_training,
    push_folder,
    save_checkpoint,
    step_generator,
    write_training_record,
)

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a mask-to-image diffusion model (ReTree) or its mask model.")
    add_data_arguments(parser, default_resolution=128)
    # model
    parser.add_argument("--task", type=str, default="image", choices=["image", "mask", "fundus"],
                        help="image: mask-conditioned image model; mask: unconditional mask model; fundus: "
                             "unconditional image model (a DDPM to extract features from).")
    parser.add_argument("--conditioning", type=str, default="concat", choices=["concat", "spade", "concat+spade"])
    parser.add_argument("--spade_blocks", type=str, default="decoder", choices=["decoder", "all"])
    parser.add_argument("--spade_norm", type=str, default="group", choices=["group", "instance"])
    parser.add_argument("--spade_hidden_channels", type=int, default=128)
    parser.add_argument("--condition_dropout", type=float, default=0.2,
                        help="Probability of replacing a sample's mask by the null condition (classifier-free guidance).")
    parser.add_argument("--block_out_channels", type=str, default="32,64,128,128")
    parser.add_argument("--layers_per_block", type=int, default=1)
    parser.add_argument("--norm_num_groups", type=int, default=8)
    parser.add_argument("--attention", action="store_true", help="Use attention blocks at the lowest resolution.")
    parser.add_argument("--prediction_type", type=str, default="epsilon", choices=["epsilon", "sample", "v_prediction"])
    parser.add_argument("--num_train_timesteps", type=int, default=1000)
    parser.add_argument("--beta_schedule", type=str, default="linear")
    parser.add_argument("--loss", type=str, default="mse", choices=["mse", "l1"], help="AdaptDiff uses L1.")
    parser.add_argument("--mask_pipeline", type=str, default=None,
                        help="--task image: a trained mask model (DDPMPipeline folder) to include in the saved pipeline.")
    # validation
    parser.add_argument("--validation_inference_steps", type=int, default=25)
    parser.add_argument("--validation_guidance_scale", type=float, default=1.5)
    parser.add_argument("--validation_num_masks", type=int, default=4,
                        help="--task mask / fundus: samples drawn per validation.")
    parser.add_argument("--faithfulness_pipeline", type=str, default=None,
                        help="--task image: a SegmentationEnsemblePipeline that segments the validation images; its "
                             "Dice against the input masks is logged (mask faithfulness).")
    add_optimization_arguments(parser, default_learning_rate=3e-4)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    check_data_arguments(parser, args)
    check_optimization_arguments(parser, args)  # zero steps/intervals, a batch larger than an epoch, ...
    if args.task != "image" and (args.mask_pipeline or args.faithfulness_pipeline):
        parser.error("--mask_pipeline and --faithfulness_pipeline belong to --task image.")
    if not 0.0 <= args.condition_dropout < 1.0:
        parser.error(f"--condition_dropout must lie in [0, 1), got {args.condition_dropout}.")
    # read only when the trained model is saved: check it before training
    check_pipeline_folder(parser, "--mask_pipeline", args.mask_pipeline, out_channels=1 if args.num_classes == 2
                          else args.num_classes)
    return args


def build_model(args):
    mask_channels = 1 if args.num_classes == 2 else args.num_classes
    channels = tuple(int(c) for c in args.block_out_channels.split(","))
    down = ["DownBlock2D"] * len(channels)
    up = ["UpBlock2D"] * len(channels)
    if args.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    common = dict(sample_size=args.resolution, block_out_channels=channels, layers_per_block=args.layers_per_block,
                  down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=args.norm_num_groups)
    if args.task == "mask":
        return UNet2DModel(in_channels=mask_channels, out_channels=mask_channels, **common)
    if args.task == "fundus":
        return UNet2DModel(in_channels=args.image_channels, out_channels=args.image_channels, **common)
    return ConditionalUNet2DModel(
        in_channels=args.image_channels, out_channels=args.image_channels, mask_channels=mask_channels,
        conditioning=args.conditioning, spade_blocks=args.spade_blocks, spade_norm=args.spade_norm,
        spade_hidden_channels=args.spade_hidden_channels, **common,
    )


def inference_scheduler(noise_scheduler):
    """DDIM with "trailing" spacing, so few-step sampling starts at t = T - 1 (pure noise)."""
    return DDIMScheduler.from_config(noise_scheduler.config, timestep_spacing="trailing")


def run_validation(model, noise_scheduler, validation, args, step, faithfulness_segmenter=None):
    """Sample, write ``validation/step-<N>.png`` (image task: mask | synthetic | real per row; mask and fundus tasks:
    unconditional samples) and return the mean mask-faithfulness Dice (image task with a segmenter) or None."""
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    if args.task in ("mask", "fundus"):
        pipeline = DDPMPipeline(unet=model, scheduler=inference_scheduler(noise_scheduler))
        pipeline.set_progress_bar_config(disable=True)
        samples = pipeline(batch_size=args.validation_num_masks, num_inference_steps=args.validation_inference_steps,
                           generator=generator, output_type="np").images
        cells = [sample[..., 0] > 0.5 for sample in samples] if args.task == "mask" else list(samples)
        image_grid([cells]).save(folder / f"step-{step:06d}.png")
        return None
    pipeline = Mask2ImagePipeline(unet=model, scheduler=inference_scheduler(noise_scheduler))
    pipeline.set_progress_bar_config(disable=True)
    rows, images, masks = [], [], []
    for index in range(len(validation)):
        item = validation[index]
        mask = central_crop(item["mask"], args.validation_crop)
        output = pipeline(mask, num_inference_steps=args.validation_inference_steps,
                          guidance_scale=args.validation_guidance_scale, generator=generator, output_type="pt")
        real = (central_crop(item["image"], args.validation_crop) + 1) / 2
        rows.append([mask.numpy() > 0, output.images[0].permute(1, 2, 0).numpy(), real.permute(1, 2, 0).numpy()])
        images.append(output.images[0])
        masks.append(mask)
    image_grid(rows).save(folder / f"step-{step:06d}.png")
    if faithfulness_segmenter is None:
        return None
    return float(np.mean(mask_faithfulness(faithfulness_segmenter, torch.stack(images), torch.stack(masks))))


def main(argv=None):
    args = parse_args(argv)
    accelerator, repo_id = make_accelerator(arguments_from(RunArguments, args))
    args.hub_model_id = repo_id or args.hub_model_id  # --push_to_hub: the full repo id, for the card and the upload

    # model and noise schedule; EMA, data, optimiser, checkpoints and resumption come from prepare_training
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
                                    prediction_type=args.prediction_type)
    state = prepare_training(accelerator, build_model(args), DataArguments.from_args(args),
                             arguments_from(PatchArguments, args), arguments_from(OptimizationArguments, args), logger,
                             f"train_mask2image ({args.task} model)", tracker_config=vars(args))
    args.max_train_steps = state.max_train_steps
    model, ema_model, optimizer, lr_scheduler = state.model, state.ema_model, state.optimizer, state.lr_scheduler
    global_step = state.global_step
    faithfulness_segmenter = None
    if args.faithfulness_pipeline and accelerator.is_main_process:
        faithfulness_segmenter = SegmentationEnsemblePipeline.from_pretrained(args.faithfulness_pipeline,
                                                                              dtype=torch.float32)
        faithfulness_segmenter.set_progress_bar_config(disable=True)

    progress_bar = tqdm(range(global_step, args.max_train_steps), disable=not accelerator.is_local_main_process,
                        desc="Steps")
    validation_score = None
    for epoch in range(state.first_epoch, state.num_epochs):
        model.train()
        for batch in epoch_dataloader(accelerator, state.train_dataloader, epoch, state.first_epoch,
                                      state.resume_step):
            generator = step_generator(args.seed, global_step, accelerator.process_index)
            masks = mask_to_diffusion(batch["mask"], args.num_classes).to(batch["image"].dtype)
            clean = masks if args.task == "mask" else batch["image"]  # image and fundus tasks denoise photographs
            noise = torch.randn(clean.shape, generator=generator).to(clean.device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                      generator=generator).to(clean.device)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            if args.prediction_type == "epsilon":
                target = noise
            elif args.prediction_type == "sample":
                target = clean
            else:
                target = noise_scheduler.get_velocity(clean, noise, timesteps)

            with accelerator.accumulate(model):
                if args.task != "image":  # unconditional models
                    prediction = model(noisy, timesteps).sample
                else:
                    drop = (torch.rand(clean.shape[0], generator=generator) < args.condition_dropout).to(clean.device)
                    prediction = model(noisy, timesteps, mask=masks, drop_condition=drop).sample
                loss_fn = F.l1_loss if args.loss == "l1" else F.mse_loss
                loss = loss_fn(prediction.float(), target.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                if ema_model is not None:
                    ema_model.step(model.parameters())
                progress_bar.update(1)
                global_step += 1
                logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
                progress_bar.set_postfix(**logs)
                if accelerator.is_main_process:
                    if global_step % args.checkpointing_steps == 0:
                        save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
                    if global_step % args.validation_steps == 0:
                        validation_score = validate(accelerator, model, ema_model, noise_scheduler,
                                                    state.validation_dataset, args, global_step,
                                                    faithfulness_segmenter)
                        if validation_score is not None:
                            logs["mask_faithfulness_dice"] = validation_score
                            logger.info(f"step {global_step}: mask-faithfulness Dice {validation_score:.4f}")
                accelerator.log(logs, step=global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        validation_score = validate(accelerator, model, ema_model, noise_scheduler, state.validation_dataset, args,
                                    global_step, faithfulness_segmenter)
        save_pipeline(accelerator, model, ema_model, noise_scheduler, args, global_step, validation_score,
                      state.clock.elapsed(), argv)
    accelerator.end_training()


def validate(accelerator, model, ema_model, noise_scheduler, validation_dataset, args, step, segmenter):
    if args.task == "image" and validation_dataset is None:
        return None
    with ema_weights(accelerator, model, ema_model) as unwrapped:
        return run_validation(unwrapped, noise_scheduler, validation_dataset, args, step, segmenter)


def save_pipeline(accelerator, model, ema_model, noise_scheduler, args, global_step, validation_score, seconds,
                  argv=None):
    from diffusers_retina.hub import write_mask2image_card

    unwrapped = final_weights(accelerator, model, ema_model, args.save_dtype)
    if args.task in ("mask", "fundus"):
        pipeline = DDPMPipeline(unet=unwrapped, scheduler=inference_scheduler(noise_scheduler))
        pipeline.save_pretrained(args.output_dir, safe_serialization=True)
    else:
        mask_unet = mask_scheduler = None
        if args.mask_pipeline:
            mask_model = DDPMPipeline.from_pretrained(args.mask_pipeline)
            mask_unet, mask_scheduler = mask_model.unet.to(getattr(torch, args.save_dtype)), mask_model.scheduler
        pipeline = Mask2ImagePipeline(unet=unwrapped, scheduler=inference_scheduler(noise_scheduler),
                                      mask_unet=mask_unet, mask_scheduler=mask_scheduler)
        pipeline.save_pretrained(args.output_dir)
    write_training_record(args.output_dir, vars(args), "training/train_mask2image.py", global_step, seconds, unwrapped,
                          argv=argv,
                          validation_faithfulness_dice=validation_score)
    write_mask2image_card(args.output_dir, repo_id=args.hub_model_id)
    if args.push_to_hub:
        push_folder(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)


if __name__ == "__main__":
    main()
