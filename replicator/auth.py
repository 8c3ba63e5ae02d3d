"""Bearer tokens for the admin HTTP API: where they come from and how they are checked.

Sources, all merged: ``server.tokens_file`` (one token per line, ``#`` comments and blank
lines ignored) and the ``REPLICATOR_ADMIN_TOKENS`` environment variable (comma-separated).
When neither gives a token, the service creates one at ``<data_dir>/admin.token`` (mode
0600, 32 random bytes, URL-safe base64) on first start and keeps using it, so a fresh
install is never open and local tools (``replicator follow``, ``status``) find it by
reading the same config.

Invariants: a token is never logged, never part of an error message or a repr; comparison
runs in constant time against every known token (no early exit that would reveal which or
how many characters matched); a token shorter than :data:`MIN_TOKEN_CHARS` is refused.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from replicator.errors import ConfigError

TOKENS_ENV = "REPLICATOR_ADMIN_TOKENS"
GENERATED_NAME = "admin.token"
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True, slots=True)
class Tokens:
    """The accepted bearer tokens (bytes), with where they came from (for messages)."""

    values: tuple[bytes, ...]
    source: str

    def __repr__(self) -> str:  # never show a token
        return f"Tokens({len(self.values)} from {self.source})"

    def check(self, presented: str | None) -> bool:
        """True when ``presented`` equals one of the tokens; constant time in the token
        contents (every token is compared, whatever matched)."""
        if not presented or not self.values:
            return False
        got = presented.encode("utf-8", "replace")
        ok = False
        for value in self.values:
            ok |= hmac.compare_digest(got, value)
        return ok

    @property
    def first(self) -> str | None:
        return self.values[0].decode() if self.values else None


def _parse_lines(text: str, source: str) -> list[bytes]:
    out: list[bytes] = []
    for n, line in enumerate(text.splitlines(), 1):
        tok = line.strip()
        if not tok or tok.startswith("#"):
            continue
        if len(tok) < MIN_TOKEN_CHARS or any(c.isspace() for c in tok):
            raise ConfigError("server.tokens_file", f"{source} line {n}: a token must be at "
                              f"least {MIN_TOKEN_CHARS} characters without spaces")
        out.append(tok.encode())
    return out


def configured_tokens(tokens_file: Path | None, env: Mapping[str, str] | None = None
                      ) -> list[bytes]:
    """Tokens from the file and the environment (may be empty)."""
    env = os.environ if env is None else env
    out: list[bytes] = []
    raw_env = env.get(TOKENS_ENV, "")
    for n, tok in enumerate((t.strip() for t in raw_env.split(",")), 1):
        if not tok:
            continue
        if len(tok) < MIN_TOKEN_CHARS:
            raise ConfigError(TOKENS_ENV, f"token {n} is shorter than {MIN_TOKEN_CHARS} "
                              "characters")
        out.append(tok.encode())
    if tokens_file is not None:
        try:
            text = tokens_file.read_text()
        except OSError as exc:
            raise ConfigError("server.tokens_file",
                              f"cannot read {tokens_file}: {exc.strerror}") from None
        out.extend(_parse_lines(text, str(tokens_file)))
    return out


def server_tokens(tokens_file: Path | None, data_dir: Path,
                  env: Mapping[str, str] | None = None) -> Tokens:
    """The tokens a service accepts: configured ones, else the generated one (created now
    if absent)."""
    found = configured_tokens(tokens_file, env)
    if found:
        return Tokens(tuple(found), "server.tokens_file" if tokens_file else TOKENS_ENV)
    path = data_dir / GENERATED_NAME
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{secrets.token_hex(4)}-{GENERATED_NAME}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # create-only: a concurrent start keeps the first token
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    try:
        values = _parse_lines(path.read_text(), str(path))
    except OSError as exc:
        raise ConfigError("server.tokens_file", f"cannot read {path}: {exc.strerror}") from None
    if not values:
        raise ConfigError("server.tokens_file", f"{path} holds no token")
    return Tokens(tuple(values), str(path))


def client_token(tokens_file: Path | None, data_dir: Path,
                 env: Mapping[str, str] | None = None) -> str | None:
    """The token a local client presents: the first configured one, else the service's
    generated one, else None (the request will be refused with 401)."""
    found = configured_tokens(tokens_file, env)
    if found:
        return found[0].decode()
    path = data_dir / GENERATED_NAME
    try:
        values = _parse_lines(path.read_text(), str(path))
    except (OSError, ConfigError):
        return None
    return values[0].decode() if values else None


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None
