"""MedSegDiffUNet2DModel (FF-Parser + dynamic conditional encoding) on its own, inside SegmentationEnsemblePipeline,
through save/load, and in the training script (``--model medsegdiff``). Tiny configs only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from safetensors.torch import load_file

from diffusers_retina import SegmentationEnsemblePipeline
from diffusers_retina.models import DynamicConditionalEncoding, FFParser, MedSegDiffUNet2DModel

from testing_utils import unit_range

REPO = Path(__file__).resolve().parents[1]


def tiny_medsegdiff(seed: int = 0, **config) -> MedSegDiffUNet2DModel:
    torch.manual_seed(seed)
    defaults = dict(sample_size=16, in_channels=4, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                    ff_parser_grid=(6, 4))
    defaults.update(config)
    return MedSegDiffUNet2DModel(**defaults).eval()


def perturb_ff_parsers(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every FF-Parser away from the identity (as training would)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FFParser):
                module.weight.add_(0.5 * torch.randn(module.weight.shape, generator=generator))


def sample_input(batch=2, height=16, width=16, mask_channels=1, seed=0):
    return torch.randn(batch, mask_channels + 3, height, width, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ FF-Parser


@pytest.mark.parametrize("size", [(16, 16), (7, 12), (33, 20), (1, 5)])
def test_ff_parser_is_the_identity_at_init_for_any_size(size):
    parser = FFParser(channels=3, grid_size=(16, 9))
    features = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(parser(features), features, rtol=0, atol=1e-5)


def test_ff_parser_samples_its_grid_at_the_input_frequencies():
    """With a 17x9 grid, the rfft2 frequencies of a 16x16 input fall on grid points: the filter *is* the weights."""
    parser = FFParser(channels=2, grid_size=(17, 9))
    with torch.no_grad():
        parser.weight.copy_(torch.randn(parser.weight.shape, generator=torch.Generator().manual_seed(0)))
    sampled = parser.frequency_filter(16, 16)
    assert sampled.shape == (2, 16, 9)
    # rfft2 row k holds frequency k/16 for k < 8 and (k - 16)/16 above; grid row i holds -1/2 + i/16
    rows = [(k if k < 8 else k - 16) + 8 for k in range(16)]
    expected = torch.complex(parser.weight[:, 0, rows], parser.weight[:, 1, rows])
    torch.testing.assert_close(sampled, expected, rtol=0, atol=1e-5)


def test_ff_parser_filter_acts_and_is_learnable():
    parser = FFParser(channels=1, grid_size=(8, 5))
    with torch.no_grad():
        parser.weight.zero_()  # a zero filter removes everything
    assert parser(torch.randn(1, 1, 12, 20)).abs().max() < 1e-6

    parser = FFParser(channels=1, grid_size=(8, 5))
    features = torch.randn(1, 1, 12, 20, generator=torch.Generator().manual_seed(0))
    parser(features).square().sum().backward()
    assert parser.weight.grad is not None and parser.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_ff_parser_stays_finite_in_half_precision(dtype):
    parser = FFParser(channels=4, grid_size=(16, 9)).to(dtype)
    perturb_ff_parsers(parser)
    # large activations: a half-precision FFT would overflow on the DC term (sum over 64x80 pixels of ~1e3)
    features = (torch.randn(2, 4, 64, 80, generator=torch.Generator().manual_seed(0)) * 1000).to(dtype)
    out = parser(features)
    assert out.dtype == dtype and torch.isfinite(out).all()
    reference = FFParser(channels=4, grid_size=(16, 9))
    reference.load_state_dict({k: v.float() for k, v in parser.state_dict().items()})
    torch.testing.assert_close(out.float(), reference(features.float()), rtol=0.02, atol=0.02 * 1000)


def test_ff_parser_keeps_the_channels_last_layout():
    """Pipelines run channels-last on the CPU; the FFT returns NCHW, so the parser must hand back the caller's layout
    (a layout switch before every following convolution cost the whole channels-last gain)."""
    parser = FFParser(channels=4, grid_size=(16, 9))
    perturb_ff_parsers(parser)
    features = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(0))
    plain = parser(features)
    channels_last = parser(features.contiguous(memory_format=torch.channels_last))
    assert plain.is_contiguous() and channels_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, plain)


# -------------------------------------------------------------------------------------- dynamic encoding


def test_dynamic_conditional_encoding_formula():
    fusion = DynamicConditionalEncoding(channels=4, dynamic=True, ff_parser=False)
    generator = torch.Generator().manual_seed(0)
    mask_features, condition = torch.randn(2, 4, 6, 10, generator=generator), torch.randn(2, 4, 6, 10,
                                                                                           generator=generator)

    def layer_norm(x):  # over (C, H, W) per sample, as in the paper
        return torch.nn.functional.layer_norm(x, x.shape[1:], eps=1e-5)

    expected = mask_features + layer_norm(condition) * layer_norm(mask_features) * condition
    torch.testing.assert_close(fusion(mask_features, condition), expected, rtol=1e-5, atol=1e-5)

    additive = DynamicConditionalEncoding(channels=4, dynamic=False, ff_parser=False)
    torch.testing.assert_close(additive(mask_features, condition), mask_features + condition)


# ----------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("size", [(16, 16), (16, 40), (48, 24)])
def test_model_accepts_non_square_sizes(size):
    model = tiny_medsegdiff()
    perturb_ff_parsers(model)
    output = model(sample_input(height=size[0], width=size[1]), torch.tensor([3, 70]))
    assert output.sample.shape == (2, 1, *size) and torch.isfinite(output.sample).all()
    assert output.condition_logits is None


def test_model_rejects_bad_inputs_clearly():
    model = tiny_medsegdiff()
    with pytest.raises(ValueError, match="multiple of the down-sampling factor 2"):
        model(sample_input(height=15), 1)
    with pytest.raises(ValueError, match="expected 4"):
        model(torch.randn(1, 3, 16, 16), 1)
    with pytest.raises(ValueError, match="image_channels"):
        MedSegDiffUNet2DModel(in_channels=3, image_channels=3)


def test_ff_parser_flag_changes_nothing_at_init_and_something_once_trained():
    """FF-Parsers start as the identity: the same weights with and without them give the same output."""
    with_ff = tiny_medsegdiff(ff_parser=True)
    without_ff = tiny_medsegdiff(ff_parser=False)
    missing, unexpected = without_ff.load_state_dict(with_ff.state_dict(), strict=False)
    assert missing == [] and unexpected and all("ff_parser" in key for key in unexpected)
    x, t = sample_input(), torch.tensor([5, 50])
    torch.testing.assert_close(with_ff(x, t).sample, without_ff(x, t).sample, rtol=0, atol=1e-5)
    perturb_ff_parsers(with_ff)
    assert not torch.allclose(with_ff(x, t).sample, without_ff(x, t).sample, atol=1e-3)


def test_ablation_flags_build_the_documented_modules():
    full = tiny_medsegdiff()
    assert sum(isinstance(m, FFParser) for m in full.modules()) == 3  # after conv_in and after each down block
    plain = tiny_medsegdiff(ff_parser=False, dynamic_encoding=False)
    assert not any(isinstance(m, FFParser) for m in plain.modules())
    assert all(not fusion.dynamic for fusion in plain.fusions)
    x, t = sample_input(), torch.tensor([5, 50])
    assert not torch.allclose(tiny_medsegdiff(dynamic_encoding=False)(x, t).sample, full(x, t).sample, atol=1e-4)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "additive"])
def test_gradient_reaches_the_condition_encoder_through_every_fusion(dynamic):
    model = tiny_medsegdiff(dynamic_encoding=dynamic).train()
    perturb_ff_parsers(model)
    captured = []

    def keep_condition(module, args):
        condition = args[1]
        condition.retain_grad()
        captured.append(condition)

    hooks = [fusion.register_forward_pre_hook(keep_condition) for fusion in model.fusions]
    try:
        model(sample_input(), torch.tensor([10, 900])).sample.square().mean().backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert len(captured) == len(model.fusions)
    for condition in captured:
        assert condition.grad is not None and condition.grad.abs().sum() > 0
    for name, parameter in model.named_parameters():
        if name.startswith(("condition_conv_in", "condition_blocks")):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_condition_head_predicts_from_the_image_alone():
    model = tiny_medsegdiff(condition_head=True)
    x = sample_input(height=16, width=32)
    output = model(x, torch.tensor([1, 2]))
    assert output.condition_logits.shape == (2, 1, 16, 32)
    # the condition stream never sees the noisy mask or the timestep
    other = x.clone()
    other[:, :1] = torch.randn(2, 1, 16, 32)
    torch.testing.assert_close(model(other, torch.tensor([500, 999])).condition_logits, output.condition_logits)
    sample, logits = model(x, torch.tensor([1, 2]), return_dict=False)
    torch.testing.assert_close(sample, output.sample)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_model_runs_finite_in_half_precision(dtype):
    model = tiny_medsegdiff()
    perturb_ff_parsers(model)
    reference = model(sample_input(), torch.tensor([5, 500])).sample
    output = model.to(dtype)(sample_input().to(dtype), torch.tensor([5, 500])).sample
    assert output.dtype == dtype and torch.isfinite(output).all()
    torch.testing.assert_close(output.float(), reference, rtol=0, atol=0.1)


# ---------------------------------------------------------------------------------------- in the pipeline


def medsegdiff_pipeline(scheduler_cls=DDIMScheduler, **config) -> SegmentationEnsemblePipeline:
    model = tiny_medsegdiff(**config)
    perturb_ff_parsers(model)
    pipe = SegmentationEnsemblePipeline(unet=model, scheduler=scheduler_cls(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "scheduler_cls",
    [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler,
     HeunDiscreteScheduler],
    ids=lambda c: c.__name__,
)
def test_pipeline_batched_ensemble_equals_members_one_by_one(scheduler_cls, image, gen):
    pipe = medsegdiff_pipeline(scheduler_cls)
    assert pipe.image_channels == 3 and pipe.mask_channels == 1 and pipe.size_multiple == 2
    seeds = (4, 5, 6)
    batched = pipe(unit_range(image), num_inference_steps=2, ensemble_size=3, generator=gen(*seeds), output_type="pt",
                   return_members=True)
    one_by_one = pipe(unit_range(image), num_inference_steps=2, ensemble_size=3, generator=gen(*seeds), batch_size=1,
                      output_type="pt", return_members=True)
    torch.testing.assert_close(batched.members, one_by_one.members, rtol=0, atol=1e-5)
    assert not torch.allclose(batched.members[0, 0], batched.members[0, 1])
    assert batched.masks.shape == (1, 16, 16)


def test_pipeline_odd_sizes_tiles_and_multi_class(gen):
    pipe = medsegdiff_pipeline()
    image = torch.rand(1, 3, 21, 37, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tiled = pipe(unit_range(image), num_inference_steps=2, ensemble_size=2, tile_size=16, generator=gen(0),
                 output_type="pt")
    assert tiled.masks.shape == (1, 21, 37) and torch.isfinite(tiled.entropy).all()

    three = medsegdiff_pipeline(in_channels=6, out_channels=3, condition_head=True)
    assert three.num_classes == 3
    out = three(unit_range(image[..., :16, :16]), num_inference_steps=2, ensemble_size=2, generator=gen(0),
                output_type="pt")
    assert out.probabilities.shape == (1, 3, 16, 16) and set(out.masks.unique().tolist()) <= {0, 1, 2}


def test_save_and_load_through_every_entry_point(tmp_path, image, gen):
    pipe = medsegdiff_pipeline(condition_head=True)

    def members(p):
        p.set_progress_bar_config(disable=True)
        return p(unit_range(image), num_inference_steps=2, ensemble_size=2, generator=gen(0), output_type="pt",
                 return_members=True).members

    reference = members(pipe)
    folder = tmp_path / "medsegdiff"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["medsegdiff_unet", "MedSegDiffUNet2DModel"]
    assert "from diffusers_retina.models.medsegdiff_unet import MedSegDiffUNet2DModel" in (
        folder / "unet" / "medsegdiff_unet.py").read_text()
    assert json.loads((folder / "unet" / "config.json").read_text())["condition_head"] is True

    for loaded in (SegmentationEnsemblePipeline.from_pretrained(folder),
                   DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)):
        assert type(loaded) is SegmentationEnsemblePipeline and type(loaded.unet) is MedSegDiffUNet2DModel
        assert loaded.unet.condition_logits_head is not None
        torch.testing.assert_close(members(loaded), reference, rtol=0, atol=1e-6)

    half = SegmentationEnsemblePipeline.from_pretrained(folder, dtype=torch.float16)
    assert half.unet.dtype == torch.float16
    assert torch.isfinite(members(half)).all()


# ------------------------------------------------------------------------------------------------ training


SCRIPT = REPO / "training" / "train_segmentation_ensemble.py"


def run_training(args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_training_script_trains_medsegdiff_and_resumes_to_the_same_weights(tmp_path):
    from testing_utils import TINY_SEGMENTATION as TINY
    from testing_utils import write_folder_dataset

    data = write_folder_dataset(tmp_path / "pairs")
    common = ["--model", "medsegdiff", "--aux_loss_weight", "10", "--no_ff_parser", "--ff_parser_grid", "6,4",
              "--train_data_dir", str(data), *TINY, "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--use_ema"]
    straight = tmp_path / "straight"
    result = run_training(common + ["--output_dir", str(straight)])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    result = run_training(common + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors"):
        a, b = load_file(straight / "checkpoint-4" / name), load_file(resumed / "checkpoint-4" / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")
    # the auxiliary head was trained (it only gets gradient from the auxiliary loss)
    start, end = load_file(straight / "checkpoint-2" / "model.safetensors"), load_file(
        straight / "checkpoint-4" / "model.safetensors")
    assert not torch.equal(start["condition_logits_head.weight"], end["condition_logits_head.weight"])

    pipe = SegmentationEnsemblePipeline.from_pretrained(straight, dtype=torch.float32)
    assert type(pipe.unet) is MedSegDiffUNet2DModel
    assert pipe.unet.config.ff_parser is False and pipe.unet.config.condition_head is True
    info = json.loads((straight / "training_info.json").read_text())
    assert "--model medsegdiff" in info["command"]
    assert "MedSegDiff" in (straight / "README.md").read_text()


@pytest.mark.slow  # heavy (a subprocess, a training run or a large image): in the full suite only
def test_training_script_rejects_aux_loss_for_a_plain_unet(tmp_path):
    result = run_training(["--train_data_dir", str(tmp_path), "--aux_loss_weight", "1", "--output_dir",
                           str(tmp_path / "out")])
    assert result.returncode != 0 and "--aux_loss_weight needs --model medsegdiff" in result.stderr
