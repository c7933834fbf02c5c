"""Stage 1's Ray plumbing: joining or starting Ray (cluster token handling), the plan of actors
and concurrent shard tasks, running the tasks and telling transient failures from deterministic
ones."""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from stages.configs import BaseModelConfig, to_dict
from storage.util import first_line

from .config import (
    NonFiniteTargetsError,
    Stage1Config,
    Stage1Error,
    _absolute,
    resolve_encode_on,
    resolve_precision,
)
from .shard import BaseModelActor, PartResult, ShardJob, process_shard

logger = logging.getLogger("stages.stage1")


def _connect_ray(cfg: Stage1Config, ray_address: str | None) -> tuple[bool, str]:
    """Join the configured cluster or start a local Ray. Returns (started_here, address)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    if ray.is_initialized():  # a caller (notebook, test) already connected: use that
        if ray_address or cfg.ray.address:
            logger.info("Ray is already connected in this process; using it, not %s",
                        ray_address or cfg.ray.address)
        return False, ray.get_runtime_context().gcs_address
    address = ray_address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        _check_reachable(address)
        token_given = _use_given_auth_token()
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = first_line(exc)
            hint = ("check that $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH hold the head's token"
                    if token_given else
                    "if the cluster uses token authentication, give the driver the head's token: "
                    "RAY_AUTH_TOKEN_PATH=FILE (a copy of the head's ~/.ray/auth_token)")
            raise Stage1Error(
                f"cannot join the Ray cluster at {address} ({first}); check --ray-address / "
                f"$RAY_ADDRESS (host:port of the head node, or 'local' to start one here); "
                f"{hint}"
            ) from None
        return True, address
    kwargs: dict[str, Any] = dict(address="local", include_dashboard=False,
                                  log_to_driver=False, configure_logging=False,
                                  _node_ip_address="127.0.0.1")
    if cfg.ray.num_cpus is not None:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.num_gpus is not None:
        kwargs["num_gpus"] = cfg.ray.num_gpus
    ray.init(**kwargs)
    return True, ray.get_runtime_context().gcs_address


def _use_given_auth_token() -> bool:
    """A cluster token given in the environment turns on token authentication for this driver.

    Ray sends a token only in ``RAY_AUTH_MODE=token``; a driver that was handed the head's token
    (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``) but not the mode would otherwise connect
    without it and be refused. An explicit ``RAY_AUTH_MODE`` is left as it is.
    """
    given = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if given and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        # Ray reads its config once at import: re-read it, as ray's own token setup does
        from ray._raylet import Config

        Config.initialize("")
        logger.info("Ray cluster token given in the environment: token authentication on")
    return given


def _check_reachable(address: str) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    match = re.fullmatch(r"\[?([^\[\]/]+?)\]?:(\d+)", address.strip())
    if match is None:  # 'auto', 'ray://...': leave it to Ray
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise Stage1Error(
            f"cannot reach the Ray head at {address} ({exc.strerror or exc}); check --ray-address "
            "/ $RAY_ADDRESS (host:port of the head node's GCS, default port 6379)"
        ) from None


@dataclass
class ActorPlan:
    """How stage 1 spreads over the cluster's resources."""

    num_actors: int
    actor_options: dict  # Ray resources of one base-model actor
    threads: int  # torch threads of one actor
    concurrent: int  # shard tasks running at once


