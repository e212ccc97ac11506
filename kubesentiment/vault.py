"""Secrets from Vault (or OpenBao) through hvac: the API keys, the Kafka SASL credentials and the
jobs database URL, each at a KV v2 path named by a setting. The HTTP service and the Kafka
worker share this module; without VAULT_ADDR both read the same secrets from the environment.

Start-up is strict: Vault configured but unreachable, a secret missing or denied, and the
process stops with one line naming the path and the reason. After start-up it is forgiving: the
API keys are re-read every VAULT_REFRESH (rotation without a restart) and a failed read keeps the
last good keys, for up to VAULT_MAX_STALE; only then does the service report not ready. A bad
value read from a Vault that answers (a key too short) is not staleness: the keys stay, a
warning names the entry, and readiness is unaffected.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import hvac
import hvac.exceptions
import requests
import structlog
from pydantic import SecretStr

from kubesentiment.settings import Settings

log = structlog.get_logger("kubesentiment.vault")
TIMEOUT_S = 5


class VaultError(RuntimeError):
    """A secret could not be had; the message is the one line an operator needs."""


def _why(err: Exception) -> str:
    if isinstance(err, hvac.exceptions.Forbidden):
        return "permission denied (the token's policies do not allow it)"
    if isinstance(err, hvac.exceptions.InvalidPath):
        return "no secret there"
    if isinstance(err, requests.ConnectionError):
        return "Vault unreachable"
    return f"{type(err).__name__}: {str(err).strip() or 'no detail'}"


class Vault:
    """A logged-in hvac client that keeps its token valid."""

    def __init__(self, settings: Settings) -> None:
        assert settings.vault_addr, "Vault is used only where VAULT_ADDR is set"
        self.settings = settings
        self.method = settings.vault_auth_method
        verify: Any = str(settings.vault_cacert) if settings.vault_cacert else True
        self.client = hvac.Client(url=settings.vault_addr, verify=verify, timeout=TIMEOUT_S)
        self.expires: float | None = None  # monotonic time the token expires; None: never
        self.renewable = False
        self.login()

    @classmethod
    def connect(cls, settings: Settings) -> Vault | None:
        return cls(settings) if settings.vault_addr else None

    def login(self) -> None:
        s = self.settings
        mount = s.vault_auth_mount or self.method
        try:
            if self.method == "token":
                if s.vault_token is None:
                    raise VaultError("VAULT_AUTH_METHOD=token needs VAULT_TOKEN")
                self.client.token = s.vault_token.get_secret_value()
                auth = self.client.auth.token.lookup_self()["data"]
                ttl, self.renewable = auth["ttl"], auth.get("renewable", False)
            else:
                if self.method == "approle":
                    if not (s.vault_role_id and s.vault_secret_id):
                        raise VaultError(
                            "VAULT_AUTH_METHOD=approle needs VAULT_ROLE_ID and VAULT_SECRET_ID"
                        )
                    response = self.client.auth.approle.login(
                        s.vault_role_id, s.vault_secret_id.get_secret_value(), mount_point=mount
                    )
                else:
                    if not s.vault_kubernetes_role:
                        raise VaultError("VAULT_AUTH_METHOD=kubernetes needs VAULT_KUBERNETES_ROLE")
                    jwt = s.vault_kubernetes_token_file.read_text().strip()
                    response = self.client.auth.kubernetes.login(
                        s.vault_kubernetes_role, jwt, mount_point=mount
                    )
                ttl, self.renewable = (
                    response["auth"]["lease_duration"],
                    response["auth"]["renewable"],
                )
        except (hvac.exceptions.VaultError, requests.RequestException, OSError) as err:
            raise VaultError(
                f"Vault login ({self.method}, auth/{mount}) at {s.vault_addr} failed: {_why(err)}"
            ) from err
        self.expires = time.monotonic() + ttl if ttl else None

    def keep_token_alive(self, margin_s: float) -> None:
        """Renew the token when it would expire within `margin_s`; log in again (AppRole,
        Kubernetes) when it cannot be renewed, or not for long enough (its max TTL is near).
        A plain token that expires cannot be replaced: the reads then fail, and readiness says
        so once the secrets are stale."""
        if self.expires is None or self.expires - time.monotonic() > margin_s:
            return
        if self.renewable:
            try:
                ttl = self.client.auth.token.renew_self()["auth"]["lease_duration"]
                self.expires = time.monotonic() + ttl
                if ttl > margin_s or self.method == "token":
                    return
            except (hvac.exceptions.VaultError, requests.RequestException) as err:
                log.warning("vault token renewal failed", error=_why(err))
        if self.method != "token":
            self.login()

    def read(self, path: str, fields: tuple[str, ...] = ()) -> dict[str, str]:
        """The fields of the newest version of a KV v2 secret; `fields` must all be there."""
        where = f"{self.settings.vault_kv_mount}/{path}"
        try:
            response = self.client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=self.settings.vault_kv_mount, raise_on_deleted_version=True
            )
        except (hvac.exceptions.VaultError, requests.RequestException) as err:
            raise VaultError(f"Vault secret {where}: {_why(err)}") from err
        data = {name: str(value) for name, value in response["data"]["data"].items()}
        if missing := [field for field in fields if not data.get(field)]:
            raise VaultError(f"Vault secret {where}: no {', '.join(missing)} field")
        return data


def with_vault_secrets(
    settings: Settings, vault: Vault | None, *, kafka: bool = False, jobs_database: bool = False
) -> Settings:
    """The settings with the secrets read once at start-up taken from Vault where their paths
    are set: the Kafka credentials for the worker, the jobs database URL for the service. Each
    process reads only what it uses, so its Vault role needs no more."""
    if vault is None:
        return settings
    updates: dict[str, Any] = {}
    if kafka and settings.vault_kafka_path:
        credentials = vault.read(settings.vault_kafka_path, ("username", "password"))
        updates["kafka_sasl_username"] = credentials["username"]
        updates["kafka_sasl_password"] = SecretStr(credentials["password"])
    if jobs_database and settings.vault_jobs_database_path:
        database = vault.read(settings.vault_jobs_database_path, ("url",))
        updates["jobs_database_url"] = SecretStr(database["url"])
    return settings.model_copy(update=updates)


class SecretWatch:
    """One KV v2 secret, read now and then every VAULT_REFRESH in a daemon thread; each good
    read goes to `apply`. A failed read (Vault down, denied, a bad value) keeps what was applied
    last, and is logged once until a read succeeds again."""

    def __init__(self, vault: Vault, path: str, apply: Callable[[Mapping[str, str]], None]) -> None:
        self.vault, self.path, self.apply = vault, path, apply
        self.refresh_s = vault.settings.vault_refresh.total_seconds()
        self.max_stale_s = vault.settings.vault_max_stale.total_seconds()
        self.error: str | None = None  # the last failure, for the log
        self.failure: str | None = None  # its class, for health, which anyone may read
        self.stopping = threading.Event()
        self.read()  # at start-up a failure is raised: the caller stops the process

    def start(self) -> SecretWatch:
        threading.Thread(target=self.run, name=f"vault:{self.path}", daemon=True).start()
        return self

    def read(self) -> None:
        self.vault.keep_token_alive(margin_s=2 * self.refresh_s)
        secret = self.vault.read(self.path)
        self.last_reached = time.monotonic()
        self.apply(secret)

    def run(self) -> None:
        while not self.stopping.wait(self.refresh_s):
            try:
                self.read()
            except (VaultError, ValueError) as err:
                if self.error is None:
                    log.warning("keeping the last secrets read from vault", error=str(err))
                self.error, self.failure = str(err), type(err.__cause__ or err).__name__
                continue
            if self.error is not None:
                log.info("vault read again", path=self.path)
            self.error = self.failure = None

    @property
    def stale(self) -> str | None:
        """Why the secrets can no longer be trusted: Vault has not been reached for too long."""
        age = time.monotonic() - self.last_reached
        if age <= self.max_stale_s:
            return None
        why = self.failure or "no read since"
        return f"secrets at {self.path} last read from vault {age:.0f} s ago ({why})"

    def stop(self) -> None:
        self.stopping.set()
