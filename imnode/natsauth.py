"""nats-py connect() options for credentials and TLS, shared by imnode and the dispatcher.

Secrets come from files or the environment, never from the command line (where `ps` shows
them), and are never logged.
"""

from __future__ import annotations

import ssl
from typing import Any


def connect_options(*, user: str | None = None, password: str | None = None,
                    token: str | None = None, creds: str | None = None,
                    nkey_seed: str | None = None, tls_ca: str | None = None,
                    tls_cert: str | None = None, tls_key: str | None = None) -> dict[str, Any]:
    """The options for the credentials given: user and password, a token, a .creds file
    (JWT + nkey), an nkey seed file; and TLS trusting `tls_ca` (with a client certificate
    when `tls_cert` is given)."""
    options: dict[str, Any] = {}
    if user is not None:
        options["user"], options["password"] = user, password
    if token is not None:
        options["token"] = token
    if creds is not None:
        options["user_credentials"] = creds
    if nkey_seed is not None:
        options["nkeys_seed"] = nkey_seed
    if tls_ca or tls_cert:
        context = ssl.create_default_context(cafile=tls_ca)
        if tls_cert:
            context.load_cert_chain(tls_cert, tls_key)
        options["tls"] = context
    return options
