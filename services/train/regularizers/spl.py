"""ClassDiffusion's semantic preservation loss (SPL): keep the personalised phrase close to its class in the text
encoder's space, so `a sks dog` stays a dog that can do what dogs do in prompts.

    L_spl = 1 − cos(E("a photo of a [v] <class>"), E("a photo of a <class>"))

with E the CLIP text encoder's pooled output (the EOS token after the final layer norm), weight 1.0 as the
ClassDiffusion reference. The class phrase is encoded without gradient (it is the anchor). The term only has
something to move when the text side trains (textual inversion, Custom Diffusion's or SVDiff's token,
`train_text_encoder`); the domain refuses it otherwise.
"""
from __future__ import annotations

from persona.services.subjects.domain import indefinite_article

from .base import Regularizer, RegularizerInputs


def semantic_preservation_loss(concept_pooled, class_pooled):
    """1 − cosine similarity of the two pooled embeddings (rows), averaged over rows."""
    import torch.nn.functional as F

    return (1.0 - F.cosine_similarity(concept_pooled.float(), class_pooled.float(), dim=-1)).mean()


class SemanticPreservation(Regularizer):
    name = "spl"

    def prepare(self, inputs: RegularizerInputs) -> list[str]:
        import torch

        super().prepare(inputs)
        c = inputs.components
        name = self.config.class_name
        # The article goes with the word after it: "a sks dog", "an apple" but "a sks apple".
        prompts = [f"a photo of a {self.config.token} {name}", f"a photo of {indefinite_article(name)} {name}"]
        ids = c.tokenizer(prompts, padding="max_length", truncation=True, max_length=c.tokenizer.model_max_length,
                          return_tensors="pt").input_ids.to(inputs.device)
        self.concept_ids = ids[:1]
        with torch.no_grad(), inputs.autocast():
            self.class_pooled = c.text_encoder(ids[1:]).pooler_output.detach()
        return []

    def loss_terms(self, batch, step_inputs=None):
        with self.inputs.autocast():
            pooled = self.inputs.components.text_encoder(self.concept_ids).pooler_output
        return {"spl": (semantic_preservation_loss(pooled, self.class_pooled), self.config.spl_weight)}
