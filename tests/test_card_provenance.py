"""Card metadata from provenance, not folder names (issue 14):

* the training data's name, licence and attribution come from its PROVENANCE/licence files, a dataset card's
  front-matter, a ``datasets`` dataset's metadata or ``--dataset_license``/``--dataset_attribution`` -- a folder
  called "chase" without such a file gets no CC BY licence -- and ``training_info.json`` records them;
* ``base_model`` where a checkpoint is built on another model (the feature head on the fundus DDPM);
* ``model-index`` for every checkpoint with a measured evaluation of its own weights;
* the repo id the user pushes to, in the uploaded card (``diffusers-retina push``), not ``diffusers-retina/<folder>``.
"""

from __future__ import annotations

import json
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from diffusers_retina import cli, hub
from diffusers_retina.hub import upload as push
from diffusers_retina.training_utils import write_training_record

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO / "checkpoints"
CHASE = REPO.parent / "shared" / "data" / "chase_db1"

PROVENANCE = """# TinyFundus (a test dataset)

Dataset: TinyFundus retinal photographs. Original home: https://example.org/tinyfundus
Licence: CC BY-NC 4.0 (non-commercial).
Attribution required - cite:
  Doe J, Roe R. "Tiny fundus photographs", Journal of Tests 1(1):1-2, 2026.

Other notes.
"""


def write_data(root: Path, names=("a1", "a2", "b1"), provenance: str = None, license_text: str = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in names:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / f"{name}.png")
    if provenance:
        (root / "PROVENANCE.md").write_text(provenance)
    if license_text:
        (root / "LICENSE.txt").write_text(license_text)
    return root


