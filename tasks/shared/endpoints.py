"""An OpenAI-compatible endpoint as the backend takes it, from the config's endpoint section: the API key is
resolved here, in the stage (and the judge CLI), from a Prefect Secret block or an environment variable, so that
the backend (alma_r.models.generate.openai_backend) receives a plain string and knows nothing of Prefect.

The key is never logged: it travels only inside EndpointConfig, whose repr leaves it out.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from alma_r.config import EndpointSection
from alma_r.models.generate.openai_backend import EndpointConfig

# Section fields that say where the key is, not how to talk to the server.
KEY_SOURCE_FIELDS = ("api_key_env", "api_key_secret")


def prefect_secret(name: str) -> str:
    """The value of the Prefect Secret block `name` (needs a reachable Prefect server or Cloud workspace)."""
    from prefect.blocks.system import Secret

    return Secret.load(name).get()


def resolve_api_key(
    section: EndpointSection, secret_resolver: Callable[[str], str] = prefect_secret
) -> str | None:
    """The endpoint's key: the secret `api_key_secret` when set (it wins), else the environment variable
    `api_key_env` (None when unset or unnamed: a local server needs no key)."""
    if section.api_key_secret:
        return secret_resolver(section.api_key_secret)
    return os.environ.get(section.api_key_env) if section.api_key_env else None


def endpoint_config(
    section: EndpointSection, secret_resolver: Callable[[str], str] = prefect_secret
) -> EndpointConfig:
    """The backend's EndpointConfig for a config section, its API key resolved."""
    fields = section.model_dump(exclude=set(KEY_SOURCE_FIELDS))
    return EndpointConfig(**fields, api_key=resolve_api_key(section, secret_resolver))
