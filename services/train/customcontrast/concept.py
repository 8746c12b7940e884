"""customcontrast concepts (issue 21's finetune-free stream): a concept made from one of the tenant's trained
CustomContrast encoders by running it once over the subject's photos, with no fine-tuning step. `check` refuses, by
field and before anything is stored, what makes no sense without fine-tuning; `make` (inside the train job) writes
the concept's files (models/customcontrast/concept.py) for the train domain to store like any concept's weights.
Nothing here knows gRPC."""
from __future__ import annotations

from pathlib import Path

from persona.services.models.base_models import ResolvedBaseModel, base_model_identity
from persona.services.models.concepts import Concept
from persona.services.models.fusing import CUSTOMCONTRAST
from persona.services.models.library import ModelLibrary
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument
from persona.services.runtime.jobs import JobContext

from ..request import TrainRequest, mode_of, training_captions
from ...subjects.domain import Subject
from .jobs import EncoderTraining

# Captions a customcontrast concept accepts: the encoder reads the photos alone, so only the Case 1 template (what
# the concept records as each photo's text) makes sense.
CAPTIONS = ("", "class", "case1")
STAGE = "customcontrast"


class CustomContrastConcepts:
    """Checks customcontrast requests and makes their concepts from the tenant's encoders."""

    def __init__(self, encoders: EncoderTraining | None, models: ModelLibrary):
        self.encoders, self.models = encoders, models

    def plan(self, tenant_id: str, request: TrainRequest, method: str, subject: Subject) -> tuple[ResolvedBaseModel,
                                                                                                 dict]:
        """(base model, the concept's recorded fields) of a request to make a customcontrast concept, checked by
        `check`; each photo's recorded text is the Case 1 template (the encoder reads the photos alone)."""
        base = self.check(tenant_id, request, method)
        captions = training_captions(subject, "class", mode_of(request.mode, []), [])
        return base, dict(regularizers=[], captions="class", options={}, training_captions=captions,
                          resolution=base.native_resolution, encoder=request.encoder.strip())

    def check(self, tenant_id: str, request: TrainRequest, method: str) -> ResolvedBaseModel:
        """The base model the concept is made on (the encoder's unless the request names it); INVALID_ARGUMENT
        naming the field for anything that does not apply, FAILED_PRECONDITION for an encoder not ready."""
        encoder = request.encoder.strip()
        if self.encoders is None:
            raise FailedPrecondition("this server trains no CustomContrast encoders: method customcontrast needs them")
        if method != CUSTOMCONTRAST:
            raise InvalidArgument(f"`encoder` is set but `method` is {method}: an encoder makes a concept only with "
                                  "method customcontrast; pass --method customcontrast, or drop --encoder to fine-tune")
        if not encoder:
            raise InvalidArgument("`encoder` is empty: method customcontrast makes a concept from a trained "
                                  "CustomContrast encoder; pass --encoder ENCODER_ID (`persona-cli encoder list`)")
        if request.options:
            raise InvalidArgument(f"`{next(iter(request.options))}` does not apply to method customcontrast: the "
                                  "concept is made without fine-tuning (one pass of the encoder over the photos), so "
                                  "no training option does; leave it unset")
        named = [r.strip().lower() for r in request.regularizers if r.strip() and r.strip().lower() != "none"]
        if named:
            raise InvalidArgument(f"`regularizers` {named[0]} does not apply to method customcontrast: nothing is "
                                  "fine-tuned, so there is nothing to regularise; drop --reg")
        if request.parent_concept_id.strip():
            raise InvalidArgument("`parent_concept_id` does not apply to method customcontrast: without fine-tuning "
                                  "nothing continues from a parent; drop --parent")
        if request.captions.strip().lower() not in CAPTIONS:
            raise InvalidArgument(f"`captions` {request.captions.strip()} does not apply to method customcontrast: "
                                  "the encoder reads the photos alone, not their captions; leave --captions unset")
        from persona.services.models.customcontrast.files import read_encoder_meta

        folder, job = self.encoders.find(tenant_id, encoder)
        meta = read_encoder_meta(folder)
        trained_on = job.params.get("base_model", "")
        base = self.models.resolve_base(request.base_model or trained_on)
        if base_model_identity(base.path) != meta.base_model_sha256:
            if request.base_model:
                raise InvalidArgument(f"`base_model` {request.base_model!r} is not the base model `encoder` {encoder} "
                                      f"was trained on ({trained_on!r}): leave base_model empty to use the encoder's, "
                                      "or pass an encoder trained on this base model")
            raise FailedPrecondition(f"the base model {trained_on!r} of `encoder` {encoder} changed on disk since the "
                                     "encoder was trained: train the encoder again")
        return base

    def make(self, ctx: JobContext, concept: Concept, photos: list, output_dir: Path) -> None:
        """Runs the concept's encoder over `photos` (PIL images) once per table row and writes the concept's files
        into `output_dir`."""
        import torch

        from persona.services.models.customcontrast.build import clip_pixels, load_image_encoder, subject_tokens
        from persona.services.models.customcontrast.concept import (DEFAULT_ROWS, ConceptTokens, save_concept,
                                                                    table_timesteps)
        from persona.services.models.customcontrast.files import read_encoder

        ctx.progress(0.0, f"reading encoder {concept.encoder}", stage=STAGE, done=0, total=len(photos))
        folder, _ = self.encoders.find(concept.tenant_id, concept.encoder)
        encoder, visual_kv, meta = read_encoder(folder, concept.base_model_sha256)
        clip = load_image_encoder(self.models.model_access.locate(meta.image_encoder, "image_encoder"))
        device = self.encoders.device or "cpu"
        encoder, clip = encoder.eval().to(device), clip.to(device)
        pixels = torch.stack([clip_pixels(photo, clip.config.image_size) for photo in photos]).to(device)
        ctx.check_cancelled()
        ctx.progress(0.5, f"encoding {len(photos)} photo(s)", stage=STAGE, done=0, total=len(photos))
        table = subject_tokens(encoder, clip, pixels, table_timesteps(meta.config.num_train_timesteps, DEFAULT_ROWS)
                               .to(device))
        save_concept(output_dir, ConceptTokens(table, visual_kv, meta.scale, meta.config.num_text_tokens,
                                               concept.token, concept.encoder, concept.base_model_sha256))
        ctx.progress(1.0, f"encoded {len(photos)} photo(s)", stage=STAGE, done=len(photos), total=len(photos))