def checkpoint_records(tmp_path: Path, source: str, **info_changes) -> Path:
    """A copy of a shipped checkpoint's records and configs (no weights), its training_info.json changed."""
    folder = tmp_path / source
    shutil.copytree(CHECKPOINTS / source, folder,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.png", "README.md", "*.py"))
    info = json.loads((folder / "training_info.json").read_text())
    for key, value in info_changes.items():
        if value is None:
            info.pop(key, None)
        else:
            info[key] = value
    (folder / "training_info.json").write_text(json.dumps(info))
    return folder


# ------------------------------------------------------------------------------------------------ licences


@pytest.mark.parametrize("text, expected", [
    ("CC BY 4.0", "cc-by-4.0"),
    ("Licensed under the Creative Commons Attribution 4.0 International licence", "cc-by-4.0"),
    ("CC BY-NC-SA 4.0", "cc-by-nc-sa-4.0"),
    ("CC-BY-NC 4.0", "cc-by-nc-4.0"),
    ("cc-by-sa-4.0", "cc-by-sa-4.0"),
    ("CC0", "cc0-1.0"),
    ("Apache License, Version 2.0", "apache-2.0"),
    ("all rights reserved", None),
    (None, None),
])
def test_license_phrases_map_to_hub_ids(text, expected):
    assert hub.license_id(text) == expected


def test_provenance_file_gives_name_licence_attribution_and_homepage(tmp_path):
    (tmp_path / "PROVENANCE.md").write_text(PROVENANCE)
    record = hub.read_provenance_file(tmp_path / "PROVENANCE.md")
    assert record["name"] == "TinyFundus" and record["license"] == "cc-by-nc-4.0"
    assert record["license_text"] == "CC BY-NC 4.0"
    assert record["attribution"].startswith("Doe J, Roe R.") and record["homepage"] == "https://example.org/tinyfundus"


@pytest.mark.skipif(not (CHASE / "PROVENANCE.md").is_file(), reason="CHASE_DB1 not found beside the project")
def test_chase_db1_provenance_is_read_from_its_files():
    record = hub.dataset_provenance({"train_data_dir": str(CHASE), "mask_dir": "1stHO", "mask_suffix": "_1stHO",
                                     "train_stems": "Image_0*,Image_10*", "validation_stems": "Image_11L"})
    assert record["name"] == "CHASE_DB1" and record["license"] == "cc-by-4.0" and record["license_text"] == "CC BY 4.0"
    assert "Fraz MM" in record["attribution"] and record["homepage"] == "https://researchdata.kingston.ac.uk/96/"
    assert len(record["train_images"]) == 20 and record["train_images"][-1] == "Image_10R"
    assert record["source"][0].endswith("PROVENANCE.md")


def test_licence_follows_the_data_not_the_folder_name(tmp_path):
    # a folder named like CHASE_DB1 without any provenance file: no licence is invented
    plain = write_data(tmp_path / "chase_db1_copy")
    record = hub.dataset_provenance({"train_data_dir": str(plain)})
    assert record["license"] is None and record["name"] == "chase_db1_copy"
    card_data = hub._card_data({"train_data_dir": str(plain)}, "me/model", "image-segmentation", [], record=record)
    assert card_data.license == "unknown" and card_data.datasets == ["chase_db1_copy"]
    assert "licence was not recorded" in hub.data_description(record, {})
    # any folder name with a provenance file: its licence and attribution
    named = write_data(tmp_path / "whatever", provenance=PROVENANCE)
    record = hub.dataset_provenance({"train_data_dir": str(named), "train_stems": "a*"})
    assert record["license"] == "cc-by-nc-4.0" and record["train_images"] == ["a1", "a2"]
    text = hub.data_description(record, {})
    assert "[TinyFundus](https://example.org/tinyfundus), licensed **CC BY-NC 4.0**" in text
    assert "2 image(s) (a1–a2)" in text and "Doe J" in text
    # a prepared copy inside the dataset folder finds the provenance one level up
    inner = write_data(named / "prepared")
    assert hub.dataset_provenance({"train_data_dir": str(inner)})["license"] == "cc-by-nc-4.0"
    # a LICENSE file alone
    licensed = write_data(tmp_path / "other", license_text="Released under CC0 by its authors.")
    assert hub.dataset_provenance({"train_data_dir": str(licensed)})["license"] == "cc0-1.0"


def test_flags_override_the_files(tmp_path):
    data = write_data(tmp_path / "data", provenance=PROVENANCE)
    record = hub.dataset_provenance({"train_data_dir": str(data), "dataset_license": "CC BY 4.0",
                                     "dataset_attribution": "Our lab, 2026.", "dataset_id": "org/fundus"})
    assert record["license"] == "cc-by-4.0" and record["attribution"] == "Our lab, 2026."
    assert record["name"] == "org/fundus" and record["source"][0] == "--dataset_license"
    assert hub.dataset_provenance({"train_data_dir": str(data), "dataset_license": "our own terms"})["license"] == "other"


def test_datasets_metadata_is_the_source_of_a_dataset_name(tmp_path):
    import datasets

    info = datasets.DatasetInfo(license="CC BY 4.0", citation="Doe J. Tiny, 2026.", homepage="https://example.org")
    dataset = datasets.Dataset.from_dict({"x": [1, 2]}, info=info)
    dataset.save_to_disk(str(tmp_path / "saved"))
    record = hub.dataset_provenance({"dataset_name": str(tmp_path / "saved")})
    assert record["license"] == "cc-by-4.0" and record["attribution"] == "Doe J. Tiny, 2026."
    assert record["homepage"] == "https://example.org" and record["source"] == [f"datasets:{tmp_path / 'saved'}"]


def test_training_record_holds_the_dataset(tmp_path):
    data = write_data(tmp_path / "data", provenance=PROVENANCE)
    args = Namespace(train_data_dir=str(data), image_dir="images", mask_dir="masks", image_suffix="",
                     train_stems=None, validation_stems="b1", dataset_name=None, output_dir=str(tmp_path / "out"),
                     hub_token="secret")
    (tmp_path / "out").mkdir()
    write_training_record(args.output_dir, vars(args), "training/train_segmentation_ensemble.py", 3, 1.0,
                          torch.nn.Linear(2, 2), argv=[])
    info = json.loads((tmp_path / "out" / "training_info.json").read_text())
    assert info["dataset"]["license"] == "cc-by-nc-4.0" and info["dataset"]["train_images"] == ["a1", "a2", "b1"]
    assert info["dataset"]["validation_stems"] == "b1" and "hub_token" not in info["args"]


# ------------------------------------------------------------------------------------------------ cards


def test_recorded_dataset_wins_over_the_data_path(tmp_path):
    record = {"name": "TinyFundus", "license": "cc-by-nc-4.0", "license_text": "CC BY-NC 4.0",
              "attribution": "Doe J, 2026.", "train_images": ["a1", "a2"], "mask_dir": "masks"}
    folder = checkpoint_records(tmp_path, "vessel-segmenter-chase", dataset=record)
    card = hub.segmenter_model_card(folder)
    assert card.data.license == "cc-by-nc-4.0" and card.data.datasets == ["TinyFundus"]
    text = str(card)
    assert "licensed **CC BY-NC 4.0**" in text and "Trained on 2 images of one dataset (TinyFundus)" in text
    assert "CC BY 4.0" not in text.replace("CC BY-NC 4.0", "")
    # the repo id: the one given, else the run's --hub_model_id, else the folder's name (no invented organisation)
    assert card.data.model_name == "vessel-segmenter-chase" and "diffusers-retina/vessel-segmenter-chase" not in text
    assert hub.segmenter_model_card(folder, repo_id="me/segmenter").data.model_name == "me/segmenter"


@pytest.mark.parametrize("source, builder", [
    ("segmentation-ensemble-chase", hub.segmentation_model_card),
    ("segmentation-medsegdiff-chase", hub.segmentation_model_card),
    ("segmentation-anchored-chase", hub.segmentation_model_card),
    ("segmentation-anchored-features-chase", hub.segmentation_model_card),
    ("vessel-segmenter-chase", hub.segmenter_model_card),
    ("mask2image-chase", hub.mask2image_model_card),
    ("feature-head-chase", hub.feature_head_model_card),
])
def test_every_measured_checkpoint_gets_a_model_index(tmp_path, source, builder):
    folder = checkpoint_records(tmp_path, source)
    card = builder(folder, repo_id="me/model")
    results = {result.metric_type: result for result in card.data.eval_results or []}
    assert results, f"{source} has a measured evaluation.json but no model-index"
    assert "model-index" in str(card) and "name: me/model" in str(card)
    evaluation = json.loads((folder / "evaluation.json").read_text())
    if source == "mask2image-chase":  # faithfulness at the default guidance 1.5, the row measured for this pipeline
        row = next(r for r in evaluation["rows"] if r.get("guidance_scale") == 1.5)
        assert results["faithfulness_dice"].metric_value == round(row["dice"], 4)
        assert "central 256x256 crops" in results["faithfulness_dice"].dataset_split
    if source == "feature-head-chase":  # the row of the run that trained these weights
        row = next(r for r in evaluation["rows"] if r["folder"].endswith("pixel_mlp-anchor-n20")
                   and r["condition"] == "clean")
        assert results["dice"].metric_value == round(row["metrics"]["dice"], 4)
        assert "full resolution" in results["dice"].dataset_split  # whole photographs since issue 17


def test_unmeasured_checkpoints_get_no_model_index(tmp_path):
    for source in ("fundus-ddpm-chase", "vessel-mask-ddpm-chase"):
        folder = checkpoint_records(tmp_path, source)
        assert not hub.mask2image_model_card(folder).data.eval_results
    folder = checkpoint_records(tmp_path, "feature-head-chase")
    evaluation = json.loads((folder / "evaluation.json").read_text())
    for row in evaluation["rows"]:  # no row of this run: nothing is claimed
        row["folder"] = row["folder"].replace("pixel_mlp-anchor-n20", "another-run")
    (folder / "evaluation.json").write_text(json.dumps(evaluation))
    assert not hub.feature_head_model_card(folder).data.eval_results


def test_feature_head_names_its_base_model(tmp_path):
    base = tmp_path / "fundus-ddpm"
    base.mkdir()
    (base / "training_info.json").write_text(json.dumps({"args": {"hub_model_id": "me/fundus-ddpm"}}))
    folder = checkpoint_records(tmp_path, "feature-head-chase")
    info = json.loads((folder / "training_info.json").read_text())
    info["args"]["ddpm"] = str(base)
    (folder / "training_info.json").write_text(json.dumps(info))
    card = hub.feature_head_model_card(folder)
    assert card.data.base_model == "me/fundus-ddpm" and "base_model: me/fundus-ddpm" in str(card)
    assert "[me/fundus-ddpm](https://huggingface.co/me/fundus-ddpm)" in str(card)
    # a Hub id as --ddpm is the base model itself; an explicit one wins
    info["args"]["ddpm"] = "org/ddpm-hub"
    (folder / "training_info.json").write_text(json.dumps(info))
    assert hub.feature_head_model_card(folder).data.base_model == "org/ddpm-hub"
    assert hub.feature_head_model_card(folder, base_model="x/y").data.base_model == "x/y"
    # a local DDPM without a recorded Hub id: no base_model is invented (push --base-model sets it)
    assert hub.resolve_base_model(str(CHECKPOINTS / "fundus-ddpm-chase")) is None


# ------------------------------------------------------------------------------------------------ push


def test_pushed_card_names_the_repo_it_lands_in():
    reference = CHECKPOINTS / "segmentation-ensemble-chase"
    on_disk = (reference / "README.md").read_bytes()
    card = ModelCard(push.card_for_repo(reference, "my-org/seg", base_model="my-org/base").decode())
    assert card.data.model_name == "my-org/seg" and card.data.base_model == "my-org/base"
    assert card.data.eval_results and all(r.metric_value is not None for r in card.data.eval_results)
    assert '.from_pretrained("my-org/seg")' in card.text and "\n# my-org/seg\n" in card.text
    assert "diffusers-retina/segmentation-ensemble-chase" not in str(card)
    assert (reference / "README.md").read_bytes() == on_disk  # the file on disk is left alone


def test_push_uploads_the_renamed_card(monkeypatch, capsys):
    from testing_utils import RecordingHfApi

    monkeypatch.setattr(push, "HfApi", RecordingHfApi)
    monkeypatch.setattr(RecordingHfApi, "calls", [])
    monkeypatch.setattr(RecordingHfApi, "fail_create", False)
    reference = CHECKPOINTS / "feature-head-chase"
    assert cli.main(["push", str(reference), "--repo-id", "heads", "--base-model", "me/fundus-ddpm"]) == 0
    commit = RecordingHfApi.calls[1]
    card = ModelCard(commit["contents"]["README.md"].decode())
    assert card.data.model_name == "someone/heads" and card.data.base_model == "me/fundus-ddpm"
    assert "README.md" in commit["files"] and list(commit["contents"]) == ["README.md"]
    with pytest.raises(SystemExit):
        cli.main(["push", str(reference), "--repo-id", "heads", "--base-model", "not a hub id", "--dry-run"])
    assert "--base-model" in capsys.readouterr().err
