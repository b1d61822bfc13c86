import pytest
from django.core.exceptions import ImproperlyConfigured

from event_stream.settings import (
    HEARTBEAT_INTERVAL_MAX,
    CelerySettings,
    ConfigError,
    RelaySettings,
    lenient_log_level,
    load_celery_settings,
    load_log_level,
    load_settings,
    load_transport_options,
)


def test_defaults_are_the_seeds():
    s = load_settings({}, {})
    assert (s.batch_size, s.interval_min, s.interval_max) == (250, 0.25, 2.0)
    assert (s.memory_limit_mb, s.memory_check_interval) == (500, 30.0)
    assert s.ordered is True


def test_a_flag_beats_a_variable_beats_the_default():
    env = {"OUTBOX_POLLER_BATCH_SIZE": "100", "OUTBOX_POLLER_INTERVAL_MAX": "5"}
    s = load_settings({"batch_size": "500"}, env)
    assert s.batch_size == 500
    assert s.interval_max == 5.0
    assert s.interval_min == 0.25


@pytest.mark.parametrize(
    ("flags", "env", "named"),
    [
        ({"batch_size": "many"}, {}, "--batch-size"),
        ({"batch_size": "0"}, {}, "--batch-size"),
        ({}, {"OUTBOX_POLLER_BATCH_SIZE": "-5"}, "OUTBOX_POLLER_BATCH_SIZE"),
        ({}, {"OUTBOX_POLLER_INTERVAL_MIN": "nan"}, "OUTBOX_POLLER_INTERVAL_MIN"),
        ({"memory_limit": "1.5"}, {"OUTBOX_POLLER_MEMORY_LIMIT_MB": "1.5"}, "OUTBOX_POLLER_MEMORY"),
        ({"memory_check_interval": "0"}, {}, "--memory-check-interval"),
        ({}, {"OUTBOX_POLLER_ORDERED": "perhaps"}, "OUTBOX_POLLER_ORDERED"),
        ({"synchronous_commit": "sometimes"}, {}, "--synchronous-commit"),
        ({}, {"OUTBOX_POLLER_SYNCHRONOUS_COMMIT": "2"}, "OUTBOX_POLLER_SYNCHRONOUS_COMMIT"),
        ({"interval_min": "3", "interval_max": "1"}, {}, "--interval-min"),
    ],
)
def test_bad_values_name_their_flag_or_variable(flags, env, named):
    with pytest.raises(ConfigError, match=named) as err:
        load_settings(flags, env)
    assert "\n" not in str(err.value)


def test_batches_are_recorded_without_waiting_for_the_disk_unless_asked():
    assert load_settings({}, {}).synchronous_commit is False
    assert load_settings({}, {"OUTBOX_POLLER_SYNCHRONOUS_COMMIT": "true"}).synchronous_commit
    assert not load_settings(
        {"synchronous_commit": "off"}, {"OUTBOX_POLLER_SYNCHRONOUS_COMMIT": "on"}
    ).synchronous_commit


def test_blank_variables_mean_unset():
    assert load_settings({}, {"OUTBOX_POLLER_BATCH_SIZE": " "}).batch_size == 250


def test_constructor_fails_fast():
    with pytest.raises(ConfigError, match="--batch-size"):
        RelaySettings(batch_size=0)


class TestCelerySettings:
    def test_defaults(self):
        s = load_celery_settings({})
        assert (s.max_retries, s.retry_backoff, s.retry_backoff_max, s.retention_days) == (
            5,
            2.0,
            600.0,
            7,
        )

    def test_from_the_environment(self):
        s = load_celery_settings(
            {"OUTBOX_CELERY_MAX_RETRIES": "0", "OUTBOX_RETENTION_DAYS": "30", "X": "y"}
        )
        assert (s.max_retries, s.retention_days) == (0, 30)

    def test_blank_variables_mean_unset(self):
        assert load_celery_settings({"OUTBOX_CELERY_MAX_RETRIES": " "}).max_retries == 5

    @pytest.mark.parametrize(
        "env, value",
        [
            ("OUTBOX_CELERY_MAX_RETRIES", "-1"),
            ("OUTBOX_CELERY_MAX_RETRIES", "five"),
            ("OUTBOX_CELERY_RETRY_BACKOFF", "nan"),
            ("OUTBOX_CELERY_RETRY_BACKOFF_MAX", "inf"),
            ("OUTBOX_RETENTION_DAYS", "0"),
        ],
    )
    def test_a_bad_value_names_the_variable(self, env, value):
        with pytest.raises(ConfigError, match=f"^{env}: must be .*{value!r}$") as err:
            load_celery_settings({env: value})
        # Still the error Django code expects of a bad setting, as before the move.
        assert isinstance(err.value, ImproperlyConfigured)

    def test_constructor_fails_fast(self):
        with pytest.raises(ConfigError, match=r"^OUTBOX_RETENTION_DAYS: "):
            CelerySettings(retention_days=0)


