"""What the accelerate training scripts in ``training/`` share on the model side: the ``Accelerator`` of the flags,
the set-up of a run (EMA, optimizer, learning-rate schedule, resumable data order, resumption), the EMA weights for
validation and saving, the run record ``training_info.json`` and the upload with ``--push_to_hub``.

Each script stays one readable file with its own parser and ``main()`` loop (diffusers' example style); only the
plumbing that must behave identically everywhere -- above all the resume-equals-uninterrupted guarantee -- lives in
the library: the shared flags in :mod:`diffusers_retina.training_arguments`, the data in
:mod:`diffusers_retina.training_data`, checkpoints in :mod:`diffusers_retina.checkpointing`, and the rest here (which
also re-exports those modules' names, as older scripts import them from here).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from .checkpointing import (  # noqa: F401 (re-exported)
    CHECKPOINT_COMPLETE,
    CHECKPOINT_PREFIX,
    TrainingClock,
    check_resumable,
    checkpoint_step,
    complete_checkpoints,
    find_resume_checkpoint,
    is_complete_checkpoint,
    register_clock_checkpointing,
    resume_position,
    save_checkpoint,
)
from .data import RandomPatchDataset
from .hub import TRAINING_INFO, dataset_provenance
from .hub.upload import create_repo, push_checkpoint
from .training_arguments import (  # noqa: F401 (re-exported)
    add_data_arguments,
    add_optimization_arguments,
    add_output_arguments,
    check_data_arguments,
    check_feature_head_arguments,
    check_finite_positive,
    check_fraction,
    check_optimization_arguments,
    check_pipeline_folder,
    check_positive_integers,
    check_resume_argument,
    resolve_data_format,
)
from .training_data import (  # noqa: F401 (re-exported)
    DataArguments,
    EpochSampler,
    arguments_from,
    augmentation_options,
    build_brats_datasets,
    build_datasets,
    build_hf_datasets,
    central_crop,
    epoch_dataloader,
    load_prior_maps,
    parse_scale_range,
    parse_slice_range,
    select_brats_patients,
    select_stems,
    sharded_length,
    step_generator,
)
from .utils.io_utils import command_line, write_json

@dataclass
class RunArguments:
    """Where a run writes, how it is accelerated and where it is published (``add_output_arguments``' flags)."""

    output_dir: str
    logging_dir: str = "logs"
    seed: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    report_to: str = "none"
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_token: Optional[str] = None
    hub_private_repo: bool = False


@dataclass
class OptimizationArguments:
    """The optimiser, its schedule, EMA and resumption (``add_optimization_arguments``' flags). ``max_train_steps``
    None: ``num_epochs`` epochs of the prepared loader."""

    output_dir: str
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    max_train_steps: Optional[int] = None
    num_epochs: int = 1
    gradient_accumulation_steps: int = 1
    use_ema: bool = False
    ema_max_decay: float = 0.9999
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    resume_from_checkpoint: Optional[str] = None
    seed: int = 0


@dataclass
class PatchArguments:
    """Random training patches of the data and their augmentation (``--resolution``, ``--patches_per_image``, ...)."""

    resolution: int = 64
    patches_per_image: int = 16
    foreground_fraction: float = 0.5
    train_batch_size: int = 8
    dataloader_num_workers: int = 0
    photometric_augmentation: float = 0.0
    scale_augmentation: Optional[str] = None
    prior_maps: Optional[str] = None
    seed: int = 0


def push_folder(folder: str, repo_id: Optional[str] = None, token: Optional[str] = None,
                private: bool = False) -> None:
    """Upload a saved pipeline folder with ``--push_to_hub``: the allow-list of ``diffusers-retina push``
    (:func:`diffusers_retina.hub.upload.files_to_push`: weights, configs, shims with the self-contained code bundle, card,
    records, small PNGs; never the ``checkpoint-*`` training states, optimizer states, pickles or logs) to ``repo_id``
    (as resolved by :func:`create_hub_repo` at the start of training; default the folder's name)."""
    push_checkpoint(folder, repo_id or Path(folder).name, token=token, private=private)


def create_hub_repo(run: RunArguments) -> Optional[str]:
    """With ``push_to_hub``, create (or reuse) the Hub repo before training, so a missing login, a network failure or
    a name clash fails in the first seconds rather than after hours. Returns the full repo id (``user/name``), which
    the model card and the final upload then use; None without ``push_to_hub``."""
    if not run.push_to_hub:
        return None
    repo_id = run.hub_model_id or Path(run.output_dir).name
    try:
        return create_repo(repo_id, token=run.hub_token, private=run.hub_private_repo)
    except Exception as error:
        raise RuntimeError(f"--push_to_hub: could not create the Hub repo {repo_id!r} (log in with "
                           f"`huggingface-cli login` or pass --hub_token; HF_HUB_OFFLINE must be unset): "
                           f"{type(error).__name__}: {error}") from error


# ------------------------------------------------------------------------------------------------ set-up


def make_accelerator(run: RunArguments) -> Tuple[Accelerator, Optional[str]]:
    """The ``Accelerator`` of ``run``, logging, the seed (set before the model is built, so its initial weights depend
    only on the seed), the output folder and, with ``push_to_hub``, the Hub repo (:func:`create_hub_repo`). Returns
    the accelerator and the repo id (None without ``push_to_hub``, and on processes other than the main one)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        mixed_precision=run.mixed_precision,
        log_with=None if run.report_to in ("none", "") else run.report_to,
        project_config=ProjectConfiguration(project_dir=run.output_dir,
                                            logging_dir=os.path.join(run.output_dir, run.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(run.seed)
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(run.output_dir, exist_ok=True)
        repo_id = create_hub_repo(run)  # --push_to_hub: fail now, not after training
    return accelerator, repo_id


@dataclass
class TrainingState:
    """Everything ``prepare_training`` sets up; the scripts' loops read it."""

    model: torch.nn.Module
    ema_model: Optional[object]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    train_dataloader: torch.utils.data.DataLoader
    validation_dataset: Optional[torch.utils.data.Dataset]
    clock: TrainingClock
    num_epochs: int
    max_train_steps: int
    global_step: int = 0
    first_epoch: int = 0
    resume_step: int = 0


def _ema_model(accelerator, optimization: OptimizationArguments, model) -> Optional[EMAModel]:
    """With ``use_ema``, the EMA of ``model``'s weights, saved in and restored from accelerate's checkpoints
    (``unet_ema/``); None otherwise."""
    if not optimization.use_ema:
        return None
    model_cls = type(model)
    ema_model = EMAModel(model.parameters(), decay=optimization.ema_max_decay, use_ema_warmup=True,
                         inv_gamma=optimization.ema_inv_gamma, power=optimization.ema_power, model_cls=model_cls,
                         model_config=model.config)

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load_model_hook(models, input_dir):
        loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), model_cls)
        ema_model.load_state_dict(loaded.state_dict())
        del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    return ema_model


