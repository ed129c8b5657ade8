"""`python -m launch.serve checkpoint=P [overrides]`: serve a checkpoint over HTTP.

    python -m launch.serve checkpoint=runs/demo_task                     # 127.0.0.1:8000
    python -m launch.serve checkpoint=runs/demo_task 'serve.tasks=[law,2]' serve.port=8080
    python -m launch.serve checkpoint=runs/demo_task serve.ep_size=2 serve.replicas=2
    python -m launch.serve checkpoint=runs/demo serve.precision=bf16     # bf16 weights
    RAY_ADDRESS=ray://head:10001 python -m launch.serve checkpoint=/shared/run ...

A Ray Serve application (an embedded local Ray unless `RAY_ADDRESS` names a cluster):
one deployment per task of `serve.tasks` holding only that task's experts (a subset
checkpoint: `serve.subsets` maps a task to one, the others are cut at start-up into
`serve.subset_dir`), one deployment of the full model for every other request
(expert-parallel over `serve.ep_size` Ray workers when > 1), and the OpenAI-style
gateway (`launch.serving.api`). Model ids: `full`, and `task-<id>` for every task of a
task-aware checkpoint (served by its subset deployment when it has one, else by the full
model). Bounds: `serve.max_body_bytes`, `serve.max_tokens`, `serve.max_n`,
`serve.max_best_of`, `serve.max_logprobs`, `serve.max_prompts`,
`serve.max_request_tokens`, and per deployment replica `serve.max_ongoing_requests`
running plus `serve.max_queued_requests` waiting (then 503 with `Retry-After`).
`serve.chat_template`: a Jinja2 file that replaces the checkpoint's chat template.
`serve.precision` (fp32 by default; bf16, auto, fp16 on CUDA) is the weights' and the KV
cache's dtype in every deployment (`moe.precision`). See
docs/SERVING.md.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from launch.cli import exits_on_bad_input
from launch.schema import build, hydra_schema, plain_container

CONFIG_PATH = "../conf"


@dataclass
class ServeOptions:
    """The service's shape and bounds (`serve.*`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    tasks: list[str] = field(default_factory=list)
    subsets: dict[str, str] = field(default_factory=dict)
    subset_dir: str = ""
    replicas: int = 1
    max_replicas: int = 0  # > replicas: autoscale between the two on ongoing requests
    ep_size: int = 1
    max_batch: int = 16
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    max_body_bytes: int = 65536
    max_tokens: int = 512
    precision: str = "fp32"
    max_n: int = 8
    max_best_of: int = 8
    max_logprobs: int = 20
    max_prompts: int = 64
    max_request_tokens: int = 262144
    chat_template: str = ""  # a Jinja2 file; "": the checkpoint's, else the plain template
    metrics_stale_s: float = 30.0
    retry_after_s: int = 1
    threads_per_replica: int = 1
    cpus_per_replica: float = 0.5
    gpus_per_worker: float = 0.0
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    timeout_s: float = 120.0
    # The compiled decode step (moe.inference.decode) in every replica and EP worker.
    compile: bool = False
    compile_warmup: str = "start"
    compile_cache_dir: str = ""
    # A stream sends its first text at once, later text at most this often (0: every step)
    # and at most (streams in flight) / stream_events_per_s apart (0: unbounded): every
    # event costs a message per hop, so the replica's events per second are bounded.
    stream_interval_s: float = 0.0
    stream_events_per_s: float = 300.0

    def __post_init__(self) -> None:
        from moe.precision import parse_precision

        self.precision = parse_precision(self.precision, "serve.precision").value
        self.tasks = [str(t) for t in self.tasks]
        self.subsets = {str(k): str(v) for k, v in self.subsets.items()}
        if not 0 <= self.port <= 65535:
            raise ValueError(f"serve.port={self.port} is invalid; accepted: 0..65535")
        for key in ("replicas", "ep_size", "max_batch", "max_ongoing_requests",
                    "max_body_bytes", "max_tokens", "retry_after_s", "threads_per_replica"):  # fmt: skip
            if getattr(self, key) < 1:
                raise ValueError(f"serve.{key}={getattr(self, key)} is invalid; accepted: >= 1")
        if self.compile_warmup not in ("start", "lazy"):
            raise ValueError(
                f"serve.compile_warmup={self.compile_warmup!r} is invalid; accepted: start, lazy"
            )
        for key in ("stream_interval_s", "stream_events_per_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"serve.{key}={getattr(self, key)} is invalid; accepted: >= 0")
        if self.max_queued_requests < 0:
            raise ValueError(
                f"serve.max_queued_requests={self.max_queued_requests}; accepted: >= 0 (a bound)"
            )
        self.limits()  # validates max_n, max_best_of, max_logprobs, max_prompts, ...
        if self.chat_template and not Path(self.chat_template).is_file():
            raise ValueError(
                f"serve.chat_template={self.chat_template!r} is not a file; accepted: a Jinja2 "
                "template file, or empty (the checkpoint's template)"
            )
        if self.max_replicas and self.max_replicas < self.replicas:
            raise ValueError(
                f"serve.max_replicas={self.max_replicas} is below serve.replicas="
                f"{self.replicas}; accepted: 0 (no autoscaling) or >= serve.replicas"
            )
        if self.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(
            "MOE_SERVE_PUBLIC"
        ):
            print(f"[serve] warning: binding {self.host}, reachable beyond this machine")

    def limits(self) -> Any:
        """The request bounds (`launch.serving.protocol.Limits`)."""
        from launch.serving.protocol import Limits

        return Limits(
            max_body_bytes=self.max_body_bytes, max_tokens=self.max_tokens, max_n=self.max_n,
            max_best_of=self.max_best_of, max_logprobs=self.max_logprobs,
            max_prompts=self.max_prompts, max_request_tokens=self.max_request_tokens,
        )  # fmt: skip


@dataclass
class ServeConfig:
    checkpoint: str = ""
    serve: ServeOptions = field(default_factory=ServeOptions)

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint is required: checkpoint=RUN_DIR or checkpoint=STEP_DIR")


def register_serve_config() -> None:
    ConfigStore.instance().store(name="base_serve", node=hydra_schema(ServeConfig))


def to_serve_config(cfg: DictConfig | dict[str, Any]) -> ServeConfig:
    return build(ServeConfig, plain_container(cfg))


def _subset_checkpoints(config: ServeConfig) -> dict[int, str]:
    """Task id -> subset checkpoint for every task of `serve.tasks` (cut when missing)."""
    from moe.checkpoint import read_meta
    from moe.inference.loading import resolve_checkpoint
    from moe.inference.subset import write_subset

    options = config.serve
    out_root = Path(options.subset_dir or tempfile.mkdtemp(prefix="moe_serve_subsets_"))
    chosen: dict[int, str] = {}
    for task in options.tasks:
        given = options.subsets.get(task)
        if given is not None:
            directory = resolve_checkpoint(given)
            subset = read_meta(directory).get("extra", {}).get("subset")
            task_id = int(subset["task"]) if subset else None
            if task_id is None:
                raise ValueError(f"serve.subsets.{task}={given!r} is not a task subset checkpoint")
        else:
            out = out_root / f"task_{task}"
            if (out / "latest").is_file():
                directory = resolve_checkpoint(out)
                task_id = int(read_meta(directory)["extra"]["subset"]["task"])
            else:
                result = write_subset(config.checkpoint, task, out)
                directory, task_id = result.directory, result.task
                print(f"[serve] cut the subset of task {task_id} into {directory}", flush=True)
        if task_id in chosen:
            raise ValueError(f"serve.tasks names task {task_id} twice")
        chosen[task_id] = str(Path(directory).resolve())
    return chosen


def _deployment_options(options: ServeOptions, name: str) -> dict[str, Any]:
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.max_replicas > options.replicas:
        scaling = {"autoscaling_config": {
            "min_replicas": options.replicas, "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.max_batch,
        }}  # fmt: skip
    return {
        "name": name, "max_ongoing_requests": options.max_ongoing_requests,
        "max_queued_requests": options.max_queued_requests,
        "health_check_period_s": options.health_check_period_s,
        "health_check_timeout_s": options.health_check_timeout_s,
        "graceful_shutdown_timeout_s": 5,
        "ray_actor_options": {"num_cpus": options.cpus_per_replica},
        **scaling,
    }  # fmt: skip


def build_app(config: ServeConfig, probe: bool = False) -> Any:
    """The Ray Serve application of `config`. `probe` adds the deployment `probe`: the
    same architecture with one MoE layer of one expert (the benchmark's runtime-overhead
    baseline, `launch.serving.deployments.probe_model`)."""
    import torch
    from ray import serve

    from launch.serving.api import Gateway
    from launch.serving.deployments import ModelServer, ModelSpec
    from launch.serving.protocol import ModelEntry
    from moe.checkpoint import read_meta
    from moe.inference.loading import checkpoint_tokenizer, configs_of, resolve_checkpoint
    from moe.precision import resolve_precision

    options = config.serve
    # Refused here, not in a replica: fp16 where the model would run on CPU. Replicas
    # hold their model on CPU; expert-parallel workers on a GPU when given one.
    on_gpu = options.ep_size > 1 and options.gpus_per_worker > 0
    device = torch.device("cuda" if on_gpu else "cpu")
    resolve_precision(options.precision, device, key="serve.precision")
    checkpoint = str(resolve_checkpoint(config.checkpoint).resolve())
    meta = read_meta(Path(checkpoint))
    model_config, routing = configs_of(meta)
    tokenizer_files = checkpoint_tokenizer(Path(checkpoint), meta).files()
    template = Path(options.chat_template).read_text() if options.chat_template else None
    subsets = _subset_checkpoints(config)
    full = ModelSpec("full", checkpoint, ep_size=options.ep_size, max_batch=options.max_batch,
                     threads=options.threads_per_replica, cpus_per_worker=options.cpus_per_replica,
                     gpus_per_worker=options.gpus_per_worker, timeout_s=options.timeout_s,
                     compile=options.compile, compile_warmup=options.compile_warmup,
                     compile_cache_dir=options.compile_cache_dir,
                     stream_interval_s=options.stream_interval_s,
                     stream_events_per_s=options.stream_events_per_s,
                     precision=options.precision)  # fmt: skip
    specs = {"full": full}
    for task_id, path in subsets.items():
        specs[f"task-{task_id}"] = replace(full, name=f"task-{task_id}", checkpoint=path, ep_size=1)
    if probe:
        specs["probe"] = replace(full, name="probe", ep_size=1, probe=True)
    context = model_config.max_seq_len
    num_tasks = routing.num_tasks if routing is not None else 0
    needs_task = routing is not None and routing.needs_task_ids
    task_ids = tuple(range(num_tasks)) if num_tasks else None
    catalog = {"full": ModelEntry("full", None, context, needs_task, task_ids)}
    for task_id in range(num_tasks):
        deployment = f"task-{task_id}" if task_id in subsets else "full"
        catalog[f"task-{task_id}"] = ModelEntry(deployment, task_id, context)
    if probe:  # a task-routed probe answers as task 0 (any task runs the same code)
        catalog["probe"] = ModelEntry("probe", 0 if needs_task else None, context)
    # `serve.deployment()(cls)` rather than `serve.deployment(cls)`: the same Deployment,
    # in the decorator form that Ray's annotations describe.
    model_deployment = serve.deployment()(ModelServer)
    handles = {
        name: model_deployment.options(**_deployment_options(options, name)).bind(spec)
        for name, spec in specs.items()
    }
    gateway = serve.deployment()(Gateway).options(
        name="gateway", num_replicas=1, max_ongoing_requests=4096, max_queued_requests=4096,
        ray_actor_options={"num_cpus": 0},
    )  # fmt: skip
    health_timeout_s = min(options.health_check_timeout_s, 10.0)
    return gateway.bind(
        handles, catalog, options.limits(), options.retry_after_s, health_timeout_s,
        tokenizer_files, template, options.metrics_stale_s,
    )  # fmt: skip


# Ray Serve's settings for throughput (part of its `RAY_SERVE_THROUGHPUT_OPTIMIZED`
# preset): a replica runs its methods on its own event loop (not a second thread that
# every request and stream item crosses), and a handle routes on the caller's loop. On 2
# cores they gave 1.6x the HTTP tokens/s at 32 streams (docs/BENCHMARKS.md, "Serving").
# Not taken from the preset: gRPC between deployments (`RAY_SERVE_USE_GRPC_BY_DEFAULT`;
# faster still, but in one of three test runs streamed requests to a killed replica's
# replacement kept failing for minutes), direct ingress (a port per ingress replica on
# every interface), and silencing the replicas' stderr. A variable already set wins.
SERVE_ENVIRONMENT = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def serve_environment() -> dict[str, str]:
    """`SERVE_ENVIRONMENT`, each variable as this process's environment sets it if it does."""
    return {name: os.environ.get(name, value) for name, value in SERVE_ENVIRONMENT.items()}


def init_ray(config: ServeConfig) -> None:
    """An embedded local Ray (enough logical CPUs for every replica and worker), or the
    cluster `RAY_ADDRESS` names; Serve's processes get `serve_environment()` (through
    this process's environment, which the embedded Ray's processes inherit, and the
    job's runtime environment on a cluster)."""
    import ray

    if ray.is_initialized():
        return
    environment = serve_environment()
    os.environ.update(environment)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": environment})
        return
    options = config.serve
    deployments = 1 + len(options.tasks) + 1
    actors = deployments * max(options.replicas, options.max_replicas) + options.ep_size * max(
        options.replicas, options.max_replicas
    )
    num_cpus = max(2, math.ceil(actors * options.cpus_per_replica) + 2)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def start(config: ServeConfig, probe: bool = False) -> str:
    """Start Ray (if needed), the HTTP proxy on `serve.host:serve.port` and the
    application; returns the base URL once every deployment is running."""
    from ray import serve

    app = build_app(config, probe=probe)
    init_ray(config)
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    serve.run(app, name="moe", route_prefix="/")
    return f"http://{config.serve.host}:{config.serve.port}"


def stop() -> None:
    """Shut Serve and the Ray this process started down."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


@hydra.main(config_path=CONFIG_PATH, config_name="serve", version_base=None)
@exits_on_bad_input("launch.serve")
def main(cfg: DictConfig) -> None:
    config = to_serve_config(cfg)
    url = start(config)
    print(f"[serve] ready at {url} (POST /v1/completions, POST /v1/chat/completions, "
          "GET /v1/models, GET /health, GET /metrics)", flush=True)  # fmt: skip
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


register_serve_config()

if __name__ == "__main__":
    main()