def test_system_checks_report_bad_variables(monkeypatch):
    from event_stream.checks import check_celery_settings, check_relay_settings

    assert check_relay_settings() == [] and check_celery_settings() == []
    monkeypatch.setenv("OUTBOX_POLLER_BATCH_SIZE", "lots")
    monkeypatch.setenv("OUTBOX_RETENTION_DAYS", "-1")

    (relay,) = check_relay_settings()
    (celery,) = check_celery_settings()
    assert relay.id == "event_stream.E001" and "OUTBOX_POLLER_BATCH_SIZE" in relay.msg
    assert celery.id == "event_stream.E002" and "OUTBOX_RETENTION_DAYS" in celery.msg


class TestSharedVariables:
    """EVENT_STREAM_LOG_LEVEL and CELERY_BROKER_TRANSPORT_OPTIONS: checked by the relay with its
    own settings, and by the worker and beat when they start."""

    @pytest.mark.parametrize("value", ["debug", "DEBUG", " Warning ", "critical"])
    def test_a_log_level_in_any_case(self, value):
        assert load_log_level({"EVENT_STREAM_LOG_LEVEL": value}) == value.strip().upper()
        assert load_settings({}, {"EVENT_STREAM_LOG_LEVEL": value})

    def test_the_log_level_defaults_to_info(self):
        assert load_log_level({}) == load_log_level({"EVENT_STREAM_LOG_LEVEL": " "}) == "INFO"

    @pytest.mark.parametrize("value", ["loud", "10", "WARN ING"])
    def test_a_bad_log_level_is_named_by_the_relay_and_left_out_of_djangos_logging(self, value):
        env = {"EVENT_STREAM_LOG_LEVEL": value}
        with pytest.raises(ConfigError, match=f"^EVENT_STREAM_LOG_LEVEL: must be .*{value!r}$"):
            load_settings({}, env)
        assert lenient_log_level(env) == "INFO"

    def test_djangos_logging_takes_the_level_in_capitals(self, monkeypatch):
        import importlib

        import plane.settings

        monkeypatch.setenv("EVENT_STREAM_LOG_LEVEL", "debug")
        try:
            module = importlib.reload(plane.settings)
            assert module.LOGGING["loggers"]["event_stream"]["level"] == "DEBUG"
        finally:
            monkeypatch.undo()
            importlib.reload(plane.settings)

    @pytest.mark.parametrize("value", ["[1]", "nonsense", '"x"', "null"])
    def test_bad_transport_options_are_named(self, value):
        env = {"CELERY_BROKER_TRANSPORT_OPTIONS": value}
        with pytest.raises(ConfigError, match=r"^CELERY_BROKER_TRANSPORT_OPTIONS: must be a JSON"):
            load_transport_options(env)
        with pytest.raises(ConfigError, match=r"^CELERY_BROKER_TRANSPORT_OPTIONS: "):
            load_settings({}, env)

    def test_transport_options(self):
        env = {"CELERY_BROKER_TRANSPORT_OPTIONS": '{"visibility_timeout": 60}'}
        assert load_transport_options(env) == {"visibility_timeout": 60}
        assert load_transport_options({"CELERY_BROKER_TRANSPORT_OPTIONS": " "}) == {}

    @pytest.mark.parametrize(
        "env",
        [
            {"OUTBOX_CELERY_MAX_RETRIES": "abc"},
            {"OUTBOX_RETENTION_DAYS": "0"},
            {"CELERY_BROKER_TRANSPORT_OPTIONS": "[1]"},
            {"EVENT_STREAM_LOG_LEVEL": "loud"},
        ],
    )
    def test_the_worker_and_beat_refuse_to_start_on_a_bad_value(self, env, capfd):
        from celery_app import refuse_bad_settings

        with pytest.raises(SystemExit) as exit_info:
            refuse_bad_settings("celery worker", env)
        assert exit_info.value.code == 2
        (variable,) = env
        assert capfd.readouterr().err.startswith(f"celery worker: {variable}: must be ")

    def test_the_worker_and_beat_start_on_good_values(self):
        from celery_app import refuse_bad_settings

        refuse_bad_settings("celery worker", {"EVENT_STREAM_LOG_LEVEL": "debug"})


class TestHeartbeatInterval:
    def test_health_sees_at_least_three_heartbeats_of_a_live_relay(self):
        from event_stream import health

        assert HEARTBEAT_INTERVAL_MAX * 3 <= health.RELAY_ALIVE_SECONDS
        assert load_settings({"heartbeat_interval": "10"}, {}).heartbeat_interval == 10

    @pytest.mark.parametrize("value", ["11", "60", "300"])
    def test_a_longer_interval_is_refused_by_name(self, value):
        env = {"OUTBOX_POLLER_HEARTBEAT_INTERVAL": value}
        with pytest.raises(ConfigError, match=r"^OUTBOX_POLLER_HEARTBEAT_INTERVAL: .*at most 10"):
            load_settings({}, env)
        with pytest.raises(ConfigError, match=r"^--heartbeat-interval: "):
            load_settings({"heartbeat_interval": value}, {})
