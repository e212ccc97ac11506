"""No secret and no scored text in any log of the run: the servers and workers that the other
tests started all log into one folder (conftest.LOG_DIR), and this test, which pytest runs last
(conftest.pytest_collection_modifyitems), reads all of it."""

from __future__ import annotations

import pytest

from tests.conftest import CANARY_TEXT, LOG_DIR, OpenBao
from tests.test_security import CANARY_REQUEST_IDS, TEST_KEYS

SECRETS = (*TEST_KEYS, OpenBao.ROOT_TOKEN)
pytestmark = pytest.mark.integration  # it reads what the servers of the whole run logged


def test_no_secret_and_no_scored_text_in_the_logs_of_the_run() -> None:
    logs = {path.name: path.read_text(errors="replace") for path in sorted(LOG_DIR.glob("*.log"))}
    everything = "\n".join(logs.values())
    if CANARY_REQUEST_IDS[0] not in everything:
        pytest.skip("runs with the whole suite: the canary requests were not sent in this run")
    # The requests that carried the canary text and keys were logged, and are in what is read:
    for request_id in CANARY_REQUEST_IDS:
        assert f'"request_id": "{request_id}"' in everything
    assert any(name.startswith("kubesentiment-worker-") for name in logs)
    for name, text in logs.items():
        assert CANARY_TEXT not in text, f"{name} logs a scored text"
        assert CANARY_TEXT[:20] not in text, f"{name} logs the start of a scored text"
        for secret in SECRETS:
            assert secret not in text, f"{name} logs a secret"
