"""One exception family for everything mergeserve raises on purpose.

Each class carries the HTTP status and the OpenAI error `type` it maps to, so that
`mergeserve.server.errors` can turn any of them into an OpenAI-shaped response in one
place, and no code ever matches on message strings. Layers below the server (adapters,
router, runtime) raise these too; they import nothing from the server.
"""

from __future__ import annotations


class MergeserveError(Exception):
    """Base class. `message` is shown to the client; keep it specific and actionable."""

    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        """Seconds a client should wait before retrying (sent as `Retry-After`)."""


class ConfigurationError(MergeserveError):
    """The operator's settings or files cannot work (raised at start-up, not per request)."""

    status_code = 500
    error_type = "configuration_error"


class InvalidRequestError(MergeserveError):
    """The request is malformed or asks for something this server does not do."""

    status_code = 400
    error_type = "invalid_request_error"


class PayloadTooLargeError(InvalidRequestError):
    """The request body is over a configured size limit."""

    status_code = 413


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus completion would not fit the model's context window."""

    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class ModelNotFoundError(MergeserveError):
    """`model` names nothing this server serves."""

    status_code = 404
    error_type = "not_found_error"

    def __init__(self, model: str):
        super().__init__(
            f"The model {model!r} does not exist; GET /v1/models lists the served models.",
            param="model",
            code="model_not_found",
        )


class EngineOverloadedError(MergeserveError):
    """Too many requests in flight; the client (or its balancer) should retry."""

    status_code = 503
    error_type = "overloaded_error"


class EngineUnavailableError(MergeserveError):
    """The engine is starting, stopping or has died."""

    status_code = 503
    error_type = "service_unavailable_error"


class AuthenticationError(MergeserveError):
    """No or a wrong bearer token on a route that needs one."""

    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(MergeserveError):
    """Authenticated, but the request asks for something the settings do not allow."""

    status_code = 403
    error_type = "permission_error"


class AdapterError(MergeserveError):
    """An adapter (LoRA dir) is unreadable or does not fit the base model."""

    status_code = 400
    error_type = "invalid_request_error"


class ClientDisconnectedError(MergeserveError):
    """The client closed the connection before its answer was ready (nginx's 499: the
    status is logged, never received)."""

    status_code = 499
    error_type = "client_disconnected"
