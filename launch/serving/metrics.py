"""`/metrics`: the service's Prometheus series (prometheus-client, text format 0.0.4).

The gateway records what it sees itself: requests by model, endpoint and status; each
sequence's time to first token and time per output token (histograms, from the engine's
clock); prompt and generated tokens; requests in flight per model. What only the model
replicas know (engine steps, running and waiting sequences, KV slots, tokens per expert
per layer, dropped slots, the all-to-all time of expert-parallel deployments) arrives as
`ReplicaReport`s: every answer carries its replica's, and each scrape asks every
deployment for a fresh one first. A deployment's series are the sum over its replicas:
counters over every replica ever seen (a replaced replica's work still happened, so the
sums never go back), gauges over the replicas that reported within `stale_s`.

docs/SERVING.md lists every series with a sample scrape.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from launch.serving.protocol import ChoiceResult, ReplicaReport
from moe.inference.telemetry import EngineTelemetry

# Seconds: first tokens from milliseconds (a warm replica) to a minute (a queue), per-token
# times from a millisecond to seconds (a loaded CPU).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ReplicaCollector(Collector):
    """The replicas' series (see the module docstring)."""

    def __init__(self, stale_s: float) -> None:
        self.stale_s = stale_s
        self._reports: dict[tuple[str, str], tuple[float, ReplicaReport]] = {}

    def update(self, report: ReplicaReport) -> None:
        """Keep `report` unless a later one of the same replica is already here (answers
        of one replica can arrive out of order)."""
        key = (report.deployment, report.replica)
        known = self._reports.get(key)
        if known is None or known[1].sequence <= report.sequence:
            self._reports[key] = (time.monotonic(), report)

    def _sums(self) -> dict[str, tuple[EngineTelemetry, EngineTelemetry, int, int, int]]:
        """deployment -> (counters over all replicas, gauges over fresh ones, fresh
        replicas, queued requests, EP size)."""
        now = time.monotonic()
        sums: dict[str, tuple[EngineTelemetry, EngineTelemetry, int, int, int]] = {}
        for (deployment, _), (received, report) in sorted(self._reports.items()):
            counters, gauges, fresh, queued, _ = sums.get(
                deployment, (EngineTelemetry(), EngineTelemetry(), 0, 0, report.ep_size)
            )
            counters = EngineTelemetry.summed([counters, report.telemetry])
            if now - received <= self.stale_s:
                gauges = EngineTelemetry.summed([gauges, report.telemetry])
                fresh += 1
                queued += report.queued
            sums[deployment] = (counters, gauges, fresh, queued, report.ep_size)
        return sums

    def collect(self) -> Iterator[Metric]:
        labels = ["deployment"]
        steps = CounterMetricFamily("moe_engine_steps", "Engine steps (model calls)", labels=labels)
        tokens = CounterMetricFamily(
            "moe_engine_tokens", "Tokens through the model (prefills and decodes)", labels=labels
        )
        experts = CounterMetricFamily(
            "moe_expert_tokens", "Token-slots routed to each expert of each MoE layer",
            labels=[*labels, "layer", "expert"],
        )  # fmt: skip
        dropped = CounterMetricFamily(
            "moe_dropped_slots", "Token-slots the capacity policy dropped, per MoE layer",
            labels=[*labels, "layer"],
        )  # fmt: skip
        alltoall = CounterMetricFamily(
            "moe_alltoall_seconds", "Seconds in the MoE all-to-alls per rank (expert-parallel "
            "deployments; per step: divide by moe_engine_steps_total)", labels=labels,
        )  # fmt: skip
        gauges = {
            "running": GaugeMetricFamily(
                "moe_sequences_running", "Sequences decoding", labels=labels
            ),
            "waiting": GaugeMetricFamily(
                "moe_sequences_waiting", "Sequences waiting for a KV-cache slot", labels=labels
            ),
            "slots_in_use": GaugeMetricFamily(
                "moe_kv_slots_in_use", "KV-cache slots held by sequences", labels=labels
            ),
            "slots_total": GaugeMetricFamily("moe_kv_slots", "KV-cache slots", labels=labels),
            "kv_tokens": GaugeMetricFamily(
                "moe_kv_cache_tokens", "Token positions held in the KV cache", labels=labels
            ),
        }
        queue = GaugeMetricFamily(
            "moe_queue_depth", "Requests in a replica not yet running: handed to the replica "
            "but not to its engine, plus sequences waiting for a slot", labels=labels,
        )  # fmt: skip
        replicas = GaugeMetricFamily(
            "moe_replicas_reporting", f"Replicas that reported in the last {self.stale_s:g} s",
            labels=labels,
        )  # fmt: skip
        for deployment, (counters, fresh, count, queued, ep_size) in self._sums().items():
            steps.add_metric([deployment], counters.steps)
            tokens.add_metric([deployment], counters.model_tokens)
            for layer, per_expert in sorted(counters.expert_tokens.items()):
                for expert, value in enumerate(per_expert):
                    experts.add_metric([deployment, str(layer), str(expert)], value)
            for layer, value in sorted(counters.dropped_slots.items()):
                dropped.add_metric([deployment, str(layer)], value)
            if ep_size > 1:
                alltoall.add_metric([deployment], counters.alltoall_seconds)
            for name, family in gauges.items():
                family.add_metric([deployment], getattr(fresh, name))
            queue.add_metric([deployment], queued + fresh.waiting)
            replicas.add_metric([deployment], count)
        yield from (steps, tokens, experts, dropped, alltoall, *gauges.values(), queue, replicas)


class ServiceMetrics:
    """The gateway's registry (its own, not prometheus-client's global one)."""

    def __init__(self, stale_s: float = 30.0) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "moe_requests", "HTTP requests answered, by model id, endpoint and status",
            ["model", "endpoint", "status"], registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "moe_requests_in_flight", "Requests sent to a model deployment, not answered yet",
            ["model"], registry=registry,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "moe_time_to_first_token_seconds", "Per sequence: from its arrival at the engine "
            "to its first token", ["model"], buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.time_per_output_token = Histogram(
            "moe_time_per_output_token_seconds", "Per sequence of 2 or more tokens: the mean "
            "time between its tokens after the first", ["model"], buckets=TPOT_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "moe_prompt_tokens", "Prompt tokens of answered requests", ["model"], registry=registry
        )
        self.generation_tokens = Counter(
            "moe_generation_tokens", "Tokens generated for answered requests (every sequence)",
            ["model"], registry=registry,
        )  # fmt: skip
        self.report_errors = Counter(
            "moe_replica_report_errors", "Scrapes whose report from a deployment failed",
            ["deployment"], registry=registry,
        )  # fmt: skip
        self.replicas = ReplicaCollector(stale_s)
        registry.register(self.replicas)

    def observe_choice(self, model: str, choice: ChoiceResult) -> None:
        self.time_to_first_token.labels(model).observe(choice.time_to_first_token_s)
        if choice.completion_tokens > 1:
            self.time_per_output_token.labels(model).observe(choice.per_token_latency_s)

    def observe_tokens(self, model: str, prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(generated_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
