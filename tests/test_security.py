"""TLS, mutual TLS and API keys with roles, over real gRPC with throwaway certificates."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import ServerThread, TrainedStore, make_settings
from endcap import cli
from endcap.client import Client, PermissionDenied, Unauthenticated
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.app import start
from server.infra.settings import Settings, SettingsError
from server.transport.auth import METHOD_ROLES, ApiKeys, presented_key, required_role

SERVICE = pb.DESCRIPTOR.services_by_name["Recommender"]
KEYS = {
    "read": "rk-reader-0123456789abcdef",
    "events": "ek-events-0123456789abcdef",
    "admin": "ak-admin-0123456789abcdef",
}
ALL_ROLES = "xk-everything-0123456789abcdef"


# Throwaway PKI.
@dataclass(frozen=True)
class Pki:
    ca: bytes
    server_cert: Path
    server_key: Path
    ca_file: Path
    client_cert: bytes
    client_key: bytes
    rogue_cert: bytes  # signed by a CA the server does not trust
    rogue_key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("endcap test CA", ca_key, ca=True)
    rogue_ca = _cert("rogue CA", rogue_ca_key, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    server = _cert("endcap server", server_key, (ca.subject, ca_key), server=True)
    client = _cert("shop frontend", client_key, (ca.subject, ca_key))
    rogue = _cert("shop frontend", rogue_key, (rogue_ca.subject, rogue_ca_key))
    (d / "server.pem").write_bytes(_pem(server) + _pem(ca))
    (d / "server.key").write_bytes(_pem_key(server_key))
    (d / "ca.pem").write_bytes(_pem(ca))
    return Pki(
        ca=_pem(ca),
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        ca_file=d / "ca.pem",
        client_cert=_pem(client),
        client_key=_pem_key(client_key),
        rogue_cert=_pem(rogue),
        rogue_key=_pem_key(rogue_key),
    )


def _recommend(channel: grpc.Channel) -> pb.RecommendResponse:
    return pb_grpc.RecommenderStub(channel).Recommend(
        pb.RecommendRequest(num_results=3), timeout=10
    )


# TLS.
@pytest.fixture(scope="module")
def tls_server(trained: TrainedStore, pki: Pki) -> Iterator[ServerThread]:
    thread = ServerThread(
        make_settings(trained.artifacts, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    )
    yield thread
    thread.close()


def test_tls_serves_clients_that_trust_the_ca(tls_server: ServerThread, pki: Pki) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca)
    with grpc.secure_channel(tls_server.target, creds) as channel:
        assert len(_recommend(channel).items) == 3
    with Client(tls_server.target, credentials=creds) as client:
        assert len(client.recommend(num_results=2, country="DE")) == 2
        assert client.health() == "SERVING"


def test_tls_refuses_plaintext_and_untrusting_clients(tls_server: ServerThread) -> None:
    with grpc.insecure_channel(tls_server.target) as channel, pytest.raises(grpc.RpcError) as err:
        _recommend(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # The system roots do not know our throwaway CA.
    creds = grpc.ssl_channel_credentials()
    with (
        grpc.secure_channel(tls_server.target, creds) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        _recommend(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# Mutual TLS.
@pytest.fixture(scope="module")
def mtls_server(trained: TrainedStore, pki: Pki) -> Iterator[ServerThread]:
    thread = ServerThread(
        make_settings(
            trained.artifacts,
            tls_cert=str(pki.server_cert),
            tls_key=str(pki.server_key),
            tls_client_ca=str(pki.ca_file),
        )
    )
    yield thread
    thread.close()


def test_mtls_serves_clients_with_a_certificate_from_the_ca(
    mtls_server: ServerThread, pki: Pki
) -> None:
    creds = grpc.ssl_channel_credentials(pki.ca, pki.client_key, pki.client_cert)
    with grpc.secure_channel(mtls_server.target, creds) as channel:
        assert len(_recommend(channel).items) == 3


def test_endcap_health_speaks_tls_for_container_probes(
    mtls_server: ServerThread, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Kubernetes' native gRPC probes are plaintext; with TLS on, an exec probe runs
    `endcap health` with the CA (and a client certificate under mutual TLS)."""
    (tmp_path / "client.pem").write_bytes(pki.client_cert)
    (tmp_path / "client.key").write_bytes(pki.client_key)
    target = ["health", "--target", mtls_server.target, "--timeout", "10"]
    tls = ["--tls-ca", str(pki.ca_file)]
    client = ["--tls-cert", str(tmp_path / "client.pem"), "--tls-key", str(tmp_path / "client.key")]
    assert cli.main([*target, *tls, *client]) == 0
    assert capsys.readouterr().out.strip().endswith("SERVING")
    assert cli.main([*target, *tls]) == 1  # no client certificate: the handshake fails
    assert cli.main(target) == 1  # plaintext against TLS
    assert cli.main([*target, *tls, "--tls-cert", str(tmp_path / "client.pem")]) == 2


