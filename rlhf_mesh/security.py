"""Who may call what: TLS and mutual TLS reloaded from disk, bearer tokens with roles.

The role each RPC needs is part of the API: the `required_role` option on every rpc in
protos/. A token file lists tokens with the roles they hold (`admin` may call every RPC):

    tokens:
      - name: learner          # shown in logs instead of the token
        token: 8f1c...         # at least 16 characters
        roles: [admin]
      - name: eval-pipeline
        token: 2b9d...
        roles: [score, generate]

Both the token file and the certificate files are re-read when they change on disk, so a
rotated Kubernetes Secret takes effect without a restart.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Generic, Literal, TypeVar

import grpc
import yaml
from google.protobuf import descriptor_pool
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator

from rlhf_mesh.v1 import common_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
RoleName = Literal["score", "generate", "feedback", "monitor", "admin", "rate"]
ADMIN = common_pb2.ROLE_ADMIN


def role_name(role: int) -> str:
    return common_pb2.Role.Name(role).removeprefix("ROLE_").lower()


@cache
def required_role(method: str) -> int:
    """The role `/package.Service/Method` needs; admin for an RPC that names none."""
    service, _, name = method.lstrip("/").rpartition("/")
    try:
        descriptor = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        return ADMIN
    return descriptor.GetOptions().Extensions[common_pb2.required_role] or ADMIN


class Token(BaseModel, extra="forbid"):
    name: str = Field(min_length=1)
    token: SecretStr = Field(min_length=16)
    roles: list[RoleName] = Field(min_length=1)

    @field_validator("token")
    @classmethod
    def _visible_ascii(cls, token: SecretStr) -> SecretStr:
        # What a header or gRPC metadata can carry; anything else could never be presented.
        if not _VISIBLE_ASCII.fullmatch(token.get_secret_value()):
            raise ValueError("a token is printable ASCII without spaces")
        return token


class _TokensFile(BaseModel, extra="forbid"):
    tokens: list[Token]


@dataclass(frozen=True)
class _Version:
    stamps: tuple[tuple[int, int], ...]  # (mtime_ns, size) of each file


def _version(paths: Sequence[Path]) -> _Version:
    stats = [p.stat() for p in paths]
    return _Version(tuple((s.st_mtime_ns, s.st_size) for s in stats))


class Reloading(Generic[T]):
    """What `load` makes of some files, made again when one of them changes on disk.

    Checked at most every `interval_s`. A change that fails to load (a half-written file,
    bad YAML) keeps the previous value and is retried at the next check.
    """

    def __init__(self, paths: Sequence[Path], load: Callable[[], T], interval_s: float = 1.0) -> None:
        self._paths = list(paths)
        self._load = load
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._version = _version(self._paths)
        self.value = load()
        self._checked = time.monotonic()

    def changed(self) -> bool:
        """Reload if a file changed since the last load; True when `value` is new."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < self._interval_s:
                return False
            self._checked = now
            try:
                version = _version(self._paths)
                if version == self._version:
                    return False
                value = self._load()
            except (OSError, ValueError) as err:
                log.error("keeping the loaded %s: reloading failed: %s",
                          ", ".join(p.name for p in self._paths), type(err).__name__)
                return False
            self._version, self.value = version, value
            log.info("reloaded %s", ", ".join(p.name for p in self._paths))
            return True


def load_tokens(path: Path) -> list[Token]:
    """The tokens of a token file; ValueError naming the problem (never a token's value)."""
    try:
        return _TokensFile.model_validate(yaml.safe_load(path.read_text()) or {}).tokens
    except ValidationError as err:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"token file {path}: {where}") from None
    except yaml.YAMLError:
        raise ValueError(f"token file {path}: not valid YAML") from None


class TokenAuth:
    """Checks the bearer token of a call against the token file and the RPC's required role."""

    def __init__(self, path: Path) -> None:
        self._tokens = Reloading([path], lambda: load_tokens(path))

    def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may go on; else the status and a message for the caller."""
        presented = [v for k, v in metadata if k == "authorization" and isinstance(v, str)]
        token = bearer_token(presented[0]) if presented else None
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token (metadata 'authorization: Bearer <token>')"
        holder = self.holder(token)
        if holder is None:
            return grpc.StatusCode.UNAUTHENTICATED, "invalid token"
        role = required_role(method)
        if "admin" not in holder.roles and role_name(role) not in holder.roles:
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"token {holder.name!r} lacks the role {role_name(role)!r} that {method} requires"
            )
        return None

    def holder(self, token: str) -> Token | None:
        """The entry of the token file that holds `token` (the file re-read when it changed)."""
        self._tokens.changed()
        if not _VISIBLE_ASCII.fullmatch(token):  # no token holds it (and encode() could fail on it)
            return None
        candidate = token.encode()
        # Every token is compared, in constant time each, so timing tells nothing about which matched.
        found = None
        for entry in self._tokens.value:
            if hmac.compare_digest(candidate, entry.token.get_secret_value().encode()):
                found = entry
        return found


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (the scheme in any case), or None."""
    scheme, _, token = authorization.strip(" \t").partition(" ")
    token = token.lstrip(" \t")
    return token if scheme.lower() == "bearer" and token else None


def caller_name(context: grpc.aio.ServicerContext, auth: TokenAuth | None) -> str:
    """Who calls, for fair sharing: the token's holder when tokens are on (the server checked the
    token before the call), else the peer's address."""
    if auth is not None:
        for key, value in context.invocation_metadata() or ():
            token = bearer_token(value) if key == "authorization" and isinstance(value, str) else None
            holder = auth.holder(token) if token else None
            if holder is not None:
                return holder.name
    return context.peer()


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS (mutual TLS when `client_ca` is given) that picks up rotated files at the next handshake."""
    paths = [cert, key, *([client_ca] if client_ca else [])]

    def configuration() -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(key.read_bytes(), cert.read_bytes())], client_ca.read_bytes() if client_ca else None
        )

    files = Reloading(paths, configuration)
    return grpc.dynamic_ssl_server_credentials(
        files.value,
        lambda: files.value if files.changed() else None,
        require_client_authentication=client_ca is not None,
    )
