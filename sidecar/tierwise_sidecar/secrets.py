"""API keys of external backends, read from Secrets and never from the spec or the request.

In a pod the Secret is mounted as files (`<dir>/<secret>/<key>`); standalone, the same layout on
disk or an environment variable `TIERWISE_SECRET_<SECRET>_<KEY>` (upper case, other characters as
`_`). Values are only ever put into the Authorization header of upstream requests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from tierwise.api.common import SecretKeyRef

DEFAULT_DIR = Path("/var/run/tierwise/secrets")


def env_name(ref: SecretKeyRef) -> str:
    return "TIERWISE_SECRET_" + re.sub(r"[^A-Z0-9]", "_", f"{ref.name}_{ref.key}".upper())


class SecretSource:
    def __init__(self, directory: Path | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.directory = directory or DEFAULT_DIR
        self._environ = os.environ if environ is None else environ

    def get(self, ref: SecretKeyRef) -> str | None:
        path = self.directory / ref.name / ref.key
        try:
            return path.read_text().strip()
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            pass
        value = self._environ.get(env_name(ref))
        return value.strip() if value else None