@pytest.mark.parametrize("cert", ["none", "rogue"])
def test_mtls_refuses_clients_without_a_trusted_certificate(
    mtls_server: ServerThread, pki: Pki, cert: str
) -> None:
    if cert == "none":
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca)
    else:
        creds = grpc.ssl_channel_credentials(pki.ca, pki.rogue_key, pki.rogue_cert)
    with (
        grpc.secure_channel(mtls_server.target, creds) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        _recommend(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_are_checked_at_startup(trained: TrainedStore, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="tls_cert and tls_key"):
        Settings.from_env({"ENDCAP_TLS_CERT": "/x.pem"})
    with pytest.raises(SettingsError, match="tls_client_ca"):
        Settings.from_env({"ENDCAP_TLS_CLIENT_CA": "/ca.pem"})
    (tmp_path / "not-a-cert.pem").write_text("hello")
    settings = make_settings(
        trained.artifacts, tls_cert=str(tmp_path / "not-a-cert.pem"), tls_key=str(tmp_path / "k")
    )
    with pytest.raises(SettingsError, match="ENDCAP_TLS_CERT"):
        asyncio.run(start(settings))


# API keys and roles.
@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    hashed = ApiKeys.parse(f"{KEYS['admin']} admin").entries[0][0].hex()
    path.write_text(
        "# endcap API keys: <key> <role>[,<role>]\n"
        f"{KEYS['read']} read\n"
        f"{KEYS['events']}   events  # the event pipeline\n"
        f"sha256:{hashed} admin\n"
        "\n"
        f"{ALL_ROLES} read,events,admin\n"
    )
    return path


@pytest.fixture(scope="module")
def auth_server(trained: TrainedStore, keys_file: Path) -> Iterator[ServerThread]:
    thread = ServerThread(make_settings(trained.artifacts, api_keys_file=str(keys_file)))
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def auth_channel(auth_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(auth_server.target) as channel:
        yield channel


def _call(channel: grpc.Channel, method: str, metadata: list[tuple[str, str]]) -> grpc.StatusCode:
    """An empty request to `method`: whatever auth lets through fails validation or works."""
    md = SERVICE.methods_by_name[method]
    path = f"/{SERVICE.full_name}/{method}"
    call: Any = (channel.stream_unary if md.client_streaming else channel.unary_unary)(path)
    try:
        call(iter([b""]) if md.client_streaming else b"", timeout=10, metadata=tuple(metadata))
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def test_every_method_has_a_role() -> None:
    assert set(METHOD_ROLES) == {m.name for m in SERVICE.methods}
    assert required_role("/endcap.v1.Recommender/SomeNewRpc") == "admin"  # fail closed
    assert required_role("/grpc.health.v1.Health/Check") is None


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_missing_or_wrong_credentials_are_unauthenticated(
    auth_channel: grpc.Channel, method: str
) -> None:
    for metadata in (
        [],
        [("authorization", "Bearer not-a-key-0123456789")],
        [("x-api-key", KEYS["read"] + "x")],
        [("authorization", KEYS[METHOD_ROLES[method]])],  # no "Bearer"
        [("authorization", "Basic " + KEYS[METHOD_ROLES[method]])],
        [("authorization", "Bearer ")],
    ):
        assert _call(auth_channel, method, metadata) == grpc.StatusCode.UNAUTHENTICATED, metadata


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_keys_without_the_role_are_permission_denied(
    auth_channel: grpc.Channel, method: str
) -> None:
    needed = METHOD_ROLES[method]
    for role, key in KEYS.items():
        for metadata in ([("authorization", f"Bearer {key}")], [("x-api-key", key)]):
            code = _call(auth_channel, method, metadata)
            if role == needed:
                assert code not in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ), (role, code)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (role, code)
    bearer = [("authorization", f"bearer {ALL_ROLES}")]  # the scheme is case-insensitive
    assert _call(auth_channel, method, bearer) != grpc.StatusCode.PERMISSION_DENIED


def test_health_and_reflection_stay_open(auth_channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(auth_channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=10
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    replies = reflection_pb2_grpc.ServerReflectionStub(auth_channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for s in next(iter(replies)).list_services_response.service}
    assert SERVICE.full_name in names


def test_the_python_client_sends_keys_the_server_accepts(auth_server: ServerThread) -> None:
    target = auth_server.target
    with Client(target, api_key=KEYS["read"]) as client:
        assert len(client.recommend(num_results=2, country="DE")) == 2
        with pytest.raises(PermissionDenied):
            client.track_events([])
    with Client(target, api_key=KEYS["read"], api_key_header="x-api-key") as client:
        assert len(client.similar_items(client.recommend(num_results=1).item_ids)) > 0
    with Client(target, api_key="wrong-key-0123456789") as client, pytest.raises(Unauthenticated):
        client.recommend()
    with Client(target) as client, pytest.raises(Unauthenticated):
        client.recommend()


def test_tls_and_keys_together(trained: TrainedStore, pki: Pki, keys_file: Path) -> None:
    thread = ServerThread(
        make_settings(
            trained.artifacts,
            tls_cert=str(pki.server_cert),
            tls_key=str(pki.server_key),
            api_keys_file=str(keys_file),
        )
    )
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca)
        with Client(thread.target, credentials=creds, api_key=ALL_ROLES) as client:
            assert len(client.recommend(num_results=2)) == 2
    finally:
        thread.close()


def test_key_file_errors_name_the_line_and_never_the_key(tmp_path: Path) -> None:
    secret = "sk-very-secret-0123456789"
    for text, match in (
        (f"{secret} read,superuser\n", "line 1: roles"),
        (f"# comment\n{secret}\n", "line 2: expected"),
        (f"{secret} read\n{secret} admin\n", "line 2: the same key"),
        ("short read\n", "line 1: keys must be"),
        ("# nothing\n", "no keys"),
    ):
        path = tmp_path / "keys"
        path.write_text(text)
        with pytest.raises(SettingsError, match=match) as err:
            ApiKeys.load(path)
        assert secret not in str(err.value)
        assert "ENDCAP_API_KEYS_FILE" in str(err.value)


def test_presented_key_reads_both_headers() -> None:
    assert presented_key([("authorization", "Bearer abc")]) == "abc"
    assert presented_key([("authorization", "BEARER  abc ")]) == "abc"
    assert presented_key([("x-api-key", "abc")]) == "abc"
    assert presented_key([("authorization", "Basic abc")]) is None
    assert presented_key([("user-agent", "x")]) is None
    assert presented_key(None) is None


# Exposure warning.
def _start_logs(settings: Settings, caplog: pytest.LogCaptureFixture) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="server.transport.auth"):
        ServerThread(settings).close()
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_warns_when_listening_beyond_loopback_without_keys(
    trained: TrainedStore, keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exposed = _start_logs(make_settings(trained.artifacts, host="0.0.0.0"), caplog)
    assert any("without authentication" in m and "0.0.0.0" in m for m in exposed)
    assert not _start_logs(make_settings(trained.artifacts, host="127.0.0.1"), caplog)
    keyed = make_settings(trained.artifacts, host="0.0.0.0", api_keys_file=str(keys_file))
    assert not _start_logs(keyed, caplog)


def test_start_refuses_a_bad_key_file(trained: TrainedStore, tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("tooshort read\n")
    settings = make_settings(trained.artifacts, api_keys_file=str(tmp_path / "keys"))
    with pytest.raises(SettingsError, match="ENDCAP_API_KEYS_FILE"):
        asyncio.run(start(settings))
