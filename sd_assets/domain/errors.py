"""The exceptions users see for mistakes they can fix: ``SdAssetsError`` and one subclass per kind
(bad grid or subject list, missing or damaged model, store problems), and how their messages show
a file name and a home folder that is not there."""

from pathlib import Path


class SdAssetsError(Exception):
    """A problem the user can act on; the message says what is wrong and what to do."""


class GridError(SdAssetsError):
    """The grid file or a subject list is invalid."""


class ModelError(SdAssetsError):
    """The model cannot be resolved, downloaded, verified or loaded."""


class StoreError(SdAssetsError):
    """The artifact store cannot be read or written."""


class StoreUnavailable(StoreError):
    """The store's service did not answer, or answered that it is failing (an outage, not a setting):
    the same request may work a while later. ``answered``: it had answered this process before;
    ``problem``: the message without its advice, for a caller that tries again itself; ``store``:
    the store's URL; ``endpoint``: the service's (an S3 endpoint), which the URL does not name."""

    def __init__(self, message: str, answered: bool = False, problem: str = "", store: str = "", endpoint: str = ""):
        super().__init__(message)
        self.answered = answered
        self.problem = problem or message
        self.store = store
        self.endpoint = endpoint


def shown_name(name: str) -> str:
    """A file name as a message can show it: bytes of it that are not UTF-8 (a name from an archive
    made on an older system, which the OS hands over as stand-ins no message can encode) as \\xNN."""
    return name.encode(errors="surrogateescape").decode(errors="backslashreplace")


def unknown_home(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as the shell reads it, or None: a leading '~user' names a user
    this machine does not know (pathlib's bare "Could not determine home directory." otherwise)."""
    try:
        Path(path).expanduser()
    except RuntimeError:
        return f"no home folder for {Path(path).parts[0]!r} on this machine"
    return None
