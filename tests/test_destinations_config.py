"""``[[destinations]]`` configuration: parsed, checked, and refused with the setting named."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicator.config import DestinationSettings, load_config
from replicator.errors import ConfigError


def cfg(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_destinations_parsed(tmp_path: Path) -> None:
    c = load_config(cfg(tmp_path, """
[[destinations]]
name = "dr"
url = "s3://bucket/replicator?endpoint=http://127.0.0.1:7070"
required = true

[[destinations]]
name = "second-copy"
url = "/srv/backup2"
"""), env={})
    assert c.destinations == (
        DestinationSettings("dr", "s3://bucket/replicator?endpoint=http://127.0.0.1:7070", True),
        DestinationSettings("second-copy", "/srv/backup2", False),
    )


@pytest.mark.parametrize(("text", "setting", "message"), [
    ('[[destinations]]\nname = "dr"\n', "destinations[0].url", "required"),
    ('[[destinations]]\nurl = "/x"\n', "destinations[0].name", "required"),
    ('[[destinations]]\nname = "primary"\nurl = "/x"\n', "destinations[0].name", "reserved"),
    ('[[destinations]]\nname = "a"\nurl = "/x"\n[[destinations]]\nname = "a"\nurl = "/y"\n',
     "destinations[1].name", "used twice"),
    ('[[destinations]]\nname = "a"\nurl = "ftp://x/y"\n', "store.url", "unsupported"),
    ('[[destinations]]\nname = "a"\nurl = "s3://k:secret@bucket"\n', "store.url",
     "credentials do not belong"),
    ('[[destinations]]\nname = "a"\nurl = "/x"\nspeed = 3\n', "destinations[0].speed",
     "unknown setting"),
    ('destinations = "x"\n', "destinations", "array of tables"),
])
def test_bad_destinations_refused(tmp_path: Path, text: str, setting: str, message: str
                                  ) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(cfg(tmp_path, text), env={})
    assert exc.value.setting == setting
    assert message in str(exc.value)
    assert "secret" not in str(exc.value)


def test_destination_same_as_primary_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="primary store itself"):
        load_config(cfg(tmp_path, '[store]\nurl = "/srv/a"\n[[destinations]]\nname = "a"\n'
                                  'url = "/srv/a"\n'), env={})
