"""Encryption at rest: a keyring of AES-256 keys and the AEAD seal/open of one blob.

Where sealed blobs live in files is the formats' business (docs/FORMAT.md §2.5 for
segments, §7.5 for snapshots); this module knows nothing about files. A *sealed blob* is::

    key_id (8) | nonce (12) | ciphertext (as long as the plaintext) | GCM tag (16)

Invariants:
- Key material never leaves this module in printable form: :class:`Keyring`'s repr, every
  error and every log line name key *ids* and settings, never a key.
- A key id is a fingerprint: the first 8 bytes of SHA-256 over a domain-separation prefix
  and the key. It tells keys apart across processes and reveals nothing usable about them.
- Every blob gets a fresh random 96-bit nonce. The caller's associated data, with the key
  id appended, is authenticated: a blob opens only where (and as what) it was sealed, and
  cannot be relabelled with another key's id.
- The *first* key of a keyring seals; every key of it opens (rotation: put the new key
  first, keep the old ones while data sealed with them is retained).

How readers find the keyring: the process installs one (:func:`configure`, called where
the configuration is loaded: every CLI command, hence also the service and its compaction
child processes). Readers use the installed keyring unless given one; writers seal only
when the installed state says writes are encrypted (``encryption.enabled``). Reading works
with encryption disabled as long as keys are configured, so a store written while
encryption was on stays readable after it is turned off.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hashlib
import logging
import os
import stat
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from replicator.errors import (
    AuthenticationError,
    CorruptSegmentError,
    CorruptSnapshotError,
    EncryptionKeyError,
    KeyNotFoundError,
    SnapshotAuthenticationError,
)

if TYPE_CHECKING:
    from replicator.config import Config

log = logging.getLogger(__name__)

CIPHER = "AES-256-GCM"
KEY_BYTES = 32
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
#: bytes a sealed blob adds to its plaintext
OVERHEAD = KEY_ID_BYTES + NONCE_BYTES + TAG_BYTES
#: domain separation of key fingerprints (docs/FORMAT.md §2.5)
KEY_ID_PREFIX = b"replicator data key id v1\x00"

_KEY_FORMS = "expected 64 hex digits or the base64 of 32 bytes"


def key_id(key: bytes) -> bytes:
    """The 8-byte fingerprint of ``key`` that files record instead of the key."""
    return hashlib.sha256(KEY_ID_PREFIX + key).digest()[:KEY_ID_BYTES]


def parse_key(text: str) -> bytes:
    """A 256-bit key from 64 hex digits or standard base64 of 32 bytes. ``ValueError``
    (whose message never contains the text) for anything else."""
    t = text.strip()
    if t and all(c in string.hexdigits for c in t):
        # (base64 of 32 bytes always ends in "=", so it is never all hex digits)
        if len(t) != 2 * KEY_BYTES:
            raise ValueError(f"a key of {len(t)} hex digits; AES-256 needs {2 * KEY_BYTES} "
                             f"({_KEY_FORMS})")
        return bytes.fromhex(t)
    try:
        key = base64.b64decode(t, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"not a key ({_KEY_FORMS})") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"a key of {len(key)} bytes; AES-256 needs {KEY_BYTES} "
                         f"({_KEY_FORMS})")
    return key


@dataclass(frozen=True, slots=True, repr=False)
class Keyring:
    """AES-256 keys by id; ``active`` (the first key given) seals, all of them open.

    Build with :meth:`from_keys`. Holds ready AES-GCM contexts, not printable keys; the
    repr names ids only.
    """

    #: key id (16 hex digits) of the key that seals
    active: str
    #: every key id, the active one first
    ids: tuple[str, ...]
    _aeads: Mapping[bytes, AESGCM] = field(compare=False)
    _active_raw: bytes = field(compare=False)

    @staticmethod
    def from_keys(keys: Sequence[bytes]) -> Keyring:
        """A keyring of ``keys`` (32 bytes each; duplicates dropped), the first sealing."""
        if not keys:
            raise ValueError("a keyring needs at least one key")
        aeads: dict[bytes, AESGCM] = {}
        for k in keys:
            if len(k) != KEY_BYTES:
                raise ValueError(f"a key of {len(k)} bytes; AES-256 needs {KEY_BYTES}")
            aeads.setdefault(key_id(k), AESGCM(k))
        ids = tuple(aeads)
        return Keyring(active=ids[0].hex(), ids=tuple(i.hex() for i in ids),
                       _aeads=MappingProxyType(aeads), _active_raw=ids[0])

    def __repr__(self) -> str:
        return f"Keyring(active={self.active}, ids={list(self.ids)})"

    def has(self, kid: str) -> bool:
        return bytes.fromhex(kid) in self._aeads

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """``plaintext`` sealed with the active key, bound to ``aad`` (see module doc)."""
        kid = self._active_raw
        nonce = os.urandom(NONCE_BYTES)
        return b"".join((kid, nonce, self._aeads[kid].encrypt(nonce, plaintext, aad + kid)))

    def _open(self, kid: bytes, blob: bytes | memoryview, aad: bytes) -> bytes | None:
        """Plaintext, or None when the tag does not verify. The caller checked ``kid``."""
        try:
            out: bytes = self._aeads[kid].decrypt(
                blob[KEY_ID_BYTES:KEY_ID_BYTES + NONCE_BYTES], blob[KEY_ID_BYTES + NONCE_BYTES:],
                aad + kid)
        except InvalidTag:
            return None
        return out


def blob_key_id(blob: bytes | memoryview) -> str:
    """Key id (hex) a sealed blob names."""
    return bytes(blob[:KEY_ID_BYTES]).hex()


def open_blob(keyring: Keyring | None, blob: bytes | memoryview, aad: bytes, *, name: str,
              position: int, offset: int | None = None, what: str = "block",
              snapshot: bool = False) -> bytes:
    """The plaintext of a sealed blob read from file ``name`` at byte ``position``.

    Raises :class:`KeyNotFoundError` (the key id is not in ``keyring``, or there is no
    keyring), :class:`AuthenticationError` (:class:`SnapshotAuthenticationError` with
    ``snapshot``) when the tag does not verify -- never returns unauthenticated bytes.
    """
    if len(blob) < OVERHEAD:
        err = CorruptSnapshotError if snapshot else CorruptSegmentError
        raise err(name, position, f"encrypted {what} shorter than its key id, nonce and tag",
                  offset)
    kid = bytes(blob[:KEY_ID_BYTES])
    if keyring is None or kid not in keyring._aeads:
        raise KeyNotFoundError(name, kid.hex(), keyring.ids if keyring else (), position)
    out = keyring._open(kid, blob, aad)
    if out is None:
        if snapshot:
            raise SnapshotAuthenticationError(name, position, kid.hex(), what=what)
        raise AuthenticationError(name, position, kid.hex(), offset, what)
    return out


# -- loading keys --------------------------------------------------------------------------


def _keys_from_file(path: Path) -> list[bytes]:
    setting = "encryption.key_file"
    try:
        text = path.read_text("utf-8")
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise EncryptionKeyError(setting, f"{path}: no such file") from None
    except IsADirectoryError:
        raise EncryptionKeyError(setting, f"{path} is a directory, not a key file") from None
    except OSError as exc:
        raise EncryptionKeyError(setting, f"{path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise EncryptionKeyError(setting, f"{path}: not a text file") from None
    keys: list[bytes] = []
    for n, line in enumerate(text.splitlines(), 1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        try:
            keys.append(parse_key(body))
        except ValueError as exc:
            raise EncryptionKeyError(setting, f"{path} line {n}: {exc}") from None
    if not keys:
        raise EncryptionKeyError(setting, f"{path} holds no key (one per line: {_KEY_FORMS}; "
                                 "blank lines and # comments are ignored)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("encryption key file is accessible to other users; chmod 600 it",
                    extra={"path": str(path)})
    return keys


def _keys_from_env(name: str, env: Mapping[str, str], required: bool) -> list[bytes] | None:
    setting = "encryption.key_env"
    parts = [p.strip() for p in env.get(name, "").split(",") if p.strip()]
    if not parts:
        if not required:
            return None
        state = "empty" if name in env else "not set"
        raise EncryptionKeyError(
            setting, f"encryption is enabled but the environment variable {name} is {state} "
            f"(comma-separated keys, {_KEY_FORMS}; or set encryption.key_file)")
    keys: list[bytes] = []
    for i, part in enumerate(parts, 1):
        try:
            keys.append(parse_key(part))
        except ValueError as exc:
            raise EncryptionKeyError(setting, f"key {i} of {len(parts)} in the environment "
                                     f"variable {name}: {exc}") from None
    return keys


def keyring_from_config(cfg: Config, env: Mapping[str, str] | None = None) -> Keyring | None:
    """The keyring ``cfg.encryption`` describes, or None when no key is configured.

    Keys come from ``key_file`` when it is set (the environment is then not consulted),
    else from the environment variable ``key_env``. With ``enabled`` a missing source is an
    error; without it, keys that are present still load (to read encrypted data) and a
    configured but broken source is still an error. Raises :class:`EncryptionKeyError`
    naming the setting, never a key.
    """
    s = cfg.encryption
    env = os.environ if env is None else env
    if s.key_file is not None:
        keys: list[bytes] | None = _keys_from_file(s.key_file)
    else:
        keys = _keys_from_env(s.key_env, env, s.enabled)
    return Keyring.from_keys(keys) if keys else None


# -- the process-wide keyring --------------------------------------------------------------


class _Installed(enum.Enum):
    INSTALLED = "installed"


#: default of every ``keyring=`` parameter: the keyring :func:`install` made current (for a
#: writer: the sealing keyring, None when writes are not encrypted)
INSTALLED = _Installed.INSTALLED
#: what a ``keyring=`` parameter accepts: a keyring, None (no encryption / no keys), or
#: :data:`INSTALLED`
KeyringArg = Keyring | None | _Installed


@dataclass(frozen=True, slots=True)
class _State:
    keyring: Keyring | None = None
    encrypt: bool = False


_state = _State()


def install(keyring: Keyring | None, *, encrypt: bool) -> None:
    """Make ``keyring`` the process's keyring: readers use it to open encrypted data and,
    with ``encrypt``, writers seal with its active key."""
    global _state
    if encrypt and keyring is None:
        raise ValueError("encrypting writes needs a keyring")
    _state = _State(keyring, encrypt)


def installed() -> Keyring | None:
    """The keyring readers use (None: none configured)."""
    return _state.keyring


def sealing() -> Keyring | None:
    """The keyring writers seal with, or None when writes are not encrypted."""
    st = _state
    return st.keyring if st.encrypt else None


def for_reading(arg: KeyringArg) -> Keyring | None:
    """The keyring a reader given ``arg`` uses."""
    return _state.keyring if arg is INSTALLED else arg


def for_writing(arg: KeyringArg) -> Keyring | None:
    """The keyring a writer given ``arg`` seals with (None: write unencrypted)."""
    return sealing() if arg is INSTALLED else arg


@contextlib.contextmanager
def installed_as(keyring: Keyring | None, *, encrypt: bool) -> Iterator[None]:
    """:func:`install` for the duration of a ``with`` block (tests, embedded use)."""
    global _state
    before = _state
    install(keyring, encrypt=encrypt)
    try:
        yield
    finally:
        _state = before


def configure(cfg: Config, env: Mapping[str, str] | None = None) -> Keyring | None:
    """Load the keyring ``cfg`` describes and install it (see :func:`keyring_from_config`;
    raises :class:`EncryptionKeyError` before installing anything)."""
    keyring = keyring_from_config(cfg, env)
    install(keyring, encrypt=cfg.encryption.enabled)
    if keyring is not None:
        log.debug("encryption keyring loaded",
                  extra={"writes_encrypted": cfg.encryption.enabled,
                         "active_key_id": keyring.active, "keys": len(keyring.ids)})
    return keyring
