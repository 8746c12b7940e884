"""Shared fixtures: real persona servers on 127.0.0.1 port 0, clients per tenant, DreamBench photos."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from persona.client.sdk import PersonaClient
from persona.services.app import PersonaApp, build_app
from persona.services.caption.settings import CaptionSettings
from persona.services.runtime.settings import RuntimeSettings
from persona.services.generate.settings import GenerateSettings
from persona.services.train.settings import TrainSettings

pytest_plugins = ["fakevlm"]

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = Path(os.environ.get("PERSONA_DREAMBENCH", REPO.parent / "shared" / "data" / "dreambench"))


@pytest.fixture(scope="session")
def dreambench() -> Path:
    """The DreamBench photos in ../shared/data/dreambench (CC-BY 4.0, see its LICENSE.md)."""
    assert (DREAMBENCH / "dog" / "00.jpg").exists(), (
        f"DreamBench photos not found at {DREAMBENCH}: check out ../shared beside the repo or set PERSONA_DREAMBENCH")
    return DREAMBENCH


@pytest.fixture
def dog_photos(dreambench) -> list[bytes]:
    return [p.read_bytes() for p in sorted((dreambench / "dog").glob("*.jpg"))[:4]]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One PERSONA_MODEL_CACHE for the session, so the built-in `tiny` base model is built once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_model(model_cache) -> Path:
    """The built-in `tiny` base model, built once per session; tests only read it."""
    from persona.services.train.base_models import tiny_base_model

    return tiny_base_model(model_cache)


@pytest.fixture
def start_app(tmp_path, model_cache):
    """Factory: start_app(data_dir=None, auth="api-key", caption_settings=None, train_settings=None,
    generate_settings=None) → a running PersonaApp (training and the embedded engine on CPU, base models cached
    in the session's model cache)."""
    apps: list[PersonaApp] = []

    def start(data_dir: Path | None = None, auth: str = "api-key", caption_settings: CaptionSettings | None = None,
              train_settings: TrainSettings | None = None, generate_settings: GenerateSettings | None = None,
              **runtime) -> PersonaApp:
        settings = RuntimeSettings(data_dir=data_dir or tmp_path / "data", auth=auth, **runtime)
        app = build_app(settings, caption_settings=caption_settings or CaptionSettings(),
                        train_settings=train_settings or TrainSettings(base_model_cache_dir=model_cache, device="cpu"),
                        generate_settings=generate_settings or GenerateSettings(device="cpu"))
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop(0)


@pytest.fixture
def app(start_app) -> PersonaApp:
    """A server requiring API keys, with no VLM configured."""
    return start_app()


@pytest.fixture
def client_for(request):
    """Factory: client_for(tenant, target=None) → PersonaClient with a fresh key of that tenant, on
    `target` or else the `app` fixture's server (started only when needed: one server per data dir)."""
    clients = []

    def make(tenant: str = "acme", target: PersonaApp | None = None) -> PersonaClient:
        server = target or request.getfixturevalue("app")
        _, key = server.authenticator.create_key(tenant)
        client = PersonaClient.connect(server.address, key)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(client_for) -> PersonaClient:
    return client_for("acme")
