"""lossd-client: call a lossd server over REST or gRPC with numpy arrays. No torch needed."""

from ._client import DEFAULT_MAX_REQUEST_BYTES, MAX_IN_FLIGHT, AsyncLossClient, LossClient, LossResult
from ._errors import (AuthError, ClientClosedError, DeadlineExceededError, InvalidInputError, LossdError,
                      NotFoundError, OverloadedError, ServerError, TooLargeError, UnavailableError)
from ._inputs import SharedInputs

__version__ = "0.1.0"
__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "MAX_IN_FLIGHT", "AsyncLossClient", "AuthError", "ClientClosedError",
           "DeadlineExceededError", "InvalidInputError", "LossClient", "LossResult", "LossdError", "NotFoundError", "OverloadedError",
           "ServerError", "SharedInputs", "TooLargeError", "UnavailableError"]
