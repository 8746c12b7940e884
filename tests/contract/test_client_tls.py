"""The client through a TLS endpoint (a gRPC ingress or load balancer terminating TLS): `grpcs://HOST:PORT`
verified against PERSONA_TLS_CA; plaintext `HOST:PORT` and `grpc://HOST:PORT` as before."""
import subprocess
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from persona.client.sdk import PersonaClient, PersonaClientError


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("localhost:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    server.start()
    yield port, cert
    server.stop(0)


def check(client: PersonaClient, timeout: float = 5) -> int:
    return health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def test_grpcs_addresses_speak_tls_verified_against_the_given_ca(tls_server, monkeypatch):
    port, cert = tls_server
    monkeypatch.setenv("PERSONA_TLS_CA", str(cert))
    client = PersonaClient.connect(f"grpcs://localhost:{port}")
    assert check(client) == health_pb2.HealthCheckResponse.SERVING
    client.close()

    monkeypatch.delenv("PERSONA_TLS_CA")  # the system's roots do not know this self-signed certificate
    client = PersonaClient.connect(f"grpcs://localhost:{port}")
    with pytest.raises(grpc.RpcError) as caught:
        check(client, timeout=30)  # the SDK retries UNAVAILABLE 4 times first (backoff at most 7.5 s in all)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    client.close()

    plaintext = PersonaClient.connect(f"grpc://localhost:{port}")  # plaintext to a TLS port fails too
    with pytest.raises(grpc.RpcError):
        check(plaintext)
    plaintext.close()


def test_an_unreadable_ca_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONA_TLS_CA", str(tmp_path / "missing.pem"))
    with pytest.raises(PersonaClientError, match="PERSONA_TLS_CA .*missing.pem.* cannot be read"):
        PersonaClient.connect("grpcs://localhost:1")


def test_plain_addresses_reach_a_plaintext_server(app):
    for address in (app.address, f"grpc://{app.address}"):
        client = PersonaClient.connect(address)
        assert check(client) == health_pb2.HealthCheckResponse.SERVING
        client.close()
