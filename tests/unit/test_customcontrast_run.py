"""A CustomContrast encoder training run (services/train/customcontrast/run.py) on the tiny base model and toy-world
views: a run stopped and resumed ends with the weights of an uninterrupted one; bad options are refused; a trained
encoder saved and loaded gives the subject tokens it gave before."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from persona.bench.toyworld_views import write_multiview_dataset
from persona.services.models.base_models import base_model_identity
from persona.services.models.builders import build_tiny_base_model
from persona.services.models.customcontrast.build import clip_pixels, load_customcontrast_models, subject_tokens
from persona.services.models.customcontrast.files import EncoderMeta, load_encoder, save_encoder
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument
from persona.services.train.customcontrast.multiview import read_multiview_dataset
from persona.services.train.customcontrast.run import EncoderTrainingOptions, train_encoder

OPTIONS = EncoderTrainingOptions(steps=3, batch_size=2, learning_rate=1e-3, resolution=64, checkpoint_every=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_base_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return read_multiview_dataset(write_multiview_dataset(tmp_path_factory.mktemp("views"), subjects=3, views=2,
                                                          seed=0, size=64))


def _models(base):
    torch.manual_seed(0)
    return load_customcontrast_models(base, "tiny", width=16, heads=4, num_layers=1, num_visual_tokens=3,
                                      num_text_tokens=2, fourier_frequencies=4, contrast_width=8)


def test_a_stopped_run_resumes_to_the_uninterrupted_weights(base, dataset, tmp_path):
    whole = _models(base)
    seen = []
    result = train_encoder(whole, dataset, OPTIONS, tmp_path / "whole", on_step=lambda step, _: seen.append(step))
    assert (result.steps, result.stopped, seen) == (3, False, [1, 2, 3])
    assert set(result.losses[0]) == {"diffusion", "cscl", "macl", "location", "total"}

    first = _models(base)
    stopped = train_encoder(first, dataset, OPTIONS, tmp_path / "split", should_stop=lambda: True)
    assert (stopped.steps, stopped.stopped) == (1, True)
    resumed_models = _models(base)  # a fresh process: new models, the checkpoint on disk
    resumed = train_encoder(resumed_models, dataset, OPTIONS, tmp_path / "split")
    assert resumed.steps == 3 and len(resumed.losses) == 3
    for expected, got in zip(whole.trainable_parameters(), resumed_models.trainable_parameters(), strict=True):
        assert torch.allclose(expected, got, atol=1e-6)
    assert [entry["total"] for entry in resumed.losses] == pytest.approx([e["total"] for e in result.losses],
                                                                         abs=1e-5)


def test_a_checkpoint_of_another_run_and_bad_options_are_refused(base, dataset, tmp_path):
    models = _models(base)
    train_encoder(models, dataset, EncoderTrainingOptions(**{**OPTIONS.__dict__, "steps": 1}), tmp_path)
    # Going further is a resume: one more step on top of the checkpoint.
    further = train_encoder(models, dataset, EncoderTrainingOptions(**{**OPTIONS.__dict__, "steps": 2}), tmp_path)
    assert further.steps == 2 and len(further.losses) == 2
    with pytest.raises(FailedPrecondition, match="other settings or images"):
        train_encoder(models, dataset, EncoderTrainingOptions(**{**OPTIONS.__dict__, "seed": 5}), tmp_path)
    with pytest.raises(InvalidArgument, match="`batch_size` 4 must be between 2 and the dataset's 3 subjects"):
        train_encoder(models, dataset, EncoderTrainingOptions(**{**OPTIONS.__dict__, "batch_size": 4}), tmp_path)
    with pytest.raises(InvalidArgument, match="`learning_rate` is 0"):
        train_encoder(models, dataset, EncoderTrainingOptions(**{**OPTIONS.__dict__, "learning_rate": 0}), tmp_path)


def test_a_trained_encoder_saved_and_loaded_gives_the_same_subject_tokens(base, dataset, tmp_path):
    trained = _models(base)
    train_encoder(trained, dataset, EncoderTrainingOptions(**{**OPTIONS.__dict__, "steps": 1}), tmp_path / "run")
    identity = base_model_identity(base)
    save_encoder(tmp_path / "encoder", trained.encoder, trained.processors,
                 EncoderMeta(trained.encoder.config, identity, "tiny"))

    fresh = _models(base)
    encoder, meta = load_encoder(tmp_path / "encoder", identity, fresh.processors)
    view = dataset.subjects[0].views[0]
    photos = clip_pixels(Image.open(view.image), 32)[None]
    timesteps = torch.tensor([900, 100])
    expected = subject_tokens(trained.encoder.eval(), trained.image_encoder, photos, timesteps)
    got = subject_tokens(encoder.eval(), fresh.image_encoder, photos, timesteps)
    assert torch.allclose(got.text_tokens, expected.text_tokens, atol=1e-6)
    assert torch.allclose(got.image_tokens, expected.image_tokens, atol=1e-6)
    for a, b in zip(trained.processors.parameters(), fresh.processors.parameters(), strict=True):
        assert torch.equal(a, b)
