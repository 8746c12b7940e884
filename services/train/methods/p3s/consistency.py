"""P3S's attention-consistency loss (Eq. 11–13): the cross-attention maps of the trainable copy pulled toward the
original UNet's."""
from __future__ import annotations


def attention_consistency_loss(copy_map, original_map):
    """L_ac = MSE(M_c, M_o) / avg with avg = (Sum(M_c) + Sum(M_o)) / 2 (Eq. 11–12).

    `copy_map` M_c and `original_map` M_o: attention probabilities of the same shape, e.g. (batch, heads, pixels,
    tokens), each row a softmax (Eq. 13). Their sums are then the number of rows each, so the division makes the
    term independent of resolution and batch only up to that count: it is the paper's normalisation, kept as
    printed. The caller decides which map carries gradient (the method detaches the frozen UNet's)."""
    from persona.services.runtime.errors import InvalidArgument

    if copy_map.shape != original_map.shape:
        raise InvalidArgument(f"attention maps differ in shape: copy {tuple(copy_map.shape)}, original "
                              f"{tuple(original_map.shape)}: compare layers at the same resolution")
    copy_map, original_map = copy_map.float(), original_map.float()
    mse = (copy_map - original_map).pow(2).mean()
    avg = (copy_map.sum() + original_map.sum()) / 2
    return mse / avg.clamp_min(1e-12)


# Which layers L_ac compares: the paper's last cross-attention layer (its Table IV: the best), or every level the
# copy has a transformer at ("the whole U-Net").
LAYERS = ("last", "all")


def paired_layers(original_names, copy_names, layers: str = "last") -> list[tuple[str, str]]:
    """(original UNet cross-attention module, copy's cross-attention module) pairs to compare, in forward order.

    The copy has one transformer per level where the frozen UNet may have several; each copy layer is paired with
    the frozen UNet's last cross-attention layer of the same block ("up_blocks.1"), which sees the same resolution.
    "last" keeps the final pair: the frozen UNet's last cross-attention layer and the copy's last."""
    from persona.services.runtime.errors import InvalidArgument

    if layers not in LAYERS:
        raise InvalidArgument(f"`p3s_consistency_layers` is {layers!r}: use one of {', '.join(LAYERS)}")
    last_original: dict[str, str] = {}
    for name in original_names:
        last_original[_block(name)] = name  # later names overwrite: the block's last layer stays
    pairs = [(last_original[_block(name)], name) for name in copy_names if _block(name) in last_original]
    if not pairs:
        raise InvalidArgument("p3s: the UNet and its copy share no block with cross-attention to compare")
    return pairs[-1:] if layers == "last" else pairs


def _block(module_name: str) -> str:
    return module_name.split(".attentions.")[0]
