"""``storage``: bytes on disk per 1M ingress events after processing and retention, from
the ingest benchmarks' phases and the pipeline's database (both memoized per run)."""

from __future__ import annotations

from benchmarks.framework import Context, Result, benchmark
from benchmarks.ingest_load import event_store_phase, pg_phases
from benchmarks.pipeline_runs import pipeline_run


@benchmark("storage", order=90)
def storage(ctx: Context) -> Result:
    """Bytes on disk per 1M ingress events after processing and retention vs the naive
    design (every event a stream event in the event store, kept)."""
    ours = pg_phases(ctx)["storage"]
    es = event_store_phase(ctx)["storage"]
    kept = pipeline_run(ctx)["storage"]
    ingested_per_m = ours["bytes"] / max(ours["rows"], 1) * 1e6
    es_per_m = es["bytes"] / max(es["rows"], 1) * 1e6
    per_m = kept["after_bytes"] / max(kept["ingress_events"], 1) * 1e6
    scale = 1e6 / max(kept["ingress_events"], 1)
    return {
        "value": per_m,
        "unit": "bytes/1M events",
        "baseline": "event_store",
        "baseline_value": es_per_m,
        "lower_is_better": True,
        "after_retention_by_kind_per_1M": {
            k: round(v * scale) for k, v in kept["after_retention"].items()
        },
        # the ten largest tables left (bytes per 1M, and their rows as they are)
        "after_retention_largest_per_1M": {
            name: [round(size * scale), kept["after_retention_rows"].get(name)]
            for name, size in sorted(kept["after_retention_tables"].items(), key=lambda kv: -kv[1])[
                :10
            ]
        },
        "before_retention_by_kind_per_1M": {
            k: round(v * scale) for k, v in kept["before_retention"].items()
        },
        "ingress_right_after_ingest_per_1M": ingested_per_m,
        "ingress_rows": ours["rows"],
        "baseline_rows": es["rows"],
        "pipeline_ingress_events": kept["ingress_events"],
        "retention_rows_dropped": kept["retention_rows_dropped"],
        "projection_rate": kept["projection_rate"],
        "note": (
            "value: every table left after the pipeline processed N events over M members, "
            "the projection caught up and retention expired the ingress days, per 1M "
            "ingress events; baseline: the naive event store's table per 1M events (kept "
            "forever); ingress_right_after_ingest_per_1M: our day partitions before retention"
        ),
    }
