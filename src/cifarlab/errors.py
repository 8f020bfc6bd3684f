"""User-facing errors: the CLI prints them as one line (``cifarlab: error: ...``) and exits with status 2."""


class CifarlabError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do, on one line."""


class DataError(CifarlabError):
    """A problem with the data: missing or malformed folders, unreadable images, failed downloads."""


class ConfigError(CifarlabError, ValueError):
    """Options that do not work together."""
