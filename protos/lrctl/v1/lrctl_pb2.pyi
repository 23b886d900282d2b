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
    UPDATE_MODE_UNPIN: _ClassVar[UpdateMode]

class UpdateTarget(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_TARGET_UNSPECIFIED: _ClassVar[UpdateTarget]
    UPDATE_TARGET_BASE: _ClassVar[UpdateTarget]
    UPDATE_TARGET_PIN: _ClassVar[UpdateTarget]

class WarmupDecay(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WARMUP_DECAY_UNSPECIFIED: _ClassVar[WarmupDecay]
    WARMUP_DECAY_CONSTANT: _ClassVar[WarmupDecay]
    WARMUP_DECAY_LINEAR: _ClassVar[WarmupDecay]
    WARMUP_DECAY_COSINE: _ClassVar[WarmupDecay]

class OneCycleAnneal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ONE_CYCLE_ANNEAL_UNSPECIFIED: _ClassVar[OneCycleAnneal]
    ONE_CYCLE_ANNEAL_COS: _ClassVar[OneCycleAnneal]
    ONE_CYCLE_ANNEAL_LINEAR: _ClassVar[OneCycleAnneal]

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
UPDATE_MODE_UNPIN: UpdateMode
UPDATE_TARGET_UNSPECIFIED: UpdateTarget
UPDATE_TARGET_BASE: UpdateTarget
UPDATE_TARGET_PIN: UpdateTarget
WARMUP_DECAY_UNSPECIFIED: WarmupDecay
WARMUP_DECAY_CONSTANT: WarmupDecay
WARMUP_DECAY_LINEAR: WarmupDecay
WARMUP_DECAY_COSINE: WarmupDecay
ONE_CYCLE_ANNEAL_UNSPECIFIED: OneCycleAnneal
ONE_CYCLE_ANNEAL_COS: OneCycleAnneal
ONE_CYCLE_ANNEAL_LINEAR: OneCycleAnneal
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
    __slots__ = ("name", "lr", "group", "base", "factor", "pinned", "schedule")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    group: int
    base: float
    factor: float
    pinned: bool
    schedule: str
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., group: _Optional[int] = ..., base: _Optional[float] = ..., factor: _Optional[float] = ..., pinned: _Optional[bool] = ..., schedule: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("selector", "mode", "value", "target")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    selector: str
    mode: UpdateMode
    value: float
    target: UpdateTarget
    def __init__(self, selector: _Optional[str] = ..., mode: _Optional[_Union[UpdateMode, str]] = ..., value: _Optional[float] = ..., target: _Optional[_Union[UpdateTarget, str]] = ...) -> None: ...

class Schedule(_message.Message):
    __slots__ = ("start_step", "constant", "warmup", "step", "exponential", "inverse_time", "one_cycle", "piecewise_linear", "adopted")
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EXPONENTIAL_FIELD_NUMBER: _ClassVar[int]
    INVERSE_TIME_FIELD_NUMBER: _ClassVar[int]
    ONE_CYCLE_FIELD_NUMBER: _ClassVar[int]
    PIECEWISE_LINEAR_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_FIELD_NUMBER: _ClassVar[int]
    start_step: int
    constant: ConstantSchedule
    warmup: WarmupSchedule
    step: StepSchedule
    exponential: ExponentialSchedule
    inverse_time: InverseTimeSchedule
    one_cycle: OneCycleSchedule
    piecewise_linear: PiecewiseLinearSchedule
    adopted: AdoptedSchedule
    def __init__(self, start_step: _Optional[int] = ..., constant: _Optional[_Union[ConstantSchedule, _Mapping]] = ..., warmup: _Optional[_Union[WarmupSchedule, _Mapping]] = ..., step: _Optional[_Union[StepSchedule, _Mapping]] = ..., exponential: _Optional[_Union[ExponentialSchedule, _Mapping]] = ..., inverse_time: _Optional[_Union[InverseTimeSchedule, _Mapping]] = ..., one_cycle: _Optional[_Union[OneCycleSchedule, _Mapping]] = ..., piecewise_linear: _Optional[_Union[PiecewiseLinearSchedule, _Mapping]] = ..., adopted: _Optional[_Union[AdoptedSchedule, _Mapping]] = ...) -> None: ...

class ConstantSchedule(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WarmupSchedule(_message.Message):
    __slots__ = ("warmup_steps", "total_steps", "decay", "start_factor", "final_factor", "num_cycles")
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECAY_FIELD_NUMBER: _ClassVar[int]
    START_FACTOR_FIELD_NUMBER: _ClassVar[int]
    FINAL_FACTOR_FIELD_NUMBER: _ClassVar[int]
    NUM_CYCLES_FIELD_NUMBER: _ClassVar[int]
    warmup_steps: int
    total_steps: int
    decay: WarmupDecay
    start_factor: float
    final_factor: float
    num_cycles: float
    def __init__(self, warmup_steps: _Optional[int] = ..., total_steps: _Optional[int] = ..., decay: _Optional[_Union[WarmupDecay, str]] = ..., start_factor: _Optional[float] = ..., final_factor: _Optional[float] = ..., num_cycles: _Optional[float] = ...) -> None: ...

class StepSchedule(_message.Message):
    __slots__ = ("gamma", "step_size", "milestones")
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MILESTONES_FIELD_NUMBER: _ClassVar[int]
    gamma: float
    step_size: int
    milestones: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, gamma: _Optional[float] = ..., step_size: _Optional[int] = ..., milestones: _Optional[_Iterable[int]] = ...) -> None: ...

class ExponentialSchedule(_message.Message):
    __slots__ = ("gamma",)
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    gamma: float
    def __init__(self, gamma: _Optional[float] = ...) -> None: ...

class InverseTimeSchedule(_message.Message):
    __slots__ = ("gamma",)
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    gamma: float
    def __init__(self, gamma: _Optional[float] = ...) -> None: ...

class OneCycleSchedule(_message.Message):
    __slots__ = ("total_steps", "pct_start", "div_factor", "final_div_factor", "anneal", "three_phase")
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PCT_START_FIELD_NUMBER: _ClassVar[int]
    DIV_FACTOR_FIELD_NUMBER: _ClassVar[int]
    FINAL_DIV_FACTOR_FIELD_NUMBER: _ClassVar[int]
    ANNEAL_FIELD_NUMBER: _ClassVar[int]
    THREE_PHASE_FIELD_NUMBER: _ClassVar[int]
    total_steps: int
    pct_start: float
    div_factor: float
    final_div_factor: float
    anneal: OneCycleAnneal
    three_phase: bool
    def __init__(self, total_steps: _Optional[int] = ..., pct_start: _Optional[float] = ..., div_factor: _Optional[float] = ..., final_div_factor: _Optional[float] = ..., anneal: _Optional[_Union[OneCycleAnneal, str]] = ..., three_phase: _Optional[bool] = ...) -> None: ...

class SchedulePoint(_message.Message):
    __slots__ = ("step", "factor")
    STEP_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    step: int
    factor: float
    def __init__(self, step: _Optional[int] = ..., factor: _Optional[float] = ...) -> None: ...

class PiecewiseLinearSchedule(_message.Message):
    __slots__ = ("points",)
    POINTS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[SchedulePoint]
    def __init__(self, points: _Optional[_Iterable[_Union[SchedulePoint, _Mapping]]] = ...) -> None: ...

class AdoptedSchedule(_message.Message):
    __slots__ = ("scheduler", "group")
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    scheduler: str
    group: int
    def __init__(self, scheduler: _Optional[str] = ..., group: _Optional[int] = ...) -> None: ...

class ScheduleAssignment(_message.Message):
    __slots__ = ("selector", "schedule")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    selector: str
    schedule: Schedule
    def __init__(self, selector: _Optional[str] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ...) -> None: ...

class SetLearningRatesRequest(_message.Message):
    __slots__ = ("updates", "dry_run", "at_step", "wait", "reason", "expected_version", "max_reported_changes", "schedules")
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    AT_STEP_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_REPORTED_CHANGES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[LearningRateUpdate]
    dry_run: bool
    at_step: int
    wait: bool
    reason: str
    expected_version: int
    max_reported_changes: int
    schedules: _containers.RepeatedCompositeFieldContainer[ScheduleAssignment]
    def __init__(self, updates: _Optional[_Iterable[_Union[LearningRateUpdate, _Mapping]]] = ..., dry_run: _Optional[bool] = ..., at_step: _Optional[int] = ..., wait: _Optional[bool] = ..., reason: _Optional[str] = ..., expected_version: _Optional[int] = ..., max_reported_changes: _Optional[int] = ..., schedules: _Optional[_Iterable[_Union[ScheduleAssignment, _Mapping]]] = ...) -> None: ...

class SetSchedulesRequest(_message.Message):
    __slots__ = ("schedules", "dry_run", "at_step", "wait", "reason", "expected_version", "max_reported_changes")
    SCHEDULES_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    AT_STEP_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_REPORTED_CHANGES_FIELD_NUMBER: _ClassVar[int]
    schedules: _containers.RepeatedCompositeFieldContainer[ScheduleAssignment]
    dry_run: bool
    at_step: int
    wait: bool
    reason: str
    expected_version: int
    max_reported_changes: int
    def __init__(self, schedules: _Optional[_Iterable[_Union[ScheduleAssignment, _Mapping]]] = ..., dry_run: _Optional[bool] = ..., at_step: _Optional[int] = ..., wait: _Optional[bool] = ..., reason: _Optional[str] = ..., expected_version: _Optional[int] = ..., max_reported_changes: _Optional[int] = ...) -> None: ...

class ClearSchedulesRequest(_message.Message):
    __slots__ = ("selectors", "dry_run", "at_step", "wait", "reason", "expected_version", "max_reported_changes")
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    AT_STEP_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_REPORTED_CHANGES_FIELD_NUMBER: _ClassVar[int]
    selectors: _containers.RepeatedScalarFieldContainer[str]
    dry_run: bool
    at_step: int
    wait: bool
    reason: str
    expected_version: int
    max_reported_changes: int
    def __init__(self, selectors: _Optional[_Iterable[str]] = ..., dry_run: _Optional[bool] = ..., at_step: _Optional[int] = ..., wait: _Optional[bool] = ..., reason: _Optional[str] = ..., expected_version: _Optional[int] = ..., max_reported_changes: _Optional[int] = ...) -> None: ...

class GetSchedulesRequest(_message.Message):
    __slots__ = ("selectors", "page_size", "page_token")
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    selectors: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    def __init__(self, selectors: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class NameSchedule(_message.Message):
    __slots__ = ("name", "base", "pin", "schedule", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    base: float
    pin: float
    schedule: Schedule
    description: str
    def __init__(self, name: _Optional[str] = ..., base: _Optional[float] = ..., pin: _Optional[float] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ..., description: _Optional[str] = ...) -> None: ...

class GetSchedulesResponse(_message.Message):
    __slots__ = ("schedules", "version", "step", "next_page_token", "total_size")
    SCHEDULES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    schedules: _containers.RepeatedCompositeFieldContainer[NameSchedule]
    version: int
    step: int
    next_page_token: str
    total_size: int
    def __init__(self, schedules: _Optional[_Iterable[_Union[NameSchedule, _Mapping]]] = ..., version: _Optional[int] = ..., step: _Optional[int] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class RateChange(_message.Message):
    __slots__ = ("name", "old_lr", "new_lr", "old_base", "new_base", "old_pin", "new_pin", "old_schedule", "new_schedule")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OLD_LR_FIELD_NUMBER: _ClassVar[int]
    NEW_LR_FIELD_NUMBER: _ClassVar[int]
    OLD_BASE_FIELD_NUMBER: _ClassVar[int]
    NEW_BASE_FIELD_NUMBER: _ClassVar[int]
    OLD_PIN_FIELD_NUMBER: _ClassVar[int]
    NEW_PIN_FIELD_NUMBER: _ClassVar[int]
    OLD_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    NEW_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    name: str
    old_lr: float
    new_lr: float
    old_base: float
    new_base: float
    old_pin: float
    new_pin: float
    old_schedule: str
    new_schedule: str
    def __init__(self, name: _Optional[str] = ..., old_lr: _Optional[float] = ..., new_lr: _Optional[float] = ..., old_base: _Optional[float] = ..., new_base: _Optional[float] = ..., old_pin: _Optional[float] = ..., new_pin: _Optional[float] = ..., old_schedule: _Optional[str] = ..., new_schedule: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("step", "version", "optimizer", "num_parameters", "num_settable", "num_distinct_lrs", "num_param_groups", "state", "uptime_seconds", "seconds_since_last_step", "pending_changes", "server_version", "run_id", "guardrails", "max_factor", "oldest_event_step", "watchers", "lockstep", "lockstep_timeouts")
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
    GUARDRAILS_FIELD_NUMBER: _ClassVar[int]
    MAX_FACTOR_FIELD_NUMBER: _ClassVar[int]
    OLDEST_EVENT_STEP_FIELD_NUMBER: _ClassVar[int]
    WATCHERS_FIELD_NUMBER: _ClassVar[int]
    LOCKSTEP_FIELD_NUMBER: _ClassVar[int]
    LOCKSTEP_TIMEOUTS_FIELD_NUMBER: _ClassVar[int]
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
    guardrails: _containers.RepeatedCompositeFieldContainer[Guardrail]
    max_factor: float
    oldest_event_step: int
    watchers: int
    lockstep: LockstepStatus
    lockstep_timeouts: int
    def __init__(self, step: _Optional[int] = ..., version: _Optional[int] = ..., optimizer: _Optional[str] = ..., num_parameters: _Optional[int] = ..., num_settable: _Optional[int] = ..., num_distinct_lrs: _Optional[int] = ..., num_param_groups: _Optional[int] = ..., state: _Optional[_Union[TrainingState, str]] = ..., uptime_seconds: _Optional[float] = ..., seconds_since_last_step: _Optional[float] = ..., pending_changes: _Optional[int] = ..., server_version: _Optional[str] = ..., run_id: _Optional[str] = ..., guardrails: _Optional[_Iterable[_Union[Guardrail, _Mapping]]] = ..., max_factor: _Optional[float] = ..., oldest_event_step: _Optional[int] = ..., watchers: _Optional[int] = ..., lockstep: _Optional[_Union[LockstepStatus, _Mapping]] = ..., lockstep_timeouts: _Optional[int] = ...) -> None: ...

class LockstepOpen(_message.Message):
    __slots__ = ("every", "timeout_seconds")
    EVERY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    every: int
    timeout_seconds: float
    def __init__(self, every: _Optional[int] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class LockstepDecision(_message.Message):
    __slots__ = ("open", "decided")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DECIDED_FIELD_NUMBER: _ClassVar[int]
    open: LockstepOpen
    decided: int
    def __init__(self, open: _Optional[_Union[LockstepOpen, _Mapping]] = ..., decided: _Optional[int] = ...) -> None: ...

class LockstepOutcome(_message.Message):
    __slots__ = ("step", "timed_out", "decided_late", "applied_change_ids", "failed_change_ids")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_LATE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_CHANGE_IDS_FIELD_NUMBER: _ClassVar[int]
    FAILED_CHANGE_IDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    timed_out: bool
    decided_late: bool
    applied_change_ids: _containers.RepeatedScalarFieldContainer[int]
    failed_change_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step: _Optional[int] = ..., timed_out: _Optional[bool] = ..., decided_late: _Optional[bool] = ..., applied_change_ids: _Optional[_Iterable[int]] = ..., failed_change_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class LockstepTurn(_message.Message):
    __slots__ = ("step", "version", "wall_time", "timeout_seconds", "previous", "ignored_decisions", "dropped_turns")
    STEP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    IGNORED_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TURNS_FIELD_NUMBER: _ClassVar[int]
    step: int
    version: int
    wall_time: float
    timeout_seconds: float
    previous: LockstepOutcome
    ignored_decisions: int
    dropped_turns: int
    def __init__(self, step: _Optional[int] = ..., version: _Optional[int] = ..., wall_time: _Optional[float] = ..., timeout_seconds: _Optional[float] = ..., previous: _Optional[_Union[LockstepOutcome, _Mapping]] = ..., ignored_decisions: _Optional[int] = ..., dropped_turns: _Optional[int] = ...) -> None: ...

class LockstepStatus(_message.Message):
    __slots__ = ("peer", "token_name", "every", "timeout_seconds", "held_step", "turns", "timeouts", "ignored_decisions")
    PEER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_NAME_FIELD_NUMBER: _ClassVar[int]
    EVERY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HELD_STEP_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUTS_FIELD_NUMBER: _ClassVar[int]
    IGNORED_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    peer: str
    token_name: str
    every: int
    timeout_seconds: float
    held_step: int
    turns: int
    timeouts: int
    ignored_decisions: int
    def __init__(self, peer: _Optional[str] = ..., token_name: _Optional[str] = ..., every: _Optional[int] = ..., timeout_seconds: _Optional[float] = ..., held_step: _Optional[int] = ..., turns: _Optional[int] = ..., timeouts: _Optional[int] = ..., ignored_decisions: _Optional[int] = ...) -> None: ...

class Guardrail(_message.Message):
    __slots__ = ("selector", "min_lr", "max_lr")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_FIELD_NUMBER: _ClassVar[int]
    MAX_LR_FIELD_NUMBER: _ClassVar[int]
    selector: str
    min_lr: float
    max_lr: float
    def __init__(self, selector: _Optional[str] = ..., min_lr: _Optional[float] = ..., max_lr: _Optional[float] = ...) -> None: ...

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
    __slots__ = ("change_id", "version", "step", "applied_at", "requested_at", "updates", "changes", "peer", "user", "reason", "at_step", "num_changes", "schedules", "role", "token_name", "status", "error")
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
    SCHEDULES_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
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
    schedules: _containers.RepeatedCompositeFieldContainer[ScheduleAssignment]
    role: str
    token_name: str
    status: str
    error: str
    def __init__(self, change_id: _Optional[int] = ..., version: _Optional[int] = ..., step: _Optional[int] = ..., applied_at: _Optional[float] = ..., requested_at: _Optional[float] = ..., updates: _Optional[_Iterable[_Union[LearningRateUpdate, _Mapping]]] = ..., changes: _Optional[_Iterable[_Union[RateChange, _Mapping]]] = ..., peer: _Optional[str] = ..., user: _Optional[str] = ..., reason: _Optional[str] = ..., at_step: _Optional[int] = ..., num_changes: _Optional[int] = ..., schedules: _Optional[_Iterable[_Union[ScheduleAssignment, _Mapping]]] = ..., role: _Optional[str] = ..., token_name: _Optional[str] = ..., status: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ListChangesResponse(_message.Message):
    __slots__ = ("changes", "next_page_token", "dropped", "oldest_version", "gap")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    OLDEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[ChangeRecord]
    next_page_token: str
    dropped: int
    oldest_version: int
    gap: bool
    def __init__(self, changes: _Optional[_Iterable[_Union[ChangeRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., dropped: _Optional[int] = ..., oldest_version: _Optional[int] = ..., gap: _Optional[bool] = ...) -> None: ...

class ListPendingRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPendingResponse(_message.Message):
    __slots__ = ("changes", "next_page_token", "total_size")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[PendingChangeInfo]
    next_page_token: str
    total_size: int
    def __init__(self, changes: _Optional[_Iterable[_Union[PendingChangeInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class PendingChangeInfo(_message.Message):
    __slots__ = ("change_id", "at_step", "requested_at", "updates", "schedules", "peer", "user", "role", "token_name", "reason", "waiting", "num_names", "expected_version")
    CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    AT_STEP_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULES_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_NAMES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    change_id: int
    at_step: int
    requested_at: float
    updates: _containers.RepeatedCompositeFieldContainer[LearningRateUpdate]
    schedules: _containers.RepeatedCompositeFieldContainer[ScheduleAssignment]
    peer: str
    user: str
    role: str
    token_name: str
    reason: str
    waiting: bool
    num_names: int
    expected_version: int
    def __init__(self, change_id: _Optional[int] = ..., at_step: _Optional[int] = ..., requested_at: _Optional[float] = ..., updates: _Optional[_Iterable[_Union[LearningRateUpdate, _Mapping]]] = ..., schedules: _Optional[_Iterable[_Union[ScheduleAssignment, _Mapping]]] = ..., peer: _Optional[str] = ..., user: _Optional[str] = ..., role: _Optional[str] = ..., token_name: _Optional[str] = ..., reason: _Optional[str] = ..., waiting: _Optional[bool] = ..., num_names: _Optional[int] = ..., expected_version: _Optional[int] = ...) -> None: ...

class CancelChangesRequest(_message.Message):
    __slots__ = ("change_ids", "reason")
    CHANGE_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    change_ids: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, change_ids: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelChangesResponse(_message.Message):
    __slots__ = ("cancelled", "not_found")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    cancelled: _containers.RepeatedScalarFieldContainer[int]
    not_found: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, cancelled: _Optional[_Iterable[int]] = ..., not_found: _Optional[_Iterable[int]] = ...) -> None: ...

class WatchMetricsRequest(_message.Message):
    __slots__ = ("from_step", "include_stats", "changes_only", "max_changes_per_record")
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STATS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_ONLY_FIELD_NUMBER: _ClassVar[int]
    MAX_CHANGES_PER_RECORD_FIELD_NUMBER: _ClassVar[int]
    from_step: int
    include_stats: bool
    changes_only: bool
    max_changes_per_record: int
    def __init__(self, from_step: _Optional[int] = ..., include_stats: _Optional[bool] = ..., changes_only: _Optional[bool] = ..., max_changes_per_record: _Optional[int] = ...) -> None: ...

class MetricsEvent(_message.Message):
    __slots__ = ("step", "time", "version", "metrics", "stats", "changes", "dropped")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    step: int
    time: float
    version: int
    metrics: _containers.ScalarMap[str, float]
    stats: _containers.RepeatedCompositeFieldContainer[ParameterStats]
    changes: _containers.RepeatedCompositeFieldContainer[ChangeRecord]
    dropped: int
    def __init__(self, step: _Optional[int] = ..., time: _Optional[float] = ..., version: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., stats: _Optional[_Iterable[_Union[ParameterStats, _Mapping]]] = ..., changes: _Optional[_Iterable[_Union[ChangeRecord, _Mapping]]] = ..., dropped: _Optional[int] = ...) -> None: ...

class MetricsEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[MetricsEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[MetricsEvent, _Mapping]]] = ...) -> None: ...

class ParameterStats(_message.Message):
    __slots__ = ("name", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.ScalarMap[str, float]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...
