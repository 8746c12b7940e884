"""Custom Diffusion: trains the UNet's cross-attention key/value projections and one new token's embedding; saves
diffusers' Custom Diffusion layout (pytorch_custom_diffusion_weights.bin + learned_embeds.safetensors)."""
from __future__ import annotations

from pathlib import Path

from persona.services.models.fusing import CUSTOM_DIFFUSION_WEIGHTS as WEIGHT_NAME, LEARNED_EMBEDS as EMBEDDING_NAME
from persona.services.runtime.errors import InvalidArgument

from .base import Components, TrainingMethod
from .textual_inversion import frozen_with_new_token


class CustomDiffusionMethod(TrainingMethod):
    """Kumari et al., CVPR 2023, as diffusers examples/custom_diffusion/train_custom_diffusion.py with
    `--freeze_model crossattn_kv` and one `--modifier_token`: every cross-attention layer of the UNet gets a
    Custom Diffusion processor whose own K/V projections start as the layer's and train; self-attention layers get
    processors without weights; the new token's embedding row trains. Loads with
    `pipe.unet.load_attn_procs(dir, weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=pipe)` and
    `pipe.load_textual_inversion(dir, weight_name="learned_embeds.safetensors")`."""

    name = "custom_diffusion"

    def prepare(self, components: Components, config) -> None:
        self.components, self.config = components, config
        self.placeholder = frozen_with_new_token(components, config)
        # The processors' K/V are fresh modules, so they are the only UNet parameters that require grad.
        components.unet.set_attn_processor(custom_diffusion_processors(components.unet))

    @property
    def trains_text_encoder(self) -> bool:
        return True  # its embedding row: captions are encoded anew every step

    def trainable_parameters(self):
        c = self._prepared()
        return [self.placeholder.weight] + [p for p in c.unet.parameters() if p.requires_grad]

    def after_optimizer_step(self) -> None:
        self.placeholder.restore_other_rows()

    def save(self, output_dir: Path) -> Path:
        import torch

        c = self._prepared()
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)

        def save_on_cpu(state_dict: dict, path: str) -> None:  # trained on CUDA or not, the file loads anywhere
            torch.save({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()},
                       path)
        c.unet.save_attn_procs(output_dir, weight_name=WEIGHT_NAME, save_function=save_on_cpu)
        self.placeholder.save(output_dir / EMBEDDING_NAME)
        return output_dir / WEIGHT_NAME

def custom_diffusion_processors(unet) -> dict:
    """One Custom Diffusion processor per attention layer of `unet` (name → processor), as diffusers'
    train_custom_diffusion.py builds them for `--freeze_model crossattn_kv`: cross-attention layers get trainable
    K/V copies of their own to_k/to_v, self-attention layers processors without weights."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    modules = dict(unet.named_modules())
    processors = {}
    for name in unet.attn_processors:
        attn = modules[name.removesuffix(".processor")]
        if not attn.is_cross_attention:
            processors[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False,
                                                               hidden_size=attn.to_k.out_features)
            continue
        if attn.to_k.bias is not None or attn.to_v.bias is not None:
            raise InvalidArgument(f"`method` custom_diffusion needs cross-attention K/V without bias; {name} of this "
                                  "base model has one: use method lora or dreambooth")
        processor = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False,
                                                    hidden_size=attn.to_k.out_features,
                                                    cross_attention_dim=attn.to_k.in_features)
        processor.load_state_dict({"to_k_custom_diffusion.weight": attn.to_k.weight,
                                   "to_v_custom_diffusion.weight": attn.to_v.weight})
        processors[name] = processor.to(attn.to_k.weight.device)
    return processors
