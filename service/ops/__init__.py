"""What operators see: structured logs, Prometheus metrics, the ``/livez`` ``/readyz`` ``/metrics`` endpoint.

May import: ``service`` (version) only; everything else imports these.
"""