def _patch_dataloader(data: DataArguments, patches: PatchArguments):
    """Random patches of the training data in the resumable order of :class:`EpochSampler`, and the validation
    dataset."""
    train_dataset, validation_dataset = build_datasets(data)
    dataset = RandomPatchDataset(
        train_dataset, patch_size=patches.resolution, patches_per_image=patches.patches_per_image,
        foreground_fraction=patches.foreground_fraction, augment=True, seed=patches.seed,
        **augmentation_options(train_dataset, photometric=patches.photometric_augmentation,
                               scale_augmentation=patches.scale_augmentation, prior_maps=patches.prior_maps))
    loader = torch.utils.data.DataLoader(dataset, batch_size=patches.train_batch_size,
                                         sampler=EpochSampler(len(dataset), patches.seed),
                                         num_workers=patches.dataloader_num_workers, drop_last=True)
    return loader, validation_dataset


def _log_run(logger, project_name: str, accelerator, model, patches: int, batch_size: int, accumulation: int,
             num_epochs: int, max_train_steps: int, batches_per_process: int) -> None:
    total_batch_size = batch_size * accelerator.num_processes * accumulation
    logger.info(f"***** Running training ({project_name}) *****")
    logger.info(f"  Patches per epoch = {patches}  |  Epochs = {num_epochs}  |  Total batch = {total_batch_size}")
    logger.info(f"  Processes = {accelerator.num_processes} ({accelerator.distributed_type.value})  |  "
                f"Batches per process per epoch = {batches_per_process}")
    logger.info(f"  Optimisation steps = {max_train_steps}  |  "
                f"Parameters = {sum(p.numel() for p in model.parameters()):,}")


