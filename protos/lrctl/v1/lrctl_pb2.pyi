from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ParameterView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARAMETER_VIEW_UNSPECIFIED: _ClassVar[ParameterView]
    PARAMETER_VIEW_FULL: _ClassVar[ParameterView]
    PARAMETER_VIEW_NAMES: _ClassVar[ParameterView]

class UpdateMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_MODE_UNSPECIFIED: _ClassVar[UpdateMode]
    UPDATE_MODE_ABSOLUTE: _ClassVar[UpdateMode]
    UPDATE_MODE_SCALE: _ClassVar[UpdateMode]

class TrainingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_STATE_UNSPECIFIED: _ClassVar[TrainingState]
    TRAINING_STATE_WAITING_FOR_FIRST_STEP: _ClassVar[TrainingState]
    TRAINING_STATE_TRAINING: _ClassVar[TrainingState]
    TRAINING_STATE_CLOSING: _ClassVar[TrainingState]
PARAMETER_VIEW_UNSPECIFIED: ParameterView
PARAMETER_VIEW_FULL: ParameterView
PARAMETER_VIEW_NAMES: ParameterView
UPDATE_MODE_UNSPECIFIED: UpdateMode
UPDATE_MODE_ABSOLUTE: UpdateMode
UPDATE_MODE_SCALE: UpdateMode
TRAINING_STATE_UNSPECIFIED: TrainingState
TRAINING_STATE_WAITING_FOR_FIRST_STEP: TrainingState
TRAINING_STATE_TRAINING: TrainingState
TRAINING_STATE_CLOSING: TrainingState

class Parameter(_message.Message):
    __slots__ = ("name", "shape", "numel", "dtype", "device", "requires_grad", "in_optimizer", "settable", "lr", "group", "hyperparameters")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_GRAD_FIELD_NUMBER: _ClassVar[int]
    IN_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SETTABLE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    numel: int
    dtype: str
    device: str
    requires_grad: bool
    in_optimizer: bool
    settable: bool
    lr: float
    group: int
    hyperparameters: _containers.ScalarMap[str, float]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., numel: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., requires_grad: _Optional[bool] = ..., in_optimizer: _Optional[bool] = ..., settable: _Optional[bool] = ..., lr: _Optional[float] = ..., group: _Optional[int] = ..., hyperparameters: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListParametersRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token", "view")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    filter: str
    page_size: int
    page_token: str
    view: ParameterView
    def __init__(self, filter: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., view: _Optional[_Union[ParameterView, str]] = ...) -> None: ...

