"""TLS contexts from file paths in config (PEM): one place that decides protocol versions and checks.

Server side: ``cert`` + ``key``, and with ``require_client_cert`` the peer must present a
certificate signed by ``ca`` (mTLS). Client side: ``ca`` to trust (system store otherwise),
and ``cert`` + ``key`` when the far end asks for a client certificate.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.core.errors import ConfigError

_FILES = ("cert", "key", "ca")


def resolve_paths(settings: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """``settings`` with relative cert/key/ca paths made absolute against ``base_dir`` (the
    config file's directory, as for every other file named in config), not the process's CWD."""
    out = dict(settings)
    for key in _FILES:
        value = out.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            out[key] = str(base_dir / value)
    return out


def _path(settings: Mapping[str, Any], key: str, base_dir: Path | None, where: str) -> str | None:
    value = settings.get(key)
    if value is None:
        return None
    p = Path(str(value))
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if not p.is_file():
        raise ConfigError(f"no such file: {p}", key=f"{where}.{key}")
    return str(p)


def server_context(
    settings: Mapping[str, Any], *, base_dir: Path | None = None, where: str = "tls"
) -> ssl.SSLContext:
    cert = _path(settings, "cert", base_dir, where)
    key = _path(settings, "key", base_dir, where)
    ca = _path(settings, "ca", base_dir, where)
    if cert is None or key is None:
        raise ConfigError("cert and key are both required", key=where)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if ca is not None:
            ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load the certificate or key: {exc}", key=where) from exc
    if settings.get("require_client_cert", False):
        if ca is None:
            raise ConfigError("require_client_cert needs ca (the authority that signs clients)", key=where)
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif ca is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(
    settings: Mapping[str, Any], *, base_dir: Path | None = None, where: str = "tls"
) -> ssl.SSLContext:
    ca = _path(settings, "ca", base_dir, where)
    cert = _path(settings, "cert", base_dir, where)
    key = _path(settings, "key", base_dir, where)
    if (cert is None) != (key is None):  # one without the other would be ignored or fail late
        raise ConfigError("cert and key go together: give both or neither", key=where)
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.get("check_hostname") is False:
        ctx.check_hostname = False
    try:
        if cert is not None:
            ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load the client certificate or key: {exc}", key=where) from exc
    return ctx


def peer_subject(ssl_object: Any) -> str | None:
    """The peer certificate's subject as RFC 4514-ish text ("CN=lab,O=Hopital"), or None."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    parts = []
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            short = _SHORT.get(name, name)
            parts.append(f"{short}={value}")
    return ",".join(reversed(parts)) or None


_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}
