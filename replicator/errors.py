"""The exception hierarchy: one root, specific subclasses that carry context.

Every error the replicator raises on purpose derives from :class:`ReplicatorError`, so a
caller (the CLI, an operator's script) can catch one class and still get a message that
names what went wrong and where. Messages never contain secrets.
"""

from __future__ import annotations


class ReplicatorError(Exception):
    """Root of every error raised on purpose by replicator."""


class ConfigError(ReplicatorError):
    """A configuration value is missing, malformed or inconsistent.

    ``setting`` names the offending setting (``ingest.seal_age_s``) so the CLI can print
    one clear line instead of a traceback.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class ValidationError(ReplicatorError):
    """A change event does not satisfy the envelope or its entity schema."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BrokerError(ReplicatorError):
    """The Kafka broker is unreachable or refused an operation."""


class StoreError(ReplicatorError):
    """A store (local directory, object storage) failed an operation."""


class ObjectExistsError(StoreError):
    """A create-only write found the name already present; nothing was overwritten."""

    def __init__(self, name: str) -> None:
        super().__init__(f"object already exists: {name}")
        self.name = name


class ObjectNotFoundError(StoreError):
    """The named object is not in the store."""

    def __init__(self, name: str) -> None:
        super().__init__(f"object not found: {name}")
        self.name = name


class InvalidNameError(ReplicatorError):
    """A topic, partition or file name would escape the store or is not ours."""


class SegmentError(ReplicatorError):
    """Base of segment format and integrity errors."""


class UnsupportedVersionError(SegmentError):
    """A segment was written by an incompatible (newer major) format version."""

    def __init__(self, path: str, major: int, minor: int, supported: int) -> None:
        super().__init__(
            f"{path}: segment format version {major}.{minor} is not supported "
            f"(this replicator reads major versions up to {supported}); upgrade replicator"
        )
        self.path = path
        self.major = major
        self.minor = minor


class CorruptSegmentError(SegmentError):
    """A segment failed a checksum or structural check.

    ``path`` is the file (or store name) and ``position`` the byte position of the bad
    block; ``offset`` is the first Kafka offset the bad block claims, when it is readable.
    """

    #: what kind of file the message names
    kind = "segment"

    def __init__(self, path: str, position: int, reason: str, offset: int | None = None) -> None:
        where = f"{path} at byte {position}"
        if offset is not None:
            where += f" (block starting at offset {offset})"
        super().__init__(f"corrupt {self.kind} {where}: {reason}")
        self.path = path
        self.position = position
        self.reason = reason
        self.offset = offset


class CorruptSnapshotError(CorruptSegmentError):
    """A snapshot file failed a checksum or structural check (``position``: byte position of
    the bad block or footer). A subclass of :class:`CorruptSegmentError` so that every
    caller that stops on a corrupt backup file stops on this one too."""

    kind = "snapshot"


class CompactionError(ReplicatorError):
    """A snapshot could not be built or verified; nothing was made visible."""


class RetentionError(ReplicatorError):
    """A retention run was refused or failed; what it already removed is reported."""


class RestoreError(ReplicatorError):
    """Base of errors that stop a restore (or a look-up) before it claims success."""


class BadRequestError(RestoreError):
    """The request itself is wrong: a malformed time, an unknown entity or topic, offsets
    beyond what is stored. Nothing was read or written."""


class PointNotRestorableError(RestoreError):
    """The requested point lies outside the restorable window.

    ``oldest_ms``/``newest_ms`` are the window's edges (epoch milliseconds, ``None`` when
    there is no backup at all), so the message can name them.
    """

    def __init__(self, message: str, *, oldest_ms: int | None, newest_ms: int | None) -> None:
        super().__init__(message)
        self.oldest_ms = oldest_ms
        self.newest_ms = newest_ms


class BackupIncompleteError(RestoreError):
    """The backup lacks data a restore needs (a missing segment between two others)."""


class TargetError(RestoreError):
    """The restore target is unreachable, refused an operation or already holds data."""


class DigestMismatchError(RestoreError):
    """What the target holds after a restore differs from the state the backup describes."""


class EncryptionKeyError(ConfigError):
    """Encryption at rest is configured but no usable key could be loaded (the key file is
    missing, unreadable or malformed, the environment variable is empty, a key has the
    wrong length). ``setting`` names the setting to fix (``encryption.key_file`` or
    ``encryption.key_env``); the message names the file or variable and the line or
    position, never a key. A :class:`ConfigError`: the CLI exits 2 before doing anything."""


class DecryptionError(SegmentError):
    """Encrypted backup data could not be read (base: no key for it, or authentication
    failed). Every subclass names the file and the key id, never a key. The CLI exits 4,
    like for any segment that cannot be used."""


class KeyNotFoundError(DecryptionError):
    """A file (or block) was encrypted with a key the keyring does not hold -- or no
    keyring is configured at all. ``key_id`` is the fingerprint of the key that is needed
    (docs/FORMAT.md §2.5); ``available`` the ids the keyring holds."""

    def __init__(self, path: str, key_id: str, available: tuple[str, ...] = (),
                 position: int | None = None) -> None:
        where = path if position is None else f"{path} at byte {position}"
        if available:
            have = f"the keyring holds {', '.join(available)}"
        else:
            have = ("no encryption key is configured ([encryption] key_file or the "
                    "environment variable named by encryption.key_env)")
        super().__init__(f"{where}: encrypted with key {key_id}, which is not available: "
                         f"{have}; add that key to the keyring to read this file")
        self.path = path
        self.key_id = key_id
        self.available = available
        self.position = position


class AuthenticationError(CorruptSegmentError, DecryptionError):
    """An encrypted block (or footer) failed AES-GCM authentication with the key its key
    id names: it was altered or damaged after it was written (its CRC may still match, if
    the change was deliberate), or it was moved from another place. Never returned as
    data. A :class:`CorruptSegmentError`, so every caller that stops on a corrupt file
    stops on this one."""

    def __init__(self, path: str, position: int, key_id: str, offset: int | None = None,
                 what: str = "block") -> None:
        super().__init__(path, position,
                         f"authentication failed with key {key_id} (AES-256-GCM): the {what} "
                         "was altered, damaged or moved since it was written, or was written "
                         "with a different key",
                         offset)
        self.key_id = key_id


class SnapshotAuthenticationError(AuthenticationError, CorruptSnapshotError):
    """:class:`AuthenticationError` in a snapshot file (also a
    :class:`CorruptSnapshotError`)."""
