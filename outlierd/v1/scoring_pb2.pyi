from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Label(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_UNSPECIFIED: _ClassVar[Label]
    ANOMALY: _ClassVar[Label]
    NORMAL: _ClassVar[Label]
LABEL_UNSPECIFIED: Label
ANOMALY: Label
NORMAL: Label

class ScoreRequest(_message.Message):
    __slots__ = ("model", "n_features", "values", "ids", "request_id", "explain", "raw_values", "top_k", "explain_flagged_only", "arrow_events", "return_features")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    N_FEATURES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    RAW_VALUES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FLAGGED_ONLY_FIELD_NUMBER: _ClassVar[int]
    ARROW_EVENTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    model: str
    n_features: int
    values: _containers.RepeatedScalarFieldContainer[float]
    ids: _containers.RepeatedScalarFieldContainer[str]
    request_id: int
    explain: bool
    raw_values: bytes
    top_k: int
    explain_flagged_only: bool
    arrow_events: bytes
    return_features: bool
    def __init__(self, model: _Optional[str] = ..., n_features: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ..., ids: _Optional[_Iterable[str]] = ..., request_id: _Optional[int] = ..., explain: _Optional[bool] = ..., raw_values: _Optional[bytes] = ..., top_k: _Optional[int] = ..., explain_flagged_only: _Optional[bool] = ..., arrow_events: _Optional[bytes] = ..., return_features: _Optional[bool] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("record", "features", "contributions", "feature_names")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    record: int
    features: _containers.RepeatedScalarFieldContainer[int]
    contributions: _containers.RepeatedScalarFieldContainer[float]
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, record: _Optional[int] = ..., features: _Optional[_Iterable[int]] = ..., contributions: _Optional[_Iterable[float]] = ..., feature_names: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "model", "version", "scores", "anomalous", "ids", "device", "error", "explanations", "alias", "features")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ANOMALOUS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    model: str
    version: str
    scores: _containers.RepeatedScalarFieldContainer[float]
    anomalous: _containers.RepeatedScalarFieldContainer[bool]
    ids: _containers.RepeatedScalarFieldContainer[str]
    device: str
    error: str
    explanations: _containers.RepeatedCompositeFieldContainer[Explanation]
    alias: str
    features: bytes
    def __init__(self, request_id: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., scores: _Optional[_Iterable[float]] = ..., anomalous: _Optional[_Iterable[bool]] = ..., ids: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., error: _Optional[str] = ..., explanations: _Optional[_Iterable[_Union[Explanation, _Mapping]]] = ..., alias: _Optional[str] = ..., features: _Optional[bytes] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "version", "feature_names", "threshold", "alias", "served_models")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    threshold: float
    alias: str
    served_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., feature_names: _Optional[_Iterable[str]] = ..., threshold: _Optional[float] = ..., alias: _Optional[str] = ..., served_models: _Optional[_Iterable[str]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("model", "record_id", "label", "reviewer", "note")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    model: str
    record_id: str
    label: Label
    reviewer: str
    note: str
    def __init__(self, model: _Optional[str] = ..., record_id: _Optional[str] = ..., label: _Optional[_Union[Label, str]] = ..., reviewer: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class FeedbackAck(_message.Message):
    __slots__ = ("record_id", "stored", "error", "known_record")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    KNOWN_RECORD_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    stored: bool
    error: str
    known_record: bool
    def __init__(self, record_id: _Optional[str] = ..., stored: _Optional[bool] = ..., error: _Optional[str] = ..., known_record: _Optional[bool] = ...) -> None: ...
