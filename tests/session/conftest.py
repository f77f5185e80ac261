"""Session tests that run on every backend reuse the conformance suite's fixtures."""

from tests.conformance.conftest import (  # noqa: F401  (fixtures)
    backend,
    durable_backend,
    durable_url,
    store_url,
)
