"""Stage 1: precompute the base model's targets for K views of every image, with Ray.

Modules, one job each: :mod:`.config` (Stage1Config, RayConfig, SourceConfig, errors, the
summary), :mod:`.shard` (the shard task :func:`process_shard` and :class:`BaseModelActor`),
:mod:`.cluster` (joining or starting Ray, the plan of actors, running the tasks) and
:mod:`.driver` (:func:`run_stage1`: the cache, resuming, reports). See :mod:`.driver` for the
flow of a run.
"""
from .cluster import (  # noqa: F401
    ActorPlan,
    _check_reachable,
    _connect_ray,
    failure_message,
    plan_actors,
    task_failure,
)
from .config import (  # noqa: F401
    CONFIG_NAME,
    REPORT_NAME,
    NonFiniteTargetsError,
    RayConfig,
    SourceConfig,
    Stage1Config,
    Stage1Error,
    Stage1StrictError,
    Stage1Summary,
    resolve_encode_on,
    resolve_precision,
)
from .driver import (  # noqa: F401
    _check_base_model,
    _prepare_cache,
    _record_config,
    check_storage,
    run_stage1,
)
from .shard import (  # noqa: F401
    BaseModelActor,
    PartResult,
    ShardHooks,
    ShardJob,
    part_names,
    process_shard,
    stored_view_pixels,
)

__all__ = [
    "REPORT_NAME",
    "ActorPlan",
    "BaseModelActor",
    "PartResult",
    "RayConfig",
    "ShardHooks",
    "ShardJob",
    "SourceConfig",
    "Stage1Config",
    "Stage1Error",
    "Stage1StrictError",
    "Stage1Summary",
    "part_names",
    "plan_actors",
    "process_shard",
    "run_stage1",
    "stored_view_pixels",
]
