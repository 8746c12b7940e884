"""A p3s concept on Triton: the request parameters that carry one draw's weight schedule, λ and reference photo, and
the conditioned UNet that serves them.

A p3s concept's UNet component (`p3s_unet_<digest>`, a torch component: the injection is per-step python logic
that no ONNX graph or TensorRT engine holds) is the frozen base UNet with the concept's condition file beside it
(models/p3s/condition.py: the trainable copy, the RNGR encoder and every photo's I' and c_s). Per request it attaches
that condition as the embedded engine does per draw (`AttachedCondition`: the copy runs on each call's own
(x_t, c, t), so both classifier-free-guidance halves get injected features), with the request's settings.

The settings travel as request parameters named as Generate's fields (`P3S_PARAMETERS`): TritonEngine resolves
them (unset = as trained) and sends all six to `sd_pipeline`, which checks them and forwards them on each BLS call
to the UNet, which checks them again (another client may call it). BLS requests carry only bool, int and str
parameters, so the floats cross that hop as their `repr` text (exact for a double) and are read back as numbers.
No BYTES tensor anywhere (triton_models says why).
"""
from __future__ import annotations

import json
from pathlib import Path

from persona.services.runtime.errors import InvalidArgument

from ..models.p3s.condition import AttachedCondition, check_reference, load_condition
from ..models.p3s.weights import WEIGHT_FIELDS, drawing_lambda, drawing_weights
from .options import BY_NAME, P3S_SETTINGS

# The UNet component of a p3s concept (triton_models.TORCH_COMPONENTS, triton_repository).
P3S_COMPONENT = "p3s_unet"
# Request parameters of a p3s draw: Generate's p3s fields, with their declared types (options.py).
P3S_PARAMETERS = {name: BY_NAME[name].type for name in P3S_SETTINGS}
_WHAT = {str: "a string", int: "an integer", float: "a number"}


def parsed(raw: str | dict | None) -> dict:
    """A request's parameters (`request.parameters()`: a JSON object) as a dict."""
    return json.loads(raw or "{}") if isinstance(raw, str) else dict(raw or {})


def p3s_parameters(given: dict, photos: int | None = None) -> dict:
    """The six p3s parameters of `given` (a request's parameters), each present, of its declared type and within
    its declared bounds, and the reference one of `photos` when known; InvalidArgument naming the first that is not.
    A float may come as decimal text (the BLS hop)."""
    values = {}
    for name, kind in P3S_PARAMETERS.items():
        value = given.get(name)
        if value is None:
            raise InvalidArgument(f"request parameter `{name}` is missing: a p3s concept's draw sends all of "
                                  f"{', '.join(P3S_PARAMETERS)} (persona's TritonEngine does)")
        if kind is float and not isinstance(value, bool):
            try:
                value = float(value) if isinstance(value, (int, str)) else value
            except ValueError:
                pass
        if type(value) is not kind:
            raise InvalidArgument(f"request parameter `{name}` is {value!r}: send {_WHAT[kind]}")
        BY_NAME[name].check(value)  # InvalidArgument naming the field: "`p3s_weight_k` is 0: use a positive …"
        values[name] = value
    if photos is not None:
        check_reference(values["p3s_reference"], photos)
    return values


def refuse_p3s_parameters(given: dict, concept: str) -> None:
    """InvalidArgument naming the first p3s parameter `given` sets for `concept`, which is not a p3s concept."""
    for name in P3S_PARAMETERS:
        if name in given:
            raise InvalidArgument(f"request parameter `{name}` is set but concept {concept} is not a p3s concept: "
                                  "leave the p3s_* parameters out")


def bls_parameters(values: dict) -> dict:
    """`values` (checked by `p3s_parameters`) as BLS request parameters: floats as their exact `repr` text."""
    return {name: repr(value) if isinstance(value, float) else value for name, value in values.items()}


def drawing_parameters(photos: int, settings: dict, reference: int, weights: dict,
                       injection_lambda: float | None) -> dict:
    """What TritonEngine sends for one draw: the request's p3s settings (`weights`: the ε_t options it set, e.g.
    {"p3s_weight_alpha": 0.0}; `injection_lambda` None: unset) resolved against the concept's trained `settings`
    exactly as the embedded engine resolves them, and checked (`reference` one of `photos`)."""
    check_reference(reference, photos)
    schedule = drawing_weights(settings, weights)
    values = {option: getattr(schedule, attribute) for option, attribute in WEIGHT_FIELDS.items()}
    values = {name: float(v) if P3S_PARAMETERS[name] is float else v for name, v in values.items()}
    values.update(p3s_injection_lambda=drawing_lambda(settings, injection_lambda), p3s_reference=int(reference))
    return p3s_parameters(values, photos)


class ConditionedUnet:
    """The frozen `unet` (on its device) of a p3s_unet component with the condition file `path` loaded beside it;
    `attach(parameters)` attaches it with a request's settings (kept attached while they stay the same: a draw's
    steps), so the component's plain UNet forward draws the concept."""

    def __init__(self, unet, path: Path):
        self.unet = unet
        self.condition = load_condition(path, unet)
        self.photos = int(self.condition.reference_latents.shape[0])
        self._attached: AttachedCondition | None = None
        self._key: tuple | None = None

    def attach(self, raw_parameters) -> None:
        values = p3s_parameters(parsed(raw_parameters), self.photos)
        key = tuple(sorted(values.items()))
        if key == self._key:
            return
        self.detach()
        weights = drawing_weights(self.condition.settings, {name: values[name] for name in WEIGHT_FIELDS})
        self._attached = AttachedCondition(self.unet, self.condition, values["p3s_reference"], weights,
                                           values["p3s_injection_lambda"])
        self._key = key

    def detach(self) -> None:
        if self._attached is not None:
            self._attached.remove()
        self._attached, self._key = None, None
