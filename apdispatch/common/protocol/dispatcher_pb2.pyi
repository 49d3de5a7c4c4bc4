from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OK: _ClassVar[Outcome]
    LATE: _ClassVar[Outcome]
    INACCURATE: _ClassVar[Outcome]
    REJECTED: _ClassVar[Outcome]
    FAILED: _ClassVar[Outcome]
OUTCOME_UNSPECIFIED: Outcome
OK: Outcome
LATE: Outcome
INACCURATE: Outcome
REJECTED: Outcome
FAILED: Outcome

class Tensor(_message.Message):
    __slots__ = ("name", "datatype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SLA(_message.Message):
    __slots__ = ("deadline_ms", "min_accuracy")
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    deadline_ms: float
    min_accuracy: float
    def __init__(self, deadline_ms: _Optional[float] = ..., min_accuracy: _Optional[float] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("task", "inputs", "sla", "request_id", "app", "variant")
    TASK_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SLA_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    task: str
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    sla: SLA
    request_id: str
    app: str
    variant: str
    def __init__(self, task: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., sla: _Optional[_Union[SLA, _Mapping]] = ..., request_id: _Optional[str] = ..., app: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("worker", "variant", "cluster", "accuracy")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    worker: str
    variant: str
    cluster: str
    accuracy: float
    def __init__(self, worker: _Optional[str] = ..., variant: _Optional[str] = ..., cluster: _Optional[str] = ..., accuracy: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "network_ms", "compute_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    network_ms: float
    compute_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., network_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "outcome", "outputs", "served_by", "timings", "status_code", "error", "confidence", "escalated")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    outcome: Outcome
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    served_by: Target
    timings: Timings
    status_code: int
    error: str
    confidence: float
    escalated: bool
    def __init__(self, request_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., served_by: _Optional[_Union[Target, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., status_code: _Optional[int] = ..., error: _Optional[str] = ..., confidence: _Optional[float] = ..., escalated: _Optional[bool] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "datatype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class VariantInfo(_message.Message):
    __slots__ = ("name", "task", "accuracy", "latency_ms", "latency_ms_batch8", "inputs", "outputs", "max_batch_size", "acceptance")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_BATCH8_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: str
    accuracy: float
    latency_ms: float
    latency_ms_batch8: float
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    max_batch_size: int
    acceptance: _containers.RepeatedCompositeFieldContainer[Acceptance]
    def __init__(self, name: _Optional[str] = ..., task: _Optional[str] = ..., accuracy: _Optional[float] = ..., latency_ms: _Optional[float] = ..., latency_ms_batch8: _Optional[float] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., max_batch_size: _Optional[int] = ..., acceptance: _Optional[_Iterable[_Union[Acceptance, _Mapping]]] = ...) -> None: ...

class Acceptance(_message.Message):
    __slots__ = ("floor", "threshold", "coverage", "accuracy")
    FLOOR_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    floor: float
    threshold: float
    coverage: float
    accuracy: float
    def __init__(self, floor: _Optional[float] = ..., threshold: _Optional[float] = ..., coverage: _Optional[float] = ..., accuracy: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "address", "cluster", "kind", "slots", "variants", "link_delay_ms", "streaming")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    LINK_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    cluster: str
    kind: str
    slots: int
    variants: _containers.RepeatedCompositeFieldContainer[VariantInfo]
    link_delay_ms: float
    streaming: bool
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., cluster: _Optional[str] = ..., kind: _Optional[str] = ..., slots: _Optional[int] = ..., variants: _Optional[_Iterable[_Union[VariantInfo, _Mapping]]] = ..., link_delay_ms: _Optional[float] = ..., streaming: _Optional[bool] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("lease_s",)
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    lease_s: float
    def __init__(self, lease_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "lease_s")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    known: bool
    lease_s: float
    def __init__(self, known: _Optional[bool] = ..., lease_s: _Optional[float] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker", "in_flight", "lease_left_s")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    LEASE_LEFT_S_FIELD_NUMBER: _ClassVar[int]
    worker: RegisterRequest
    in_flight: int
    lease_left_s: float
    def __init__(self, worker: _Optional[_Union[RegisterRequest, _Mapping]] = ..., in_flight: _Optional[int] = ..., lease_left_s: _Optional[float] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "policy")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    policy: str
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., policy: _Optional[str] = ...) -> None: ...