def plan_actors(cfg: Stage1Config, resources: dict) -> ActorPlan:
    """How stage 1 spreads over ``resources`` (Ray's {'CPU': n, 'GPU': m}): actors one GPU
    each, else CPU threads; shard tasks get the CPUs the actors leave. ``cfg.ray`` settings
    (num_actors, threads_per_actor, concurrent_shards) override the defaults."""
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        num = cfg.ray.num_actors or gpus
        threads = cfg.ray.threads_per_actor or 2
        actor_cpus = 1 if cpus > num else 0
        options = {"num_gpus": 1, "num_cpus": actor_cpus}
    else:
        num = cfg.ray.num_actors or max(1, cpus // 16)
        decode_cpus = max(1, cpus // 4)
        threads = cfg.ray.threads_per_actor or max(1, (cpus - decode_cpus) // num)
        # Reserve the actors' CPUs but always leave one for the shard tasks (else nothing runs).
        actor_cpus = max(0, min(threads, (cpus - 1) // num))
        options = {"num_cpus": actor_cpus}
    # A task blocked on an actor releases its CPU to Ray, which would then start yet another
    # task (and worker process); bounding the tasks in flight keeps workers = CPUs.
    concurrent = cfg.ray.concurrent_shards or max(1, cpus - num * actor_cpus)
    return ActorPlan(num, options, threads, concurrent)


def _start_actors(cfg: Stage1Config, base: BaseModelConfig, plan: ActorPlan) -> tuple[list, list]:
    """Create the base-model actors; returns (actors, refs that resolve once each is loaded)."""
    import ray

    actor_cls = ray.remote(BaseModelActor).options(
        max_restarts=cfg.ray.max_retries, max_task_retries=cfg.ray.max_retries,
        **plan.actor_options,
    )
    base_dict = to_dict(base)
    if base_dict.get("checkpoint"):
        base_dict["checkpoint"] = _absolute(base_dict["checkpoint"])
    actors = [
        actor_cls.remote(base_dict, cfg.last_n, cfg.k_max, threads=plan.threads,
                         float16=cfg.codec == "float16", precision=resolve_precision(cfg))
        for _ in range(plan.num_actors)
    ]
    return actors, [a.info.remote() for a in actors]


def _wait_actors(ready: list, plan: ActorPlan, timeout: float = 600.0) -> None:
    """Block until every actor has loaded the base model; one-line error if one cannot."""
    import ray

    done, waiting = ray.wait(ready, num_returns=len(ready), timeout=timeout)
    if waiting:
        raise Stage1Error(
            f"{len(waiting)} of {plan.num_actors} base-model actors did not start within "
            f"{timeout:.0f} s (each wants {plan.actor_options}); lower targets.ray.num_actors or "
            "add resources to the Ray cluster"
        )
    for ref in done:
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as exc:
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            raise Stage1Error(f"a base-model actor failed to load the base model "
                              f"({lines[-1] if lines else type(exc).__name__})") from None
        logger.info("base-model actor on %s (%s, pid %s, %s threads)", info["host"],
                    info["device"], info["pid"], info["threads"])


def _run_tasks(cfg: Stage1Config, jobs: list[ShardJob], actors: list, ready: list, plan: ActorPlan,
               progress: bool) -> tuple[list[PartResult], list[tuple]]:
    """Run the shard tasks, at most plan.concurrent at a time, with a progress bar.

    Returns (results, [(part, error)] of the tasks that failed after their retries).
    """
    import ray
    from tqdm import tqdm

    task = ray.remote(process_shard).options(
        num_cpus=1, max_retries=cfg.ray.max_retries,
        retry_exceptions=[OSError, ray.exceptions.RayActorError],
    )
    queue = collections.deque(jobs)
    running: dict = {}  # ref -> job
    results: list[PartResult] = []
    failed: list[tuple] = []  # (part, reason, deterministic)

    def submit() -> None:
        while queue and len(running) < plan.concurrent:
            job = queue.popleft()
            running[task.remote(job, actors)] = job

    bar = None
    try:
        submit()  # the first tasks decode while the actors load the model
        _wait_actors(ready, plan)
        bar = tqdm(total=sum(j.slots for j in jobs), unit="img", desc="stage 1",
                   file=sys.stderr, disable=not progress, dynamic_ncols=True, smoothing=0.1,
                   postfix=f"parts 0/{len(jobs)}")
        start = time.perf_counter()
        images = 0
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            job = running.pop(done[0])
            bar.update(job.slots)
            try:
                res: PartResult = ray.get(done[0])
            except ray.exceptions.RayError as exc:
                reason, fixed = task_failure(exc)
                if fixed:
                    logger.error("part %s failed (not retried: a retry gives the same): %s",
                                 job.part, reason)
                    if isinstance(getattr(exc, "cause", None), NonFiniteTargetsError):
                        queue.clear()  # the base model is at fault: every part would fail so
                else:
                    logger.error("part %s failed after %d retries: %s", job.part,
                                 cfg.ray.max_retries, reason)
                failed.append((job.part, reason, fixed))
                submit()  # after the queue was cleared for a base model at fault
                continue
            submit()
            results.append(res)
            images += res.images
            rate = images / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"parts {len(results) + len(failed)}/{len(jobs)}, "
                                f"{rate:.1f} images/s")
            if res.already_committed:
                logger.info("part %s was already committed (by another writer); skipped",
                            res.part)
            else:
                logger.info("part %s committed: %d images, %d bad, %.1f s (worker %s)",
                            res.part, res.images, len(res.bad), res.seconds, res.worker)
    finally:
        if bar is not None:
            bar.close()
        for ref in running:  # an error or Ctrl-C: stop what is still running
            ray.cancel(ref, force=True)
    return results, failed


def _run_on_ray(cfg: Stage1Config, base: BaseModelConfig, jobs: list[ShardJob],
                ray_address: str | None, progress: bool):
    import ray

    started, address = _connect_ray(cfg, ray_address)
    try:
        plan = plan_actors(cfg, ray.cluster_resources())
        logger.info("stage 1 on Ray at %s: %d base-model actors (%s, %d threads), %d shard "
                    "tasks at a time", address, plan.num_actors, plan.actor_options,
                    plan.threads, plan.concurrent)
        # one decision for the whole run: every part of it is written by one encoder
        device = resolve_encode_on(cfg, gpus=bool(plan.actor_options.get("num_gpus")))
        jobs = [dataclasses.replace(job, encode_on_device=device) for job in jobs]
        if cfg.codec == "lowrank":
            logger.info("codec lowrank encoded %s", "by the base-model actors (torch, on their "
                        "device)" if device else "in the shard tasks (numpy, on their CPU)")
        actors, ready = _start_actors(cfg, base, plan)
        try:
            results, failed = _run_tasks(cfg, jobs, actors, ready, plan, progress)
        finally:
            for actor in actors:
                ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
    return results, failed, address


def task_failure(exc: BaseException) -> tuple[str, bool]:
    """(one-line reason, deterministic) of a failed shard task.

    Deterministic: the task raised a ValueError (a Stage1Error such as NonFiniteTargetsError,
    a CacheError, ...): the same inputs give the same error, so it is not retried and the
    message says what to change. Worker deaths and I/O errors (OSError) are transient.
    """
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, ValueError) and not isinstance(cause, OSError):
        return first_line(cause), True
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}", False


def failure_message(failed: list[tuple], parts_total: int, max_retries: int) -> str:
    """The one line stage 1 ends with when parts failed: [(part, reason, deterministic)]."""
    fixed = [f for f in failed if len(f) > 2 and f[2]]
    if fixed:
        part, reason = fixed[0][:2]
        return (f"{len(failed)} of {parts_total} parts failed, not retried (first: {part}: "
                f"{reason}); a rerun fails the same way until that is changed (the other parts "
                "are committed)")
    part, reason = failed[0][:2]
    return (f"{len(failed)} of {parts_total} parts failed after {max_retries} retries (first: "
            f"{part}: {reason}); the other parts are committed, rerun to resume")
