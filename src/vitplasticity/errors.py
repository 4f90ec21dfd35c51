"""The one exception type that reaches users as a one-line message."""


class UserError(Exception):
    """A problem the user can fix; the message names the cause and the fix."""
