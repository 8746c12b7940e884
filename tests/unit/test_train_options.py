"""One knob, one place: every training option declared in options.py is a TrainingOptions field, a TrainConfig
field with the declared default (when the loop reads it), a `persona-cli train` option, and checked with a
message naming it — and nothing exists in one of those places without a declaration."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor
from typer.testing import CliRunner

from persona.client.cli import app
from persona.services.runtime.errors import InvalidArgument
from persona.services.train.config import TrainConfig
from persona.services.train.options import BY_NAME, DEFAULT_OPTIONS, OPTIONS
from persona.services.train.servicer import options_from_proto, options_to_proto
from persona.v1 import train_pb2

PROTO_TYPES = {FieldDescriptor.CPPTYPE_INT32: int, FieldDescriptor.CPPTYPE_INT64: int,
               FieldDescriptor.CPPTYPE_DOUBLE: float, FieldDescriptor.CPPTYPE_BOOL: bool,
               FieldDescriptor.CPPTYPE_STRING: str}
# TrainConfig fields a request does not set: the service fills them from the subject, the method and its settings.
NOT_REQUEST_OPTIONS = {"method", "token", "class_name", "regularizers", "device", "trained_dtype", "adam_weight_decay",
                       "validation_steps",
                       # P3S's hyper-parameters as one P3SConfig, built from the p3s_* options (request.p3s_config).
                       "p3s"}


def test_every_declared_option_is_a_proto_field_of_its_type_and_back():
    fields = train_pb2.TrainingOptions.DESCRIPTOR.fields_by_name
    assert set(fields) == set(BY_NAME)
    for option in OPTIONS:
        field = fields[option.name]
        if option.type is list:
            assert field.is_repeated and field.cpp_type == FieldDescriptor.CPPTYPE_STRING, option.name
        else:
            assert not field.is_repeated and PROTO_TYPES[field.cpp_type] is option.type, option.name
            # Numbers are proto3 `optional` (an explicit 0 differs from unset); flags and strings are plain.
            assert field.has_presence == (option.type in (int, float)), option.name


def _proto_comment(name: str) -> str:
    """The comment above TrainingOptions' field `name` in train.proto (shared by the fields right under it)."""
    proto = (Path(__file__).resolve().parents[2] / "protos/persona/v1/train.proto").read_text()
    lines = proto[proto.index("message TrainingOptions"):].splitlines()
    field = re.compile(r"^\s*(optional |repeated )?\w+ (\w+) = \d+;")
    index = next(i for i, line in enumerate(lines) if (m := field.match(line)) and m.group(2) == name)
    index -= 1
    while field.match(lines[index]):
        index -= 1
    comment = []
    while lines[index].strip().startswith("//"):
        comment.insert(0, lines[index].strip()[2:])
        index -= 1
    return " ".join(comment)


def test_the_proto_documents_each_declared_default():
    """The proto is the API reference: a default changed in options.py must be changed in its comment too."""
    for option in OPTIONS:
        comment, default = _proto_comment(option.name), option.default
        if default is None:
            assert "Default" in comment, option.name  # says how the default is decided
        elif option.type is bool:
            assert f"Default {str(default).lower()}" in comment, option.name
        elif option.type is list:
            assert all(item in comment for item in default), option.name
        elif option.type is str:
            assert f'"{default}"' in comment, option.name
        else:
            spelled = {str(default), f"{default:g}", re.sub(r"e([+-])0", r"e\1", f"{default:.1e}")}
            assert any(re.search(rf"(?<![\d.]){re.escape(s)}(?![\d])", comment) for s in spelled), \
                (option.name, default, comment)


def test_loop_options_are_trainconfig_fields_with_the_declared_default():
    config_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    loop_options = {o.name for o in OPTIONS if o.loop}
    assert set(config_fields) - NOT_REQUEST_OPTIONS == loop_options
    for option in OPTIONS:
        if option.loop and option.default is not None:
            default = config_fields[option.name].default
            assert default == (tuple(option.default) if option.type is list else option.default), option.name