def prepare_training(accelerator, model, data: DataArguments, patches: PatchArguments,
                     optimization: OptimizationArguments, logger, project_name: str,
                     tracker_config: Optional[Dict[str, Any]] = None) -> TrainingState:
    """EMA (saved inside accelerate's checkpoints), the training clock, random patches of the training data in a
    resumable order, AdamW with the learning-rate schedule, ``accelerator.prepare``, trackers (``tracker_config``:
    the flags to log) and resumption from ``optimization.resume_from_checkpoint``. ``state.max_train_steps`` is the
    step count the run will take (from ``num_epochs`` when ``max_train_steps`` is None).

    Example (what a script's ``main`` does with its parsed flags)::

        state = prepare_training(accelerator, model, DataArguments.from_args(args), arguments_from(PatchArguments, args),
                                 arguments_from(OptimizationArguments, args), logger, "my_script", vars(args))
    """
    opt = optimization
    ema_model = _ema_model(accelerator, opt, model)
    clock = TrainingClock()
    register_clock_checkpointing(accelerator, clock)  # JSON in the checkpoint, never pickled
    train_dataloader, validation_dataset = _patch_dataloader(data, patches)
    num_patches = len(train_dataloader.dataset)

    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.learning_rate, betas=(opt.adam_beta1, opt.adam_beta2),
                                  weight_decay=opt.adam_weight_decay, eps=opt.adam_epsilon)
    # The schedule is built before `prepare` (as in diffusers' examples) from the per-process loader length that
    # sharding will give; the prepared scheduler steps once per process, hence the factor num_processes.
    max_train_steps = opt.max_train_steps
    if max_train_steps is None:
        sharded_batches = sharded_length(len(train_dataloader), accelerator.num_processes, drop_last=True)
        max_train_steps = opt.num_epochs * math.ceil(sharded_batches / opt.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(opt.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=opt.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)

    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(model, optimizer, train_dataloader,
                                                                           lr_scheduler)
    # Step and epoch accounting from the prepared (per-process) loader: with N processes an epoch is N times shorter.
    if len(train_dataloader) == 0:
        raise ValueError(f"{num_patches} patches per epoch make no full batch of --train_batch_size "
                         f"{patches.train_batch_size} on each of {accelerator.num_processes} processes: raise "
                         "--patches_per_image or lower --train_batch_size.")
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / opt.gradient_accumulation_steps)
    if opt.max_train_steps is None and max_train_steps != opt.num_epochs * num_update_steps_per_epoch:
        logger.warning(f"The prepared loader has {len(train_dataloader)} batches per process, not the expected "
                       f"{sharded_batches}: --max_train_steps follows the prepared loader.")
        max_train_steps = opt.num_epochs * num_update_steps_per_epoch
    num_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)
    if ema_model is not None:
        ema_model.to(accelerator.device)
    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers(project_name, config={
            k: v for k, v in (tracker_config or {}).items() if isinstance(v, (int, float, str, bool))})
    _log_run(logger, project_name, accelerator, model, num_patches, patches.train_batch_size,
             opt.gradient_accumulation_steps, num_epochs, max_train_steps, len(train_dataloader))

    state = TrainingState(model=model, ema_model=ema_model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                          train_dataloader=train_dataloader, validation_dataset=validation_dataset, clock=clock,
                          num_epochs=num_epochs, max_train_steps=max_train_steps)
    path = find_resume_checkpoint(opt.resume_from_checkpoint, opt.output_dir)
    if opt.resume_from_checkpoint and path is None:
        logger.info("No checkpoint found in --output_dir: starting a new run.")
    elif path is not None:
        logger.info(f"Resuming from {path}")
        accelerator.load_state(path)
        state.global_step, state.first_epoch, state.resume_step = resume_position(
            path, num_update_steps_per_epoch, opt.gradient_accumulation_steps)
    return state


