"""lossd.v1 messages -> engine inputs: the client's codec (one implementation), with its errors as EngineErrors."""

from __future__ import annotations

import numpy as np

from lossd_client.wire import WithTensors, from_param, to_param, to_tensor
from lossd_client.wire import pb

from ..engine import EngineError


def to_numpy(message: WithTensors, field: str, required: bool = True) -> np.ndarray | None:
    """The array in ``message``'s field (raw tensors are views of the received bytes)."""
    try:
        return message.array(field, required)
    except ValueError as exc:
        raise EngineError("invalid_shape", str(exc), field=field) from None


def from_numpy(arr: np.ndarray, typed: bool = False) -> pb.Tensor:
    return to_tensor(arr, typed)


def params_to_dict(params) -> dict:
    out = {}
    for name, v in params.items():
        value = from_param(v)
        if value is None:
            raise EngineError("invalid_param", f"params.{name} has no value", field=f"params.{name}")
        out[name] = value
    return out


value_to_param = to_param
