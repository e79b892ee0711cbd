"""Replicas of the server on Ray Serve: the same FastAPI app, one engine process per replica.

``codeaccel serve --replicas N`` starts a local Ray instance, deploys the app with
``serve.deployment`` + ``serve.ingress`` (the app is built on each replica from the settings,
so no engine or thread is pickled), and lets Ray's HTTP proxy balance requests over the
replicas on ``host:port``. Each replica reserves ``cpus_per_replica`` of Ray's CPUs and runs its
engine on as many threads; its continuous batch, metrics and queue are its own (``/metrics``
answers for the replica that took the request; every response names it in
``X-Codeaccel-Replica``). Completion events from every replica go to one SQLite file (WAL:
several processes may write it).

On a cluster the same deployment runs with ``ray start --head`` / ``--address``; Ray places
each replica where its CPUs are free.
"""

from __future__ import annotations

import logging
import os
import time

from codeaccel.errors import SetupError, UserError
from codeaccel.serve.settings import ServeSettings

log = logging.getLogger(__name__)

APP_NAME = "codeaccel"


def replica_plan(replicas: int, cpus_per_replica: float | None, cpus: int | None = None) -> float:
    """CPUs per replica: given, or this machine's cores split evenly (at least one each).

    Refuses a plan whose replicas together need more CPUs than the machine has.
    """
    total = cpus or os.cpu_count() or 1
    if replicas < 1:
        raise UserError(f"--replicas needs at least 1, got {replicas}")
    per = cpus_per_replica if cpus_per_replica is not None else max(total // replicas, 1)
    if per <= 0:
        raise UserError(f"--cpus-per-replica must be positive, got {per}")
    if per * replicas > total:
        raise UserError(f"{replicas} replicas of {per:g} CPUs need {per * replicas:g}; this machine has {total}")
    return float(per)


def deployment(settings: ServeSettings, replicas: int, cpus_per_replica: float):
    """A bound Ray Serve application of ``replicas`` copies of the server (``serve.run`` deploys it)."""
    from ray import serve

    threads = settings.n_threads or max(int(cpus_per_replica), 1)
    replica_settings = settings.model_copy(update={"n_threads": threads})

    def build_app():  # runs on each replica
        from codeaccel.serve.app import create_app

        context = serve.get_replica_context()
        return create_app(replica_settings, replica=context.replica_id.unique_id)

    ingress = serve.ingress(build_app)
    replica = serve.deployment(
        ingress(),
        name="codeaccel-server",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=settings.parallel + settings.max_queue,
        # beyond what the replicas hold, Ray's proxy answers 503 too instead of queueing without bound
        max_queued_requests=max(1, settings.max_queue),
        health_check_period_s=10,
    )
    return replica.bind()


def serve_replicas(settings: ServeSettings, replicas: int, cpus_per_replica: float | None = None) -> None:
    """Start Ray locally, deploy ``replicas`` servers behind Ray's proxy on host:port, block until Ctrl-C."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SetupError("replicas run on Ray Serve: pip install 'codeaccel[replicas]'") from None
    per = replica_plan(replicas, cpus_per_replica)
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
                 log_to_driver=False, object_store_memory=100 * 1024 * 1024)  # fmt: skip
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(deployment(settings, replicas, per), name=APP_NAME, route_prefix="/", blocking=False)
    log.warning("serving %d replicas of %s (%g CPUs each) on http://%s:%d", replicas, settings.model, per,
                settings.host, settings.port)  # fmt: skip
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
