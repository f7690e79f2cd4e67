"""Transport security: TLS / mutual TLS for every gRPC server and channel, TLS and auth for etcd.

A process has one identity, so the configuration is process-wide: `configure()` runs once at start
(from `--tls-cert/--tls-key/--tls-ca`), and every server and channel the process opens uses it.

- `--tls-cert` + `--tls-key`: servers speak TLS; channels present this certificate as the client
  identity.
- `--tls-ca`: channels verify servers against this CA; servers *require* a client certificate
  signed by it (mutual TLS), so a caller without one is refused during the handshake.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aetcd
import grpc
from aetcd import rpc
from aetcd.client import _handle_errors

if TYPE_CHECKING:
    from pdlb.common.config import FlagParser


@dataclass(frozen=True)
class TLSConfig:
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    server_name: str = ""  # expected name in server certificates, when it is not the dialled host

    @classmethod
    def from_files(cls, cert: str = "", key: str = "", ca: str = "", server_name: str = "") -> TLSConfig | None:
        """None when no file is given (plaintext); SystemExit with the reason on a bad combination."""
        if not (cert or key or ca):
            return None
        if bool(cert) != bool(key):
            raise SystemExit("--tls-cert and --tls-key go together")
        return cls(_read(cert), _read(key), _read(ca), server_name)

    @property
    def mutual(self) -> bool:
        return self.ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise SystemExit("a TLS server needs --tls-cert and --tls-key")
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.mutual
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read(path: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"cannot read {path}: {exc.strerror}") from None


_active: TLSConfig | None = None


def configure(tls: TLSConfig | None) -> None:
    global _active
    _active = tls


def active() -> TLSConfig | None:
    return _active


def add_tls_flags(parser: FlagParser) -> None:
    parser.flag("--tls-cert", default="", help="PEM certificate: serve TLS and present it as client identity")
    parser.flag("--tls-key", default="", help="PEM private key of --tls-cert")
    parser.flag(
        "--tls-ca",
        default="",
        help="PEM CA bundle: verify servers with it and require client certificates it signed (mutual TLS)",
    )
    parser.flag("--tls-server-name", default="", help="name expected in server certificates (default: the host)")


def tls_from_args(args: argparse.Namespace) -> TLSConfig | None:
    return TLSConfig.from_files(args.tls_cert, args.tls_key, args.tls_ca, args.tls_server_name)


def open_channel(target: str, options: list | None = None, tls: TLSConfig | None = None) -> grpc.aio.Channel:
    """An asyncio channel to a pdlb service, secured as this process is configured."""
    from pdlb.common.grpc_server import CHANNEL_OPTIONS

    tls = tls or _active
    base = list(options if options is not None else CHANNEL_OPTIONS)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=base)
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=base + tls.channel_options())


def open_sync_channel(target: str, tls: TLSConfig | None = None) -> grpc.Channel:
    tls = tls or _active
    if tls is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, tls.channel_credentials(), options=tls.channel_options())


# etcd ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EtcdSecurity:
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    user: str = ""
    password: str = ""

    @property
    def tls(self) -> bool:
        return self.ca is not None or self.cert is not None


_etcd = EtcdSecurity()


def configure_etcd(security: EtcdSecurity) -> None:
    global _etcd
    _etcd = security


def etcd_security() -> EtcdSecurity:
    return _etcd


def add_etcd_security_flags(parser: FlagParser) -> None:
    parser.flag("--etcd-ca", default="", help="PEM CA that signed etcd's server certificate (TLS to etcd)")
    parser.flag("--etcd-cert", default="", help="PEM client certificate for etcd (its --client-cert-auth)")
    parser.flag("--etcd-key", default="", help="PEM private key of --etcd-cert")
    parser.flag("--etcd-user", default="", help="etcd user (etcd auth enabled)")
    parser.flag("--etcd-password", default="", help="password of --etcd-user (prefer the environment variable)")


def etcd_security_from_args(args: argparse.Namespace) -> EtcdSecurity:
    if bool(args.etcd_cert) != bool(args.etcd_key):
        raise SystemExit("--etcd-cert and --etcd-key go together")
    if bool(args.etcd_user) != bool(args.etcd_password):
        raise SystemExit("--etcd-user and --etcd-password go together")
    return EtcdSecurity(
        _read(args.etcd_ca), _read(args.etcd_cert), _read(args.etcd_key), args.etcd_user, args.etcd_password
    )


class EtcdCredentialsError(RuntimeError):
    """etcd refused the configured user name or password."""


class SecureEtcdClient(aetcd.Client):
    """aetcd opens plaintext channels only; this one opens a TLS channel, then authenticates."""

    def __init__(self, security: EtcdSecurity, **kw) -> None:
        super().__init__(username=security.user or None, password=security.password or None, **kw)
        self._security = security

    async def connect(self) -> None:
        """Connect (and authenticate). Raises EtcdCredentialsError, naming the endpoint and user, when
        etcd refuses the user name or password: a service then exits with that line, not a gRPC dump."""
        try:
            await self._connect()
        except (grpc.aio.AioRpcError, aetcd.exceptions.InvalidArgumentError) as exc:
            details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            if self._username and "authentication failed" in (details or ""):
                raise EtcdCredentialsError(
                    f"etcd at {self._host}:{self._port} refused user {self._username!r}: {details} "
                    "(check --etcd-user and --etcd-password)"
                ) from None
            raise

    @_handle_errors
    async def _connect(self) -> None:
        if not self._security.tls:
            await super().connect()
            return
        if self._connected.is_set():
            return
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self._security.ca,
            private_key=self._security.key,
            certificate_chain=self._security.cert,
        )
        self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", credentials, options=self._options.items())
        if self._username and self._password:
            self.auth_stub = rpc.AuthStub(self.channel)
            request = rpc.AuthenticateRequest(name=self._username, password=self._password)
            reply = await self.auth_stub.Authenticate(request, timeout=self._timeout)
            self.metadata = (("token", reply.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.client.watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()
