"""bench quality's configurations and ratios to Case 1, by hand."""
import pytest

from persona.bench.quality import Configuration, Row, _set_ratios


def test_configurations_parse_and_name():
    config = Configuration.parse("SID+prior+core", "dreambooth")
    assert (config.captions, config.regularizers, config.prior) == ("sid", ("prior", "core"), True)
    assert config.name == "dreambooth sid+prior+core"
    assert Configuration.parse("case1", "lora").regularizers == ()
    with pytest.raises(ValueError, match="`--config` 'prior' must start with case1 or sid"):
        Configuration.parse("prior", "lora")
    with pytest.raises(ValueError, match="`--method` is 'ti'"):
        Configuration.parse("sid", "ti")


def test_ratios_are_taken_against_the_case1_row_with_the_same_prior_setting():
    def row(text: str, method: str, nearby: list[float]) -> Row:
        return Row(Configuration.parse(text, method), per_seed={"nearby_leakage": nearby})

    rows = [row("case1", "lora", [0.04, 0.04]), row("case1+prior", "lora", [0.02, 0.06]),
            row("sid+prior", "lora", [0.01, 0.01]), row("sid", "lora", [0.06, 0.10]),
            row("sid+prior+mask", "lora", [0.02, 0.02]), row("sid+prior", "dreambooth", [0.01, 0.03])]
    _set_ratios(rows)
    assert rows[2].baseline == "lora case1+prior" and rows[2].ratios["nearby_leakage"] == pytest.approx(0.01 / 0.04)
    assert rows[3].baseline == "lora case1" and rows[3].ratios["nearby_leakage"] == pytest.approx(0.08 / 0.04)
    assert rows[4].baseline == "lora case1+prior" and rows[4].ratios["nearby_leakage"] == pytest.approx(0.5)
    assert rows[5].baseline is None and rows[5].ratios == {}  # no dreambooth Case 1 row
    assert rows[1].mean("nearby_leakage") == pytest.approx(0.04) and rows[1].std("nearby_leakage") == pytest.approx(
        0.0282842712)
