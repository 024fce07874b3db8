"""service.ops.metrics: every metric defined once, named by the Prometheus guide, on our own registry."""

from __future__ import annotations

from typing import get_args

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from service import __version__
from service.errors import LoginRefusalReason
from service.ops import metrics

EXPECTED = {
    # family name (as the client reports it, without _total) -> (type, label names)
    "pointgate_messages": ("counter", {"api", "outcome", "code"}),
    "pointgate_points_written": ("counter", set()),
    "pointgate_events_written": ("counter", set()),
    "pointgate_write_batch_points": ("histogram", set()),
    "pointgate_write_seconds": ("histogram", set()),
    "pointgate_write_errors": ("counter", {"reason"}),
    "pointgate_write_queue_points": ("gauge", set()),
    "pointgate_connected_devices": ("gauge", set()),
    "pointgate_auth_failures": ("counter", {"reason"}),
    "pointgate_acl_denials": ("counter", {"action"}),
    "pointgate_replies": ("counter", {"code"}),
    "pointgate_requests": ("counter", {"route", "code"}),
    "pointgate_sub_devices_online": ("gauge", set()),
    "pointgate_models_loaded": ("gauge", set()),
    "pointgate_build_info": ("gauge", {"version"}),
    "pointgate_draining": ("gauge", set()),
    "pointgate_limit_hits": ("counter", {"limit"}),
    "pointgate_protocol_violations": ("counter", set()),
}


def _families() -> dict[str, tuple[str, str]]:
    return {family.name: (family.type, family.documentation) for family in metrics.REGISTRY.collect()}


def test_every_metric_is_registered_with_its_type_and_help() -> None:
    """Each pointgate_ metric of the contract exists on REGISTRY with the right type and a help text."""
    families = _families()
    for name, (kind, _labels) in EXPECTED.items():
        assert name in families, name
        assert families[name][0] == kind, name
        assert families[name][1].strip(), f"{name} has no help text"


def test_no_unexpected_pointgate_metrics_and_no_device_labels() -> None:
    """Only the contract's pointgate_ metrics exist, with its label sets: no device or product ids."""
    assert {name for name in _families() if name.startswith("pointgate_")} == set(EXPECTED)
    # prometheus-client keeps label names private; reading them is the only way to see unused labels.
    declared = {
        value._name: set(value._labelnames) for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)
    }
    assert declared == {name: labels for name, (_kind, labels) in EXPECTED.items()}


def test_build_info_is_one_with_the_package_version() -> None:
    """pointgate_build_info{version=<service.__version__>} is 1."""
    assert metrics.REGISTRY.get_sample_value("pointgate_build_info", {"version": __version__}) == 1


def test_known_reasons_start_at_zero() -> None:
    """Every auth-failure, write-error and ACL-denial label is exported before its first event, so rate() works."""
    for auth_reason in metrics.AUTH_FAILURE_REASONS:
        assert metrics.REGISTRY.get_sample_value("pointgate_auth_failures_total", {"reason": auth_reason}) is not None
    for write_reason in metrics.WRITE_ERROR_REASONS:
        assert metrics.REGISTRY.get_sample_value("pointgate_write_errors_total", {"reason": write_reason}) is not None
    for action in metrics.ACL_ACTIONS:
        assert metrics.REGISTRY.get_sample_value("pointgate_acl_denials_total", {"action": action}) is not None
    for limit in metrics.LIMIT_NAMES:
        assert metrics.REGISTRY.get_sample_value("pointgate_limit_hits_total", {"limit": limit}) is not None


def test_process_collectors_are_on_the_registry() -> None:
    """The process and platform collectors are registered on REGISTRY, not only on the global one."""
    families = _families()
    assert "python_info" in families
    assert "process_cpu_seconds" in families


def test_render_is_prometheus_text_with_current_values() -> None:
    """render() returns the text format and its content type, with an increment visible in the body."""
    labels = {"api": "resume", "outcome": "rejected", "code": "1204"}
    before = metrics.REGISTRY.get_sample_value("pointgate_messages_total", labels) or 0.0
    metrics.MESSAGES.labels(**labels).inc()
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert samples[("pointgate_messages_total", tuple(sorted(labels.items())))] == before + 1
    assert samples[("pointgate_build_info", (("version", __version__),))] == 1


def test_login_refusal_reasons_are_auth_failure_labels() -> None:
    """Every reason a CONNECT can be refused with while parsing is a pre-created auth-failure label."""
    assert set(get_args(LoginRefusalReason)) <= set(metrics.AUTH_FAILURE_REASONS)
    assert "client_cert_required" not in metrics.AUTH_FAILURE_REASONS  # the TLS handshake refuses that, not us
