"""The one exception type that reaches users as a one-line message."""

import re


class UserError(Exception):
    """A problem the user can fix; the message names the cause and the fix."""


_URL_USERINFO = re.compile(r"//[^/\s@]+@")


def redact(text: str) -> str:
    """`text` without the `user:password@` part of any URL in it, for messages and logs."""
    return _URL_USERINFO.sub("//", text)
