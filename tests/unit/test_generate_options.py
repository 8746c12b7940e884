"""One setting, one place: every Generate setting declared in generate/options.py is a GenerateRequest field of its
type, a field of the domain's request, and a `persona-cli generate` option; a bad value is refused naming it."""
from __future__ import annotations

import dataclasses

import pytest
from google.protobuf.descriptor import FieldDescriptor
from typer.testing import CliRunner

from persona.client.cli import app
from persona.services.generate.domain import GenerateRequest
from persona.services.generate.options import BY_NAME, SETTINGS
from persona.services.generate.servicer import settings_from_proto
from persona.services.runtime.errors import InvalidArgument
from persona.v1 import generate_pb2

PROTO_TYPES = {FieldDescriptor.CPPTYPE_INT32: int, FieldDescriptor.CPPTYPE_INT64: int,
               FieldDescriptor.CPPTYPE_DOUBLE: float, FieldDescriptor.CPPTYPE_STRING: str,
               FieldDescriptor.CPPTYPE_ENUM: str}
# GenerateRequest fields that name what to draw, not how.
NOT_SETTINGS = {"concept_id", "base_model", "prompts"}


def test_every_setting_is_a_request_field_of_its_type_and_back():
    fields = generate_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
    assert set(fields) - NOT_SETTINGS == set(BY_NAME)
    for option in SETTINGS:
        assert PROTO_TYPES[fields[option.name].cpp_type] is option.type, option.name
    assert {f.name for f in dataclasses.fields(GenerateRequest)} - NOT_SETTINGS == set(BY_NAME)


def test_every_setting_is_on_the_cli():
    result = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "400", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    for option in SETTINGS:
        assert option.cli_flag in result.output, option.name
    for flag in ("-n", "--num-images", "--guidance", "--negative", "--scheduler", "--out"):
        assert flag in result.output


def test_unset_settings_map_to_none_and_given_ones_to_their_values():
    unset = settings_from_proto(generate_pb2.GenerateRequest(prompts=["a dog"]))
    assert unset == {"images_per_prompt": None, "seed": None, "steps": None, "guidance_scale": None,
                     "scheduler": "", "negative_prompt": "", "width": None, "height": None,
                     "p3s_weight_schedule": "", "p3s_weight_alpha": None, "p3s_weight_beta": None,
                     "p3s_weight_k": None, "p3s_injection_lambda": None, "p3s_reference": None}
    given = settings_from_proto(generate_pb2.GenerateRequest(
        prompts=["a dog"], steps=0, seed=3, scheduler=generate_pb2.SCHEDULER_EULER, negative_prompt="blurry"))
    assert (given["steps"], given["seed"], given["scheduler"], given["negative_prompt"]) == (0, 3, "euler", "blurry")


@pytest.mark.parametrize("name, value, message", [
    ("steps", 0, "`steps` is 0: use 1–500"),
    ("images_per_prompt", 17, "`images_per_prompt` is 17: use 1–16"),
    ("guidance_scale", 51.0, "`guidance_scale` is 51.0: use 0–50, e.g. 7.5"),
    ("scheduler", "heun", "`scheduler` is 'heun': use one of ddim, dpmpp, euler"),
    ("negative_prompt", "x" * 1001, "`negative_prompt` is 1001 characters; at most 1000"),
])
def test_a_setting_out_of_its_bounds_is_refused_naming_it(name, value, message):
    with pytest.raises(InvalidArgument) as raised:
        BY_NAME[name].check(value)
    assert str(raised.value) == message


def test_p3s_settings_are_refused_by_name_for_models_that_are_not_p3s():
    from persona.services.generate.domain import P3SDrawing, p3s_drawing

    request = GenerateRequest(prompts=("a dog",), concept_id="cpt_1", p3s_weight_alpha=0.0)
    for method, what in (("lora", "concept cpt_1, a lora concept"), ("", "a base model")):
        with pytest.raises(InvalidArgument) as raised:
            p3s_drawing(request, method)
        assert str(raised.value).startswith(f"`p3s_weight_alpha` is set but the request draws {what}")
    assert p3s_drawing(GenerateRequest(prompts=("a dog",), concept_id="cpt_1"), "lora") is None
    # A p3s concept: the photo (default the first) and only the schedule options the request set.
    assert p3s_drawing(request, "p3s") == P3SDrawing(0, {"p3s_weight_alpha": 0.0})
    assert p3s_drawing(GenerateRequest(prompts=("a dog",), p3s_reference=1, p3s_weight_schedule="constant"),
                       "p3s") == P3SDrawing(1, {"p3s_weight_schedule": "constant"})
