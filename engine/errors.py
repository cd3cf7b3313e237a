"""Specific exceptions the engine raises; each message says what to fix."""


class SplitserveError(Exception):
    """Base class of every error splitserve raises on purpose."""


class CheckpointError(SplitserveError):
    """A checkpoint directory is missing a file, has an unsupported
    architecture, or holds a tensor of the wrong name or shape."""


class InvalidRequestError(SplitserveError, ValueError):
    """A request's parameters are invalid. ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class IncompatibleKVError(SplitserveError):
    """A KV hand-off between engines that do not share model, dtype, block
    size, layer count or layout."""


class OutOfBlocksError(SplitserveError):
    """The KV block pool cannot hold what was asked of it."""


class RequestFailedError(SplitserveError):
    """One request raised while the engine processed it (the model forward
    of its tokens, sampling, or its output: text, stop checks, grammar).
    That request alone is ended and its blocks freed; the engine and its
    other requests go on. Not the caller's input to fix: a server fault
    tied to this request."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


class EngineDeadError(SplitserveError, RuntimeError):
    """The engine stopped (shut down, or broken: a device error, or the
    model failing even on a one-token probe). Every queued command and
    open stream of it ends with this error."""


class AdapterError(InvalidRequestError):
    """A LoRA adapter cannot be served on this model: a missing or malformed
    file, a PEFT feature not implemented (``param`` names the config field),
    a tensor that fits no projection, or a rank above ``max_lora_rank``."""


class AdapterUnavailableError(SplitserveError):
    """This engine cannot use an adapter a request names: its files are not
    at the path on this node, they changed since the adapter was registered
    (another digest), or the engine serves no adapters. Another replica may."""


class UnknownAdapterError(SplitserveError, LookupError):
    """A request names an adapter this engine was not given."""
