"""Where settings come from: flag > environment > TOML file (--config, $GENWORKER_CONFIG,
or /etc/genworker/genworker.toml when present) > default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from genworker import config
from genworker.config import ConfigError, build

README = Path(__file__).resolve().parents[2] / "README.md"


def test_a_flag_beats_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "g.toml"
    toml.write_text("workers = 3\nconcurrency = 2\nlease_s = 12.5\n")
    env = {"GENWORKER_CONFIG": str(toml), "GENWORKER_WORKERS": "4", "GENWORKER_CONCURRENCY": "6"}
    settings, sources = build({"workers": "5"}, env)
    assert (settings.workers, sources["workers"]) == (5, "flag")
    assert (settings.concurrency, sources["concurrency"]) == (6, "env GENWORKER_CONCURRENCY")
    assert (settings.lease_s, sources["lease_s"]) == (12.5, f"file {toml}")
    assert (settings.claim_batch, sources["claim_batch"]) == (100, "default")
    assert sources["config_file"] == "env GENWORKER_CONFIG"


def test_the_default_file_is_read_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tmp_path / "etc" / "genworker.toml"
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", default)
    assert build({}, {})[0].workers == 8  # absent: no error, defaults
    default.parent.mkdir()
    default.write_text("workers = 2\n")
    settings, sources = build({}, {})
    assert (settings.workers, sources["workers"]) == (2, f"file {default}")
    other = tmp_path / "other.toml"
    other.write_text("workers = 7\n")
    assert build({"config_file": str(other)}, {})[0].workers == 7  # --config replaces it


def test_database_url_comes_from_database_url_first() -> None:
    env = {"DATABASE_URL": "postgresql://a@h/one", "GENWORKER_DATABASE_URL": "postgresql://b@h/x"}
    assert build({}, env)[0].database_url == "postgresql://a@h/one"
    assert build({}, {"GENWORKER_DATABASE_URL": "postgresql://b@h/x"})[0].database_url.endswith(
        "/x"
    )


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("workers = 'many'\n", "expected int"),
        ("workers = 0\n", "at least 1"),
        ("wrokers = 3\n", "unknown setting 'wrokers'"),
        ("workers = \n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_one_clear_error(tmp_path: Path, text: str, words: str) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=words):
        build({"config_file": str(toml)}, {})


def test_the_readmes_toml_example_is_valid(tmp_path: Path) -> None:
    block = re.search(r"```toml\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no TOML example"
    toml = tmp_path / "readme.toml"
    toml.write_text(block[1])
    settings, sources = build({"config_file": str(toml)}, {})
    assert settings.workers == 16
    assert [(p.name, p.images) for p in settings.plans] == [
        ("free", 2),
        ("start", 30),
        ("pro", 70),
    ]
    assert all(
        src.startswith("file") for name, src in sources.items() if name in ("workers", "api_url")
    )


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://gw:s3cret@db/gw", "postgresql://gw:***@db/gw"),
        ("host=db password=s3cret user=gw", "host=db password=*** user=gw"),
        ("host=db password = 's3cret' user=gw", "host=db password = *** user=gw"),
        ("host=db password='correct horse battery' user=gw", "host=db password=*** user=gw"),
        (r"host=db password='it\'s a secret' user=gw", "host=db password=*** user=gw"),
        ("postgresql://gw@db/gw?password=s3cret", "postgresql://gw@db/gw?password=***"),
        ("host=db user=gw", "host=db user=gw"),
    ],
)
def test_a_dsn_is_shown_without_any_piece_of_its_password(dsn: str, shown: str) -> None:
    assert config.mask_dsn(dsn) == shown


def test_a_key_file_or_config_file_others_can_read_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "key"
    key.write_text("sk-test\n")
    key.chmod(0o644)
    cfg = tmp_path / "genworker.toml"
    cfg.write_text('model = "dall-e-3"\napi_key = "sk-in-file"\n')
    harmless = tmp_path / "harmless.toml"
    harmless.write_text('model = "dall-e-3"\ndatabase_url = "postgresql://app@db/gw"\n')
    harmless.chmod(0o644)
    cfg.chmod(0o640)
    private = tmp_path / "private-key"
    private.write_text("sk-private\n")
    private.chmod(0o600)
    with caplog.at_level("WARNING", logger="genworker.config"):
        build({"config_file": str(harmless)}, {})  # no secret in it: nothing to warn about
        settings = build({"api_key_file": str(key), "config_file": str(cfg)}, {})[0]
        assert settings.resolved_api_key() == "sk-in-file"  # the flag's file loses to api_key
        build({"api_key_file": str(key)}, {})[0].resolved_api_key()
        build({"api_key_file": str(key)}, {})[0].resolved_api_key()
        assert build({"api_key_file": str(private)}, {})[0].resolved_api_key() == "sk-private"
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        f"config file with secrets {cfg} can be read by other users (-rw-r-----): chmod 600 it",
        f"API key file {key} can be read by other users (-rw-r--r--): chmod 600 it",
    ]
    assert not any("sk-" in w for w in warned)


def test_roots_default_data_dir_is_not_under_its_closed_home(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As root, the embedded server runs as a system user that cannot enter /root: the
    default is /var/lib/genworker; anyone else keeps the XDG default."""
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setattr(config.os, "geteuid", lambda: 0)
    assert build({}, {})[0].resolved_data_dir == Path("/var/lib/genworker")
    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    home = Path.home() / ".local" / "share" / "genworker"
    assert build({}, {})[0].resolved_data_dir == home
    monkeypatch.setenv("XDG_DATA_HOME", "/srv/xdg")
    monkeypatch.setattr(config.os, "geteuid", lambda: 0)
    assert build({}, {})[0].resolved_data_dir == Path("/srv/xdg/genworker")


def test_a_cache_url_with_a_password_is_masked_and_kept_from_children() -> None:
    from genworker.config import display_value
    from genworker.procs import child_environ

    shown = display_value("cache", "redis://:s3cret-redis@cache.internal:6379/0")
    assert "s3cret-redis" not in shown
    assert "cache.internal" in shown
    assert display_value("cache", "postgres") == "postgres"
    env = child_environ({"GENWORKER_CACHE": "redis://:s3cret-redis@h/0", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}
