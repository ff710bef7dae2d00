"""The exceptions users see for mistakes they can fix: ``SdAssetsError`` and one subclass per kind
(bad grid or subject list, missing or damaged model, store problems)."""


class SdAssetsError(Exception):
    """A problem the user can act on; the message says what is wrong and what to do."""


class GridError(SdAssetsError):
    """The grid file or a subject list is invalid."""


class ModelError(SdAssetsError):
    """The model cannot be resolved, downloaded, verified or loaded."""


class StoreError(SdAssetsError):
    """The artifact store cannot be read or written."""