class ListParametersResponse(_message.Message):
    __slots__ = ("parameters", "next_page_token", "total_size", "names")
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    parameters: _containers.RepeatedCompositeFieldContainer[Parameter]
    next_page_token: str
    total_size: int
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, parameters: _Optional[_Iterable[_Union[Parameter, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class GetLearningRatesRequest(_message.Message):
    __slots__ = ("selectors", "page_size", "page_token")
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    selectors: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    def __init__(self, selectors: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class LearningRate(_message.Message):
    __slots__ = ("name", "lr", "group")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    group: int
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., group: _Optional[int] = ...) -> None: ...

class GetLearningRatesResponse(_message.Message):
    __slots__ = ("rates", "version", "step", "next_page_token", "total_size")
    RATES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    rates: _containers.RepeatedCompositeFieldContainer[LearningRate]
    version: int
    step: int
    next_page_token: str
    total_size: int
    def __init__(self, rates: _Optional[_Iterable[_Union[LearningRate, _Mapping]]] = ..., version: _Optional[int] = ..., step: _Optional[int] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class LearningRateUpdate(_message.Message):
    __slots__ = ("selector", "mode", "value")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    selector: str
    mode: UpdateMode
    value: float
    def __init__(self, selector: _Optional[str] = ..., mode: _Optional[_Union[UpdateMode, str]] = ..., value: _Optional[float] = ...) -> None: ...

class SetLearningRatesRequest(_message.Message):
    __slots__ = ("updates", "dry_run", "at_step", "wait", "reason", "expected_version", "max_reported_changes")
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    AT_STEP_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_REPORTED_CHANGES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[LearningRateUpdate]
    dry_run: bool
    at_step: int
    wait: bool
    reason: str
    expected_version: int
    max_reported_changes: int
    def __init__(self, updates: _Optional[_Iterable[_Union[LearningRateUpdate, _Mapping]]] = ..., dry_run: _Optional[bool] = ..., at_step: _Optional[int] = ..., wait: _Optional[bool] = ..., reason: _Optional[str] = ..., expected_version: _Optional[int] = ..., max_reported_changes: _Optional[int] = ...) -> None: ...

class RateChange(_message.Message):
    __slots__ = ("name", "old_lr", "new_lr")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OLD_LR_FIELD_NUMBER: _ClassVar[int]
    NEW_LR_FIELD_NUMBER: _ClassVar[int]
    name: str
    old_lr: float
    new_lr: float
    def __init__(self, name: _Optional[str] = ..., old_lr: _Optional[float] = ..., new_lr: _Optional[float] = ...) -> None: ...

class SetLearningRatesResponse(_message.Message):
    __slots__ = ("applied", "step", "version", "changes", "change_id", "num_changes")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CHANGES_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    step: int
    version: int
    changes: _containers.RepeatedCompositeFieldContainer[RateChange]
    change_id: int
    num_changes: int
    def __init__(self, applied: _Optional[bool] = ..., step: _Optional[int] = ..., version: _Optional[int] = ..., changes: _Optional[_Iterable[_Union[RateChange, _Mapping]]] = ..., change_id: _Optional[int] = ..., num_changes: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("step", "version", "optimizer", "num_parameters", "num_settable", "num_distinct_lrs", "num_param_groups", "state", "uptime_seconds", "seconds_since_last_step", "pending_changes", "server_version", "run_id")
    STEP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    NUM_SETTABLE_FIELD_NUMBER: _ClassVar[int]
    NUM_DISTINCT_LRS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    PENDING_CHANGES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    step: int
    version: int
    optimizer: str
    num_parameters: int
    num_settable: int
    num_distinct_lrs: int
    num_param_groups: int
    state: TrainingState
    uptime_seconds: float
    seconds_since_last_step: float
    pending_changes: int
    server_version: str
    run_id: str
    def __init__(self, step: _Optional[int] = ..., version: _Optional[int] = ..., optimizer: _Optional[str] = ..., num_parameters: _Optional[int] = ..., num_settable: _Optional[int] = ..., num_distinct_lrs: _Optional[int] = ..., num_param_groups: _Optional[int] = ..., state: _Optional[_Union[TrainingState, str]] = ..., uptime_seconds: _Optional[float] = ..., seconds_since_last_step: _Optional[float] = ..., pending_changes: _Optional[int] = ..., server_version: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class ListChangesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "after_version", "max_changes_per_record")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_CHANGES_PER_RECORD_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    after_version: int
    max_changes_per_record: int
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., after_version: _Optional[int] = ..., max_changes_per_record: _Optional[int] = ...) -> None: ...

class ChangeRecord(_message.Message):
    __slots__ = ("change_id", "version", "step", "applied_at", "requested_at", "updates", "changes", "peer", "user", "reason", "at_step", "num_changes")
    CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_CHANGES_FIELD_NUMBER: _ClassVar[int]
    change_id: int
    version: int
    step: int
    applied_at: float
    requested_at: float
    updates: _containers.RepeatedCompositeFieldContainer[LearningRateUpdate]
    changes: _containers.RepeatedCompositeFieldContainer[RateChange]
    peer: str
    user: str
    reason: str
    at_step: int
    num_changes: int
    def __init__(self, change_id: _Optional[int] = ..., version: _Optional[int] = ..., step: _Optional[int] = ..., applied_at: _Optional[float] = ..., requested_at: _Optional[float] = ..., updates: _Optional[_Iterable[_Union[LearningRateUpdate, _Mapping]]] = ..., changes: _Optional[_Iterable[_Union[RateChange, _Mapping]]] = ..., peer: _Optional[str] = ..., user: _Optional[str] = ..., reason: _Optional[str] = ..., at_step: _Optional[int] = ..., num_changes: _Optional[int] = ...) -> None: ...

class ListChangesResponse(_message.Message):
    __slots__ = ("changes", "next_page_token", "dropped")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[ChangeRecord]
    next_page_token: str
    dropped: int
    def __init__(self, changes: _Optional[_Iterable[_Union[ChangeRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., dropped: _Optional[int] = ...) -> None: ...
