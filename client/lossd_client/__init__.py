"""lossd-client: call a lossd server over REST or gRPC with numpy arrays. No torch needed."""

from ._client import AsyncLossClient, LossClient, LossResult
from ._errors import (DeadlineExceededError, InvalidInputError, LossdError, NotFoundError, OverloadedError,
                      ServerError, TooLargeError, UnavailableError)

__version__ = "0.1.0"
__all__ = ["AsyncLossClient", "DeadlineExceededError", "InvalidInputError", "LossClient", "LossResult", "LossdError",
           "NotFoundError", "OverloadedError", "ServerError", "TooLargeError", "UnavailableError"]
