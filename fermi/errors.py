"""Errors a user can act on, raised where the problem is detected."""


class FermiError(Exception):
    """Base class of the errors Fermi raises on purpose."""


class ModelLoadError(FermiError):
    """A model folder, file or id cannot be loaded; the message names what is wrong."""


class RequestError(FermiError, ValueError):
    """A generation request is invalid (bad parameter, prompt too long, ...).

    ``param`` names the offending field where there is one.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineOverloadedError(FermiError):
    """The request queue is full; try again later."""