def test_every_option_is_on_the_cli_with_its_help_and_default():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    for option in OPTIONS:
        assert option.cli_flag in result.output, option.name
        assert option.help.split(".")[0][:40] in result.output, option.name
    # The flags persona-cli has always had keep their names.
    for flag in ("--lr", "--rank", "--alpha", "--validation-prompt", "--steps", "--core-emb-weight",
                 "--train-text-encoder", "--num-class-images"):
        assert flag in result.output


def test_proto_mapping_keeps_what_was_given_and_only_that():
    given = {"steps": 0, "learning_rate": 2e-4, "lora_targets": ["to_q"], "train_text_encoder": True,
             "core_variant": "hinge", "min_snr_gamma": 5.0}
    assert options_from_proto(options_to_proto(given)) == given
    assert options_from_proto(train_pb2.TrainingOptions()) == {}
    # A concept's stored options (every default filled in) survive the trip; false flags read as unset.
    stored = options_from_proto(options_to_proto(DEFAULT_OPTIONS))
    assert stored == {k: v for k, v in DEFAULT_OPTIONS.items() if v is not False}


@pytest.mark.parametrize("name, value, message", [
    ("steps", 0, "`steps` is 0: use 1–100000"),
    ("learning_rate", 0.0, "`learning_rate` is 0.0: use a positive number up to 1, e.g. 1e-4"),
    ("lora_rank", 0, "`lora_rank` is 0: use 1 or more, e.g. 4"),
    ("unmasked_weight", 1.5, "`unmasked_weight` is 1.5: use 0–1"),
    ("num_class_images", 0, "`num_class_images` is 0: use 1–1000, e.g. 100 (DreamBooth uses 100–200)"),
    ("core_variant", "square", "`core_variant` is 'square': use one of cosine, pairwise, hinge"),
    ("min_snr_gamma", float("nan"), "`min_snr_gamma` is nan: use a positive number up to 1000, e.g. 5.0"),
])
def test_a_value_out_of_its_declared_bounds_is_refused_naming_the_option(name, value, message):
    with pytest.raises(InvalidArgument) as raised:
        BY_NAME[name].check(value)
    assert str(raised.value) == message
    BY_NAME[name].check(None)  # unset passes: the default applies


def test_p3s_options_are_p3sconfig_fields_with_the_papers_defaults_and_the_methods_choices():
    from persona.services.models.p3s.weights import SCHEDULES
    from persona.services.train.methods.p3s.config import P3SConfig
    from persona.services.train.methods.p3s.consistency import LAYERS
    from persona.services.train.methods.p3s.fill import FILLS, REGIONS
    from persona.services.train.request import P3S_OPTION_FIELDS, p3s_config, train_config

    p3s_options = {o.name for o in OPTIONS if o.name.startswith("p3s_")}
    assert set(P3S_OPTION_FIELDS) == p3s_options and not any(BY_NAME[n].loop for n in p3s_options)
    paper = P3SConfig()
    assert (paper.injection_lambda, paper.weight_alpha, paper.weight_beta, paper.weight_k,
            paper.consistency_weight) == (0.2, 0.5, 0.2, 2.0, 0.1)
    for name, field in P3S_OPTION_FIELDS.items():
        assert BY_NAME[name].default == getattr(paper, field), name
    assert (BY_NAME["p3s_weight_schedule"].choices, BY_NAME["p3s_consistency_layers"].choices,
            BY_NAME["p3s_fill"].choices, BY_NAME["p3s_region"].choices) == (SCHEDULES, LAYERS, FILLS, REGIONS)
    # A concept's options become the run's P3SConfig; the server's CLIP model is the mask service's.
    given = {**DEFAULT_OPTIONS, "resolution": 32, "learning_rate": 1e-5, "lora_alpha": 4.0, "initializer_token": "dog",
             "mixed_precision": "no", "validation_prompts": ["a sks dog"], "p3s_weight_schedule": "constant",
             "p3s_injection_lambda": 0.5, "p3s_fill": "blur", "p3s_region": "negative_clicks"}
    config = train_config(given, "p3s", "sks", ["mask"], "dog", "cpu", "/models/clip").validate()
    assert config.p3s == P3SConfig(clip_model="/models/clip", region="negative_clicks", weight_schedule="constant",
                                   injection_lambda=0.5, fill="blur")
    # A concept stored before the p3s options existed keeps the paper's defaults.
    assert p3s_config({}) == P3SConfig(region="outside_mask")
