"""`GET /metrics` (v10.7+): lemond's Prometheus text (`prometheus_metrics.cpp` at v11.7.0).

Every series is described (`# HELP` / `# TYPE`) before its samples, as lemond's builder
does; per-model series carry the model's name, checkpoint, type, device and recipe. The
simulator has no backend `/metrics` to relay, so the `lemonade_llamacpp_*` series are absent,
and it keeps no per-model telemetry, so the per-model gauges have no samples.
"""

from __future__ import annotations

from typing import Any

SERVER = (
    ("lemonade_server_up", "Whether the Lemonade server is running.", "gauge"),
    ("lemonade_server_info", "Lemonade server build information.", "gauge"),
    ("lemonade_loaded_models", "Number of models currently loaded in Lemonade.", "gauge"),
)
PER_MODEL = (
    ("lemonade_model_info", "Metadata for each Lemonade model observed by this process.",
     "gauge"),
    ("lemonade_model_loaded", "Whether this model is currently loaded in Lemonade.", "gauge"),
    ("lemonade_model_input_tokens", "Latest input token count reported by a model.", "gauge"),
    ("lemonade_model_output_tokens", "Latest output token count reported by a model.",
     "gauge"),
    ("lemonade_model_prompt_tokens", "Latest prompt token count reported by a model.",
     "gauge"),
    ("lemonade_model_cache_tokens", "Latest prompt tokens served from the backend prefix "
                                    "cache for a model.", "gauge"),
    ("lemonade_model_time_to_first_token_seconds", "Latest time to first token reported by "
                                                   "a model.", "gauge"),
    ("lemonade_model_tokens_per_second", "Latest generation throughput reported by a model.",
     "gauge"),
    ("lemonade_model_requests_total", "Cumulative inference requests observed for a model.",
     "counter"),
    ("lemonade_model_input_tokens_total", "Cumulative input tokens observed for a model.",
     "counter"),
    ("lemonade_model_output_tokens_total", "Cumulative output tokens observed for a model.",
     "counter"),
    ("lemonade_model_prompt_tokens_total", "Cumulative prompt tokens observed for a model.",
     "counter"),
    ("lemonade_model_cache_tokens_total", "Cumulative prompt tokens served from the backend "
                                          "prefix cache for a model.", "counter"),
)
TOTALS = (
    ("lemonade_requests_total", "Cumulative inference requests observed by Lemonade.",
     "request_count_total"),
    ("lemonade_input_tokens_total", "Cumulative input tokens observed by Lemonade.",
     "input_tokens_total"),
    ("lemonade_output_tokens_total", "Cumulative output tokens observed by Lemonade.",
     "output_tokens_total"),
    ("lemonade_prompt_tokens_total", "Cumulative prompt tokens observed by Lemonade.",
     "prompt_tokens_total"),
    ("lemonade_cache_tokens_total", "Cumulative prompt tokens served from backend prefix "
                                    "caches.", "cache_tokens_total"),
    ("lemonade_routing_decisions_total", "Cumulative collection.router routing decisions.",
     None),
    ("lemonade_routing_switches_total", "Cumulative routing decisions that changed a "
                                        "conversation's routed model.", None),
)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in sorted(labels.items()))
    return "{" + ",".join(escaped) + "}"


def prometheus_text(sim: Any) -> str:
    out: list[str] = []

    def describe(name: str, text: str, kind: str) -> None:
        out.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))

    def sample(name: str, labels: dict[str, str], value: float) -> None:
        out.append(f"{name}{_labels(labels)} {_number(value)}")

    describe(*SERVER[0])
    sample("lemonade_server_up", {}, 1)
    describe(*SERVER[1])
    sample("lemonade_server_info", {"version": sim.version}, 1)
    models = sim.ready_models()
    describe(*SERVER[2])
    sample("lemonade_loaded_models", {}, len(models))
    for series in PER_MODEL:
        describe(*series)
    for model in models:
        labels = {"model_name": model.name, "checkpoint": model.checkpoint,
                  "type": sim.type_name(model.type), "device": model.device,
                  "recipe": model.recipe}
        sample("lemonade_model_info", labels, 1)
        sample("lemonade_model_loaded", labels, 1)
    describe("lemonade_max_loaded_models", "Configured loaded model limit per model type.",
             "gauge")
    for kind in sim.type_keys():
        sample("lemonade_max_loaded_models", {"type": kind}, sim.max_loaded)
    for name, text, _ in TOTALS:
        describe(name, text, "counter")
    for name, _, key in TOTALS:
        sample(name, {}, sim.state.totals.get(key, 0) if key else 0)
    return "\n".join(out) + "\n"
