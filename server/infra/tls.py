"""TLS and mutual TLS for the gRPC port, from PEM files named in Settings."""

from __future__ import annotations

from pathlib import Path

import grpc

from server.infra.settings import Settings, SettingsError

_CERT = "-----BEGIN CERTIFICATE-----"


def _pem(variable: str, path: str, marker: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{variable}={path}: cannot read: {exc.strerror}") from exc
    if marker.encode() not in data:
        raise SettingsError(f"{variable}={path}: not a PEM file with a '{marker}' block")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """None for plaintext; TLS when a certificate is set; mutual TLS (clients must present
    a certificate signed by `tls_client_ca`) when a client CA is set too."""
    if not settings.tls_cert:
        return None
    cert = _pem("ENDCAP_TLS_CERT", settings.tls_cert, _CERT)
    key = _pem("ENDCAP_TLS_KEY", settings.tls_key, "PRIVATE KEY-----")  # RSA, EC, PKCS#8
    client_ca = (
        _pem("ENDCAP_TLS_CLIENT_CA", settings.tls_client_ca, _CERT)
        if settings.tls_client_ca
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