@contextmanager
def ema_weights(accelerator, model, ema_model):
    """The unwrapped model in eval mode with the EMA weights (if any), restored to the training weights after."""
    unwrapped = accelerator.unwrap_model(model)
    if ema_model is not None:
        ema_model.store(unwrapped.parameters())
        ema_model.copy_to(unwrapped.parameters())
    unwrapped.eval()
    try:
        yield unwrapped
    finally:
        if ema_model is not None:
            ema_model.restore(unwrapped.parameters())
        unwrapped.train()


def final_weights(accelerator, model, ema_model, save_dtype: str):
    """The unwrapped model with its EMA weights (if any), cast to ``--save_dtype``, for saving."""
    unwrapped = accelerator.unwrap_model(model)
    if ema_model is not None:
        ema_model.copy_to(unwrapped.parameters())
    return unwrapped.to(getattr(torch, save_dtype))


def launch_record(train_batch_size: Optional[int] = None, gradient_accumulation_steps: int = 1) -> dict:
    """How this run was launched, read from the environment the launcher set and from accelerate's ``PartialState``:
    ``launcher`` ("python", "accelerate launch" or "torchrun"), ``distributed_type``, ``num_processes`` (world size),
    ``num_machines``, the per-process batch, gradient accumulation and the global batch of one optimisation step."""
    state = PartialState()
    if "ACCELERATE_DYNAMO_BACKEND" in os.environ:  # set by every `accelerate launch` launcher, by nothing else
        launcher = "accelerate launch"
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        launcher = "torchrun"
    else:
        launcher = "python"
    world_size = state.num_processes
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    # scripts without batches of patches (train_feature_head.py) record no batch figures
    batch, accumulation = train_batch_size, gradient_accumulation_steps
    return {
        "launcher": launcher,
        "distributed_type": str(state.distributed_type.value),
        "num_processes": world_size,
        "num_machines": max(world_size // max(local_world_size, 1), 1),
        "train_batch_size_per_process": batch,
        "gradient_accumulation_steps": accumulation,
        "total_batch_size": None if batch is None else batch * world_size * accumulation,
    }


def launch_command(launch: dict, script: str) -> list:
    """The command line before the script's own arguments that reproduces ``launch`` (``launch_record``); on several
    machines the per-machine flags are left as ``<placeholders>``."""
    if launch["launcher"] == "python":
        return ["python", script]
    num_processes, num_machines = launch["num_processes"], launch["num_machines"]
    if launch["launcher"] == "torchrun":
        nodes = ["--nnodes", str(num_machines), "--node_rank", "<rank>", "--master_addr", "<ip>"] if num_machines > 1 \
            else []
        return ["torchrun", *nodes, "--nproc_per_node", str(num_processes // num_machines), script]
    if num_processes == 1:
        return ["accelerate", "launch", script]
    prefix = ["ACCELERATE_USE_CPU=1"] if launch["distributed_type"] == "MULTI_CPU" else []
    nodes = ["--num_machines", str(num_machines), "--machine_rank", "<rank>", "--main_process_ip", "<ip>"] \
        if num_machines > 1 else []
    return [*prefix, "accelerate", "launch", "--multi_gpu", *nodes, "--num_processes", str(num_processes), script]


def write_training_record(output_dir: str, arguments: Dict[str, Any], script: str, global_step: int, seconds: float,
                          model, argv=None, **extra) -> None:
    """``output_dir/training_info.json``: the run's ``arguments`` (the parsed flags as a dict; a ``hub_token`` is left
    out), the data's provenance (``"dataset"``: name, licence, attribution and the images used, see
    :func:`diffusers_retina.hub.dataset_provenance`), the exact command (``argv``: the arguments given to ``main``,
    default the process's), how it was launched, steps, time, size, extras."""
    arguments = {k: v for k, v in arguments.items() if k != "hub_token"}
    launch = launch_record(arguments.get("train_batch_size"), arguments.get("gradient_accumulation_steps") or 1)
    write_json(os.path.join(output_dir, TRAINING_INFO), {
        "args": arguments,
        # the data's name, licence and attribution from its provenance files or metadata (the cards are built on it)
        "dataset": dataset_provenance(arguments),
        "command": command_line(launch_command(launch, script) + list(sys.argv[1:] if argv is None else argv)),
        "launch": launch,
        "global_step": global_step,
        "training_seconds": seconds,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        **extra,
    })
