"""Shared fixtures: real persona servers on 127.0.0.1 port 0, clients per tenant, DreamBench photos."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# As persona-cli does (runtime/cpus.py), before torch is imported: OpenMP workers sleep instead of spinning, which on
# a shared CPU made training steps 20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from persona.client.sdk import PersonaClient  # noqa: E402
from persona.services.app import PersonaApp, build_app
from persona.services.caption.settings import CaptionSettings
from persona.services.runtime.settings import RuntimeSettings
from persona.services.evaluate.settings import EvaluateSettings
from persona.services.generate.settings import GenerateSettings
from persona.services.mask.settings import MaskSettings
from persona.services.train.settings import TrainSettings

pytest_plugins = ["fakevlm", "postgres_fixture"]

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = Path(os.environ.get("PERSONA_DREAMBENCH", REPO.parent / "shared" / "data" / "dreambench"))

# Opt-in tests: marker → (the variable that turns them on, why they are off by default).
OPT_IN = {
    "images": ("PERSONA_TEST_IMAGES",
               "the offline Docker image proof (deploy/docker/offline_build.sh) installs docker.io and debootstrap "
               "with apt, keeps a ~170 MB cache under ~/.cache/persona-images and takes 10-25 min on 2 cores"),
}

# What pytest_collection_modifyitems deselected, per marker, for the terminal summary.
OPT_IN_DESELECTED = pytest.StashKey[dict]()


def opted_in(variable: str) -> bool:
    from persona.services.runtime.settings import env_flag

    return env_flag(variable) is True


def pytest_configure(config):
    for marker, (variable, why) in OPT_IN.items():
        config.addinivalue_line("markers", f"{marker}: opt-in with {variable}=1 ({why})")


def pytest_collection_modifyitems(config, items):
    """Deselects the opt-in tests unless their variable is set: reported as deselected, with the reason, never as
    a skip of something that ran."""
    kept, deselected = [], {}
    for item in items:
        marker = next((m for m in OPT_IN if item.get_closest_marker(m) and not opted_in(OPT_IN[m][0])), None)
        if marker:
            deselected.setdefault(marker, []).append(item)
        else:
            kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=[i for group in deselected.values() for i in group])
        items[:] = kept
        config.stash[OPT_IN_DESELECTED] = {m: len(group) for m, group in deselected.items()}


def pytest_terminal_summary(terminalreporter, config):
    for marker, count in config.stash.get(OPT_IN_DESELECTED, {}).items():
        variable, why = OPT_IN[marker]
        terminalreporter.write_line(f"opt-in: {count} `{marker}` test(s) deselected: {why}; set {variable}=1 to "
                                    "run them")


@pytest.fixture(scope="session")
def dreambench() -> Path:
    """The DreamBench photos in ../shared/data/dreambench (CC-BY 4.0, see its LICENSE.md)."""
    assert (DREAMBENCH / "dog" / "00.jpg").exists(), (
        f"DreamBench photos not found at {DREAMBENCH}: check out ../shared beside the repo or set PERSONA_DREAMBENCH")
    return DREAMBENCH


@pytest.fixture(scope="session")
def dogs(dreambench) -> list:
    """Four DreamBench dog photos as (PIL image, "a photo of sks dog") training examples."""
    from PIL import Image

    paths = sorted((dreambench / "dog").glob("*.jpg"))[:4]
    return [(Image.open(p).convert("RGB"), "a photo of sks dog") for p in paths]


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
    from persona.services.models.builders import tiny_base_model

    return tiny_base_model(model_cache)


@pytest.fixture(scope="session")
def mask_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random stand-ins of the mask models (CLIP vision, CLIPSeg, GroundingDINO, SAM), built once."""
    from tiny_models import tiny_clip_vision, tiny_clipseg, tiny_grounding_dino, tiny_sam

    root = tmp_path_factory.mktemp("mask-models")
    return {"clip": tiny_clip_vision(root / "clip"), "clipseg": tiny_clipseg(root / "clipseg"),
            "detector": tiny_grounding_dino(root / "grounding-dino"), "segmenter": tiny_sam(root / "sam")}


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random stand-ins of the evaluation models (CLIP, DINO), built once."""
    from tiny_models import tiny_clip, tiny_dino

    root = tmp_path_factory.mktemp("eval-models")
    return {"clip": tiny_clip(root / "clip"), "dino": tiny_dino(root / "dino")}


@pytest.fixture
def start_app(tmp_path, model_cache, mask_models, eval_models):
    """Factory: start_app(data_dir=None, auth="api-key", caption_settings=None, train_settings=None,
    generate_settings=None, mask_settings=None, evaluate_settings=None, services=None) → a running PersonaApp
    (training and the embedded engine on CPU, base models cached in the session's model cache, the tiny mask and
    evaluation models; `services` as in build_app)."""
    apps: list[PersonaApp] = []

    def default_mask_settings() -> MaskSettings:
        return MaskSettings(clip_model=str(mask_models["clip"]), clipseg_model=str(mask_models["clipseg"]),
                            detector_model=str(mask_models["detector"]),
                            segmenter_model=str(mask_models["segmenter"]), device="cpu")

    def start(data_dir: Path | None = None, auth: str = "api-key", caption_settings: CaptionSettings | None = None,
              train_settings: TrainSettings | None = None, generate_settings: GenerateSettings | None = None,
              mask_settings=None, evaluate_settings=None, services=None, subject_settings=None,
              **runtime) -> PersonaApp:
        settings = RuntimeSettings(data_dir=data_dir or tmp_path / "data", auth=auth, **runtime)
        app = build_app(settings, caption_settings=caption_settings or CaptionSettings(), subject_settings=subject_settings,
                        train_settings=train_settings or TrainSettings(base_model_cache_dir=model_cache, device="cpu"),
                        generate_settings=generate_settings or GenerateSettings(device="cpu"),
                        mask_settings=mask_settings or default_mask_settings(),
                        evaluate_settings=evaluate_settings or EvaluateSettings(
                            work_dir=settings.data_dir / "evaluate", clip_model=str(eval_models["clip"]),
                            dino_model=str(eval_models["dino"]), device="cpu"),
                        services=services)
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
