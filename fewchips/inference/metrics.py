"""The engine's Prometheus metrics (`prometheus_client`), served by `fewchips serve` at /metrics.

Names and labels follow vLLM's where a counterpart exists (`vllm:num_requests_running` is
`fewchips:num_requests_running`, with the same `model_name` label), so a vLLM dashboard needs only its
prefix changed. Token counts, not blocks, for the prefix cache (as vLLM's v1 engine counts them).
Each engine has its own registry unless given one: two engines in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .experts import replica_imbalance, replica_layers

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class EngineMetrics:
    def __init__(self, model_name: str = "fewchips", registry: CollectorRegistry | None = None,
                 prefix: str = "fewchips:"):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        L, reg = ["model_name"], self.registry

        def make(kind, name, doc, **kw):
            return kind(prefix + name, doc, L + kw.pop("extra", []), registry=reg, **kw)

        self.running = make(Gauge, "num_requests_running", "Requests holding cache (prefilling or decoding)")
        self.waiting = make(Gauge, "num_requests_waiting", "Requests queued for admission")
        self.cache_usage = make(Gauge, "kv_cache_usage_perc", "Fraction of latent-cache blocks in use (0 to 1)")
        self.blocks_used = make(Gauge, "kv_cache_blocks_used", "Latent-cache blocks held by requests")
        self.preemptions = make(Counter, "num_preemptions", "Requests preempted for cache blocks")
        self.prompt = make(Counter, "prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded)")
        self.generation = make(Counter, "generation_tokens", "Tokens generated")
        self.prefix_queries = make(Counter, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = make(Counter, "prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.success = make(Counter, "request_success", "Requests finished", extra=["finished_reason"])
        self.ttft = make(Histogram, "time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS)
        self.itl = make(Histogram, "inter_token_latency_seconds", "Time between a request's tokens",
                        buckets=ITL_BUCKETS)
        self.e2e = make(Histogram, "e2e_request_latency_seconds", "Arrival to last token", buckets=E2E_BUCKETS)
        self.req_prompt = make(Histogram, "request_prompt_tokens", "Prompt tokens per request", buckets=TOKEN_BUCKETS)
        self.req_gen = make(Histogram, "request_generation_tokens", "Generated tokens per request",
                            buckets=TOKEN_BUCKETS)
        self.drafts = make(Counter, "spec_decode_num_drafts", "Speculative draft rounds")
        self.draft_tokens = make(Counter, "spec_decode_num_draft_tokens", "Draft tokens proposed")
        self.accepted = make(Counter, "spec_decode_num_accepted_tokens", "Draft tokens accepted")
        self.imbalance = make(Gauge, "expert_rank_load_imbalance", "Serving over ranks with replicas: the busiest "
                              "rank's expert rows over the mean, averaged over MoE layers, since start",
                              extra=["placement"])
        for m in (self.preemptions, self.prompt, self.generation, self.prefix_queries, self.prefix_hits, self.ttft,
                  self.itl, self.e2e, self.req_prompt, self.req_gen, self.drafts, self.draft_tokens, self.accepted):
            m.labels(model_name)            # exported (at 0) before the first event, as dashboards expect

    def watch(self, engine):
        # the gauges read the scheduler, not the engine: no reference cycle keeps an engine's cache alive
        m, sched = self.model_name, engine.scheduler
        self.running.labels(m).set_function(lambda: len(sched.running))
        self.waiting.labels(m).set_function(lambda: len(sched.waiting))
        self.cache_usage.labels(m).set_function(lambda: sched.pool.n_used / max(sched.pool.n_usable, 1))
        self.blocks_used.labels(m).set_function(lambda: sched.pool.n_used)
        layers = replica_layers(engine.model)
        if layers:                     # --ep N --redundant-experts R: as served, and with the own experts alone
            self.imbalance.labels(m, "served").set_function(lambda: replica_imbalance(layers)[1])
            self.imbalance.labels(m, "without_replicas").set_function(lambda: replica_imbalance(layers)[0])

    def prefix_cache(self, queried: int, hit: int):
        self.prefix_queries.labels(self.model_name).inc(queried)
        self.prefix_hits.labels(self.model_name).inc(hit)

    def preempted(self):
        self.preemptions.labels(self.model_name).inc()

    def prompt_tokens(self, n: int):
        if n:
            self.prompt.labels(self.model_name).inc(n)

    def token(self, r, now: float):
        self.generation.labels(self.model_name).inc()
        if r.last_token_time is None:
            self.ttft.labels(self.model_name).observe(now - r.arrival)
        else:
            self.itl.labels(self.model_name).observe(now - r.last_token_time)

    def speculation(self, drafted: int, accepted: int):
        self.drafts.labels(self.model_name).inc()
        self.draft_tokens.labels(self.model_name).inc(drafted)
        self.accepted.labels(self.model_name).inc(accepted)

    def finished(self, r, reason: str, now: float):
        m = self.model_name
        self.success.labels(m, reason).inc()
        self.e2e.labels(m).observe(now - r.arrival)
        self.req_prompt.labels(m).observe(len(r.prompt_ids))
        self.req_gen.labels(m).observe(len(r.output_ids))
