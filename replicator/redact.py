"""Keeping secrets out of what replicator shows: URLs with passwords, tokens, keys.

Invariant: every URL that reaches a log line, an error message, a status document or an
API answer goes through :func:`redact_url` first (or is rendered by a component that never
held a password, such as a store URL, which refuses credentials).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: query parameters whose values are secrets in the URLs we accept
_SECRET_PARAMS = re.compile(r"(pass|password|secret|token|key|credential|sslpassword)",
                            re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with any password in its user info and any secret-looking query parameter
    replaced by ``***``; a string that is not a URL comes back with ``user:pass@``-like
    parts masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/@\s]*@", "//***@", url)
    netloc = parts.netloc
    changed = False
    if "@" in netloc:
        changed = True
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAMS.search(k) for k, _v in pairs):
            changed = True
            query = urlencode([(k, "***" if _SECRET_PARAMS.search(k) else v)
                               for k, v in pairs], safe="*:/")
    if not changed:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*):[^@\s'\"]*@")


def redact_text(text: str) -> str:
    """``text`` (an error line, a log message) with the password of every URL in it
    masked: ``scheme://user:secret@host`` -> ``scheme://user:***@host``."""
    return _URL_PASSWORD.sub(r"\1:***@", text)
