from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT64: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_INT32: _ClassVar[Dtype]
    DTYPE_INT64: _ClassVar[Dtype]
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT64: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_INT32: Dtype
DTYPE_INT64: Dtype

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "raw", "floats", "doubles", "int64s")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    FLOATS_FIELD_NUMBER: _ClassVar[int]
    DOUBLES_FIELD_NUMBER: _ClassVar[int]
    INT64S_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: Dtype
    raw: bytes
    floats: FloatList
    doubles: DoubleList
    int64s: Int64List
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., raw: _Optional[bytes] = ..., floats: _Optional[_Union[FloatList, _Mapping]] = ..., doubles: _Optional[_Union[DoubleList, _Mapping]] = ..., int64s: _Optional[_Union[Int64List, _Mapping]] = ...) -> None: ...

class FloatList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class DoubleList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Int64List(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class ParamValue(_message.Message):
    __slots__ = ("number", "text", "flag", "numbers")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    NUMBERS_FIELD_NUMBER: _ClassVar[int]
    number: float
    text: str
    flag: bool
    numbers: DoubleList
    def __init__(self, number: _Optional[float] = ..., text: _Optional[str] = ..., flag: bool = ..., numbers: _Optional[_Union[DoubleList, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("loss", "pred", "target", "weights", "box_format", "reduction", "params", "return_grad", "compute_dtype", "typed_output", "request_id")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ParamValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ParamValue, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PRED_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BOX_FORMAT_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RETURN_GRAD_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TYPED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    loss: str
    pred: Tensor
    target: Tensor
    weights: Tensor
    box_format: str
    reduction: str
    params: _containers.MessageMap[str, ParamValue]
    return_grad: bool
    compute_dtype: Dtype
    typed_output: bool
    request_id: str
    def __init__(self, loss: _Optional[str] = ..., pred: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., box_format: _Optional[str] = ..., reduction: _Optional[str] = ..., params: _Optional[_Mapping[str, ParamValue]] = ..., return_grad: bool = ..., compute_dtype: _Optional[_Union[Dtype, str]] = ..., typed_output: bool = ..., request_id: _Optional[str] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("loss", "grad", "request_id")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    loss: Tensor
    grad: Tensor
    request_id: str
    def __init__(self, loss: _Optional[_Union[Tensor, _Mapping]] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class EvaluateStreamRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: EvaluateRequest
    def __init__(self, request: _Optional[_Union[EvaluateRequest, _Mapping]] = ...) -> None: ...

class EvaluateStreamResponse(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: EvaluateResponse
    error: Error
    def __init__(self, response: _Optional[_Union[EvaluateResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "field", "rows", "n_rows")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    N_ROWS_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    field: str
    rows: _containers.RepeatedScalarFieldContainer[int]
    n_rows: int
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., rows: _Optional[_Iterable[int]] = ..., n_rows: _Optional[int] = ...) -> None: ...

class MetricRequest(_message.Message):
    __slots__ = ("metric", "boxes1", "boxes2", "box_format", "pairwise", "params", "compute_dtype", "typed_output")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ParamValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ParamValue, _Mapping]] = ...) -> None: ...
    METRIC_FIELD_NUMBER: _ClassVar[int]
    BOXES1_FIELD_NUMBER: _ClassVar[int]
    BOXES2_FIELD_NUMBER: _ClassVar[int]
    BOX_FORMAT_FIELD_NUMBER: _ClassVar[int]
    PAIRWISE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TYPED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    metric: str
    boxes1: Tensor
    boxes2: Tensor
    box_format: str
    pairwise: bool
    params: _containers.MessageMap[str, ParamValue]
    compute_dtype: Dtype
    typed_output: bool
    def __init__(self, metric: _Optional[str] = ..., boxes1: _Optional[_Union[Tensor, _Mapping]] = ..., boxes2: _Optional[_Union[Tensor, _Mapping]] = ..., box_format: _Optional[str] = ..., pairwise: bool = ..., params: _Optional[_Mapping[str, ParamValue]] = ..., compute_dtype: _Optional[_Union[Dtype, str]] = ..., typed_output: bool = ...) -> None: ...

class MetricResponse(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: Tensor
    def __init__(self, values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ListLossesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLossesResponse(_message.Message):
    __slots__ = ("losses", "metrics")
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    losses: _containers.RepeatedCompositeFieldContainer[CatalogEntry]
    metrics: _containers.RepeatedCompositeFieldContainer[CatalogEntry]
    def __init__(self, losses: _Optional[_Iterable[_Union[CatalogEntry, _Mapping]]] = ..., metrics: _Optional[_Iterable[_Union[CatalogEntry, _Mapping]]] = ...) -> None: ...

class CatalogEntry(_message.Message):
    __slots__ = ("name", "kind", "summary", "doc", "reference", "pred", "target", "params", "weighted_mean")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PRED_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_MEAN_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    summary: str
    doc: str
    reference: str
    pred: str
    target: str
    params: _containers.RepeatedCompositeFieldContainer[ParamInfo]
    weighted_mean: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., summary: _Optional[str] = ..., doc: _Optional[str] = ..., reference: _Optional[str] = ..., pred: _Optional[str] = ..., target: _Optional[str] = ..., params: _Optional[_Iterable[_Union[ParamInfo, _Mapping]]] = ..., weighted_mean: bool = ...) -> None: ...

class ParamInfo(_message.Message):
    __slots__ = ("name", "type", "default_value", "min", "max", "choices", "doc", "min_exclusive", "max_exclusive")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    MIN_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    MAX_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default_value: ParamValue
    min: float
    max: float
    choices: _containers.RepeatedScalarFieldContainer[str]
    doc: str
    min_exclusive: bool
    max_exclusive: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default_value: _Optional[_Union[ParamValue, _Mapping]] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., choices: _Optional[_Iterable[str]] = ..., doc: _Optional[str] = ..., min_exclusive: bool = ..., max_exclusive: bool = ...) -> None: ...
