"""``RetinaPipelineTesterMixin``: the diffusers pipeline contract, checked the same way for every pipeline of the
package (in the spirit of diffusers' ``PipelineTesterMixin``, written for these pipelines).

A test class per pipeline (``tests/pipelines/<name>/test_<name>.py``) declares ``pipeline_class``,
``get_dummy_components()`` (tiny models from ``testing_utils``) and ``get_dummy_inputs(seed)`` (one sample, tensor
outputs), and inherits: dict vs tuple outputs, the same result from every input format, batch == single with
per-sample generators, a save/load round trip, step callbacks, reduced precision, non-finite outputs as errors, and
a usable docstring example.
"""

from __future__ import annotations

from dataclasses import is_dataclass
from typing import Any, Dict, List, Sequence

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_retina.pipelines.checks import NonFiniteOutputError

from testing_utils import check_call_example


class RetinaPipelineTesterMixin:
    #: The pipeline under test.
    pipeline_class: type = None
    #: The argument that carries the (batched) input, and the output fields compared between calls.
    input_name: str = "image"
    output_fields: Sequence[str] = ()
    #: Whether the pipeline has a denoising loop with ``callback_on_step_end`` and takes ``output_type``.
    supports_callbacks: bool = True
    supports_output_type: bool = True
    #: The component whose weights the NaN test damages.
    main_component: str = "unet"
    #: Samples (each with its own generator) one input makes: ensemble members, images per mask.
    samples_per_input: int = 1
    #: The class of the pipeline a step callback receives, when it is not the pipeline called (documented there).
    callback_pipeline_class: type = None
    #: Round-off allowed between two computations that should agree (batched vs one by one, saved vs loaded): the
    #: CPU may pick different kernels for them.
    atol: float = 1e-5

    # ------------------------------------------------------------------ what a test class provides
    def get_dummy_components(self) -> Dict[str, Any]:
        raise NotImplementedError

    def get_dummy_inputs(self, seed: int = 0) -> Dict[str, Any]:
        """One sample's call arguments, with a ``generator`` and tensor outputs."""
        raise NotImplementedError

    def input_formats(self) -> Dict[str, Any]:
        """The same single input as a tensor, a numpy array and a PIL image (overridden for masks)."""
        pixels = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
        return {"pt": torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, "np": pixels,
                "pil": PIL.Image.fromarray(pixels)}

    # ------------------------------------------------------------------ helpers
    def get_pipeline(self):
        pipe = self.pipeline_class(**self.get_dummy_components())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def outputs(self, out) -> List[torch.Tensor]:
        values = [getattr(out, field) for field in self.output_fields]
        return [torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in values]

    def assert_same(self, first, second, atol: float = None) -> None:
        atol = self.atol if atol is None else atol
        for name, a, b in zip(self.output_fields, self.outputs(first), self.outputs(second)):
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")

    def generators(self, seed: int) -> List[torch.Generator]:
        """One generator per sample of one input (``samples_per_input`` of them)."""
        return [torch.Generator().manual_seed(seed * 100 + k) for k in range(self.samples_per_input)]

    def batched_inputs(self, inputs: Dict[str, Any], seeds: Sequence[int]) -> Dict[str, Any]:
        """The input repeated once per seed, with each input's generators in order (input-major)."""
        batched = dict(inputs, generator=[g for seed in seeds for g in self.generators(seed)])
        value = inputs[self.input_name]
        batched[self.input_name] = torch.cat([value] * len(seeds)) if isinstance(value, torch.Tensor) \
            else [value] * len(seeds)
        return batched

    # ------------------------------------------------------------------ the contract
    def test_dict_and_tuple_outputs_agree(self):
        pipe = self.get_pipeline()
        as_dict = pipe(**self.get_dummy_inputs())
        as_tuple = pipe(**self.get_dummy_inputs(), return_dict=False)
        expected = as_dict.to_tuple()  # the fields that are set, in order (a tuple may keep None placeholders)
        assert isinstance(as_tuple, tuple)
        present = [value for value in as_tuple if value is not None]
        assert len(present) == len(expected) >= 1
        for got, want in zip(present, expected):
            if isinstance(want, list) and want and is_dataclass(want[0]):  # records (e.g. processing plans)
                assert got == want
                continue
            torch.testing.assert_close(torch.as_tensor(np.asarray(got)).float(),
                                       torch.as_tensor(np.asarray(want)).float(), rtol=0, atol=0)

    def test_every_input_format_gives_the_same_result(self):
        pipe = self.get_pipeline()
        results = {name: pipe(**dict(self.get_dummy_inputs(), **{self.input_name: value}))
                   for name, value in self.input_formats().items()}
        reference = results.pop("pt")
        for name, result in results.items():
            self.assert_same(result, reference)

    def test_batch_equals_single_with_per_sample_generators(self):
        pipe = self.get_pipeline()
        inputs = self.get_dummy_inputs()
        batch = pipe(**self.batched_inputs(inputs, seeds=(3, 4)))
        for index, seed in enumerate((3, 4)):
            single = pipe(**dict(inputs, generator=self.generators(seed)))
            for name, whole, one in zip(self.output_fields, self.outputs(batch), self.outputs(single)):
                torch.testing.assert_close(whole[index: index + 1].float(), one.float(), rtol=0, atol=self.atol,
                                           msg=lambda m: f"{name}: {m}")

    def test_same_generator_same_result(self):
        pipe = self.get_pipeline()
        self.assert_same(pipe(**self.get_dummy_inputs(seed=5)), pipe(**self.get_dummy_inputs(seed=5)), atol=0)

    def test_save_load_round_trip(self, tmp_path):
        pipe = self.get_pipeline()
        pipe.save_pretrained(tmp_path / "saved")
        loaded = self.pipeline_class.from_pretrained(tmp_path / "saved")
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is self.pipeline_class
        self.assert_same(loaded(**self.get_dummy_inputs()), pipe(**self.get_dummy_inputs()))

    def test_callback_on_step_end_sees_every_step(self):
        if not self.supports_callbacks:
            pytest.skip(f"{self.pipeline_class.__name__} has no denoising loop")
        pipe = self.get_pipeline()
        steps = []

        def callback(pipeline, step, timestep, tensors):
            if self.callback_pipeline_class is None:
                assert pipeline is pipe
            else:
                assert type(pipeline) is self.callback_pipeline_class and pipeline.unet is pipe.unet
            assert set(tensors) == {"latents"}
            steps.append(step)
            return tensors

        inputs = self.get_dummy_inputs()
        pipe(**inputs, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
        assert steps == list(range(inputs["num_inference_steps"]))

    def test_a_callback_may_replace_the_latents(self):
        if not self.supports_callbacks:
            pytest.skip(f"{self.pipeline_class.__name__} has no denoising loop")
        pipe = self.get_pipeline()

        def zero_latents(pipeline, step, timestep, tensors):
            return {"latents": torch.zeros_like(tensors["latents"])}

        plain = pipe(**self.get_dummy_inputs())
        changed = pipe(**self.get_dummy_inputs(), callback_on_step_end=zero_latents)
        assert any(not torch.equal(a, b) for a, b in zip(self.outputs(plain), self.outputs(changed)))

    def test_bfloat16_runs_and_stays_finite(self):
        pipe = self.get_pipeline().to(dtype=torch.bfloat16)
        out = pipe(**self.get_dummy_inputs())
        for name, value in zip(self.output_fields, self.outputs(out)):
            assert torch.isfinite(value.float()).all(), name

    def test_non_finite_weights_are_an_error_not_an_output(self):
        pipe = self.get_pipeline()
        model = getattr(pipe, self.main_component)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float("nan"))
        with pytest.raises(NonFiniteOutputError):
            pipe(**self.get_dummy_inputs())

    def test_output_types(self):
        if not self.supports_output_type:
            pytest.skip(f"{self.pipeline_class.__name__} returns tensors only")
        pipe = self.get_pipeline()
        as_np = pipe(**dict(self.get_dummy_inputs(), output_type="np"))
        as_pil = pipe(**dict(self.get_dummy_inputs(), output_type="pil"))
        first = self.output_fields[0]
        assert isinstance(getattr(as_np, first), np.ndarray)
        assert isinstance(getattr(as_pil, first)[0], PIL.Image.Image)
        with pytest.raises(ValueError, match="output_type"):
            pipe(**dict(self.get_dummy_inputs(), output_type="jpeg"))

    def test_call_docstring_has_a_usable_example(self):
        check_call_example(self.pipeline_class)
