"""Masking secrets in free text: log messages, rendered tracebacks, span status and events.

Shared by :mod:`.logging` and :mod:`.tracing` so that a secret masked in a log line is masked the
same way on a span.
"""

from __future__ import annotations

import re

REDACTED = "[REDACTED]"
"""What a secret is replaced with in a log event or a span."""

# Words that make a key secret (``jwt_secret``, ``access_token``, ``X-Api-Key``, ``Authorization``).
SENSITIVE_WORDS = (
    r"password|passwd|passphrase|pwd|secret|token|authorization|api[_-]?key"
    r"|private[_-]?key|credentials?|cookie"
)

# The userinfo of a URL ends at the last '@' of the authority, which ends at the first '/', '?',
# '#' or whitespace: a password may contain '@' and a user name may be an e-mail address.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#\s]*:)[^\s/?#]+@")

# ``password=...``, ``'api_key': '...'``, ``Authorization: Bearer ...`` in free text (an exception
# message, a dict's repr, a query string). The key starts at the secret word and may go on after
# a separator (``token_value``) but not straight on (``tokens_left``, ``passwordless``). A value
# already masked as a URL password (``https://token:***@host``) is left alone.
_SECRET_PAIR = re.compile(
    rf"(?P<head>(?:{SENSITIVE_WORDS})(?:[_.-][\w.-]*)?['\"]?[ \t]*[=:][ \t]*['\"]?"
    r"(?:(?:bearer|basic|digest|token)[ \t]+)?)(?!\*\*\*@)[^\s'\"&,;]+",
    re.IGNORECASE,
)


def scrub_secrets(text: str) -> str:
    """Return ``text`` with URL passwords and secret ``key=value`` pairs masked.

    ``redis://user:p@ss@cache`` becomes ``redis://user:***@cache``; ``password=hunter2``,
    ``'token': 'abc'`` and ``Authorization: Bearer abc`` keep their key and lose their value to
    :data:`REDACTED`. Best effort: a value containing spaces or quotes is masked up to the first.
    """
    return _SECRET_PAIR.sub(rf"\g<head>{REDACTED}", _URL_PASSWORD.sub(r"\g<head>***@", text))
