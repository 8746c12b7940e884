"""ModelAccess: any folder when paths are allowed; else tiny, names under the models root, cached hub ids, and the
operator's exact list, with one message for everything else."""
import pytest

from persona.services.runtime.errors import FailedPrecondition, InvalidArgument
from persona.services.runtime.model_access import ModelAccess


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding owner/cached (as `hf download` leaves it)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--owner--cached" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--owner--cached" / "refs").mkdir()
    (cache / "models--owner--cached" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return snapshot


def test_paths_mode_passes_everything_through():
    assert ModelAccess(paths=True).locate("/etc", "base_model") == "/etc"


def test_the_allow_list(tmp_path, hub_cache):
    (tmp_path / "root" / "sd15").mkdir(parents=True)
    (tmp_path / "root" / "acme" / "house-style").mkdir(parents=True)
    access = ModelAccess(paths=False, root=tmp_path / "root")
    assert access.locate("tiny", "base_model") == "tiny"
    assert access.locate("sd15", "base_model") == str(tmp_path / "root" / "sd15")
    assert access.locate("acme/house-style", "base_model") == str(tmp_path / "root" / "acme" / "house-style")
    assert access.locate("owner/cached", "base_model") == str(hub_cache)
    with pytest.raises(FailedPrecondition, match="hf download owner/missing"):
        access.locate("owner/missing", "base_model")
    messages = set()
    for ref in ("/etc", "/etc/passwd", "/nonexistent", str(tmp_path / "root" / "sd15"), "../root/sd15", "~",
                "nothing-here", "a/b/c", "file:///etc"):
        with pytest.raises(InvalidArgument) as info:
            access.locate(ref, "base_model")
        messages.add(info.value.message)
    assert len(messages) == 1 and "`base_model`" in messages.pop()


def test_an_explicit_list_limits_hub_ids_and_names_folders(tmp_path, hub_cache):
    access = ModelAccess(paths=False, allowed=("owner/other", "/srv/models/sd21"))
    assert access.locate("/srv/models/sd21", "model") == "/srv/models/sd21"
    with pytest.raises(InvalidArgument, match="`model`"):
        access.locate("owner/cached", "model")  # cached, but not on the operator's list
