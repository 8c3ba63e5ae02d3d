"""The disaster-recovery plan: objectives, schedule, destinations, the restore time to
expect, and the steps for each scenario, built from the configuration and measured figures.

:func:`build_plan` is pure (config + drill history + the size of a restore of the newest
point -> document); :func:`render_plan` turns it into text. The restore-time estimate is
the last successful drill's throughput (bytes read per second of restore) applied to what a
restore of the newest point reads now; without a drill it falls back to the planner's
static estimate and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from replicator.config import Config


def _cmd(config_arg: str, *args: str) -> str:
    return " ".join(["replicator", *([config_arg] if config_arg else []), *args])


def scenarios(cfg: Config, config_arg: str) -> list[dict[str, Any]]:
    """Each disaster scenario of the seed and its steps (exact commands)."""
    remote = next((d for d in cfg.destinations), None)
    dr_name = remote.name if remote else None

    def c(*a: str) -> str:
        return _cmd(config_arg, *a)

    total = [
        "Provision a machine with Python >= 3.11 and replicator installed; copy the "
        "configuration (and the encryption key file, if encryption is on).",
        *([f"Point [store] url at the surviving copy ({dr_name}: {remote.url}), or seed a "
           f"new primary: replicator mirror --from '{remote.url}' --to <new store> --verify"]
          if remote else
          ["Point [store] url at the surviving backup (the primary store must be outside "
           "the lost machine; configure a [[destinations]] entry so it is)."]),
        c("backups", "list") + "   # the restorable window",
        c("restore", "--at", "latest", "--target", "'postgresql://app@db/app'",
          "--swap-into", "public"),
        "Start the service again (replicator run): it resumes every partition from the store "
        "and only re-reads from Kafka what the store lacks.",
        c("drill") + "   # prove the new site restores",
    ]
    corruption = [
        c("history", "<entity>", "<key>") + "   # find when the bad change arrived",
        c("restore", "--at", "<time just before it>", "--target",
          "'postgresql://app@db/app?schema=before_incident'"),
        "Compare before_incident with the live schema (the restore printed its digests; "
        "check the rows you care about).",
        c("restore", "--at", "<time just before it>", "--target",
          "'postgresql://app@db/app'", "--swap-into", "public") +
        "   # atomic swap; the old schema is kept as public_replaced_<id>",
    ]
    partial = [
        c("restore", "--at", "<time>", "--entities", "participant", "--target",
          "'postgresql://app@db/app?schema=participant_fix'"),
        c("restore", "--at", "<time>", "--entities", "attendance", "--keys", "<k1,k2>",
          "--target", "sqlite:///tmp/keys.db") + "   # a few records",
        c("get", "<entity>", "<key>", "--at", "<time>") + "   # one record, nothing written",
    ]
    in_data_dir = not cfg.store.url or ("://" not in cfg.store_url and str(
        cfg.store_url).startswith(str(cfg.ingest.data_dir)))
    own_disk = [
        *(["The primary store lies inside ingest.data_dir: the lost disk held it too. "
           "Follow 'total loss' from a destination first."] if in_data_dir else []),
        "Events not yet fsync'd were never acknowledged to Kafka (offsets are committed "
        "only up to durable records): nothing acknowledged is lost.",
        "Give the service an empty ingest.data_dir and start it (replicator run): every "
        "partition resumes from the store's segments, the rest is re-read from Kafka.",
        c("verify") + "   # checksums and offset continuity of the store",
        c("status") + "   # lag back to 0, RPO met",
    ]
    dest_lost = [
        "Create the replacement (bucket or directory) and keep the same [[destinations]] "
        "entry (or change its url).",
        _cmd("", "mirror", "--from", f"'{cfg.store_url}'", "--to", "<destination url>",
             "--verify", "--create-bucket"),
        "Restart the service (or wait: destinations reconcile every 30 s and after errors).",
        c("destinations") + "   # backlog 0, RPO met",
    ]
    return [
        {"scenario": "total loss", "steps": total},
        {"scenario": "data corruption", "steps": corruption},
        {"scenario": "partial loss (one entity or some keys)", "steps": partial},
        {"scenario": "the replicator lost its disk", "steps": own_disk},
        {"scenario": "a destination was lost", "steps": dest_lost},
    ]


def build_plan(cfg: Config, drills: Sequence[dict[str, Any]], *, restore_bytes: int | None,
               static_estimate_s: float | None, config_arg: str = "") -> dict[str, Any]:
    """The plan document (see the module docstring for the estimate)."""
    good = [d for d in drills if d.get("ok") and d.get("rto_s") and d.get("bytes_read")]
    last = good[-1] if good else None
    estimate: dict[str, Any]
    if last is not None and restore_bytes is not None:
        rate = last["bytes_read"] / last["rto_s"]
        seconds = restore_bytes / rate if rate > 0 else None
        estimate = {"seconds": None if seconds is None else round(seconds, 1),
                    "basis": f"drill {last['id']}: {rate / 1e6:.2f} MB/s over "
                             f"{last['bytes_read']:,} bytes"}
    else:
        estimate = {"seconds": None if static_estimate_s is None
                    else round(static_estimate_s, 1),
                    "basis": "planner estimate (no successful drill yet: run replicator "
                             "drill)"}
    secs = estimate["seconds"]
    estimate["restore_bytes"] = restore_bytes
    estimate["meets_rto"] = None if secs is None else secs <= cfg.objectives.rto_s
    comp, ret = cfg.compaction, cfg.retention
    return {
        "objectives": {"rpo_s": cfg.objectives.rpo_s, "rto_s": cfg.objectives.rto_s},
        "schedule": {
            "group_commit_ms": cfg.ingest.flush_interval_ms,
            "segment_seal_s": cfg.ingest.seal_age_s,
            "snapshots": {"enabled": comp.enabled, "incremental_s": comp.incremental_s,
                          "differential_s": comp.differential_s, "full_s": comp.full_s,
                          "archive_s": comp.archive_s},
            "retention": {"enabled": ret.enabled, "segments_days": ret.segments_days,
                          "archive_after_days": ret.archive_after_days,
                          "archive_delete_days": ret.archive_delete_days,
                          "archive_tier": ret.archive_url or "archive/ prefix of the store"},
            "drills": {"enabled": cfg.drill.enabled, "interval_s": cfg.drill.interval_s,
                       "at": cfg.drill.at},
        },
        "destinations": [{"name": "primary", "url": cfg.store_url, "required": True}] + [
            {"name": d.name, "url": d.url, "required": d.required} for d in cfg.destinations],
        "encryption": cfg.encryption.enabled,
        "restore_estimate": estimate,
        "last_drill": None if not drills else {
            k: drills[-1].get(k) for k in ("id", "time", "ok", "rto_extrapolated_s", "rpo_s")},
        "warnings": _warnings(cfg, drills),
        "scenarios": scenarios(cfg, config_arg),
    }


def _warnings(cfg: Config, drills: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    if not cfg.destinations:
        out.append("no [[destinations]]: the only copy is the primary store "
                   f"({cfg.store_url}); a total loss of its disk loses the backup")
    if not drills:
        out.append("no drill on record: the restore time is an estimate, not a measurement")
    elif not drills[-1].get("ok"):
        out.append(f"the last drill failed: {drills[-1].get('error')}")
    if not cfg.compaction.enabled:
        out.append("snapshots are disabled: a restore replays every retained segment")
    return out


def render_plan(doc: dict[str, Any]) -> str:
    from replicator.ops.drill import fmt_duration as d

    o, s, e = doc["objectives"], doc["schedule"], doc["restore_estimate"]
    lines = ["DISASTER-RECOVERY PLAN", "",
             f"Objectives: RPO {d(o['rpo_s'])}, RTO {d(o['rto_s'])}", "",
             "Backup schedule:",
             f"  durable locally every {s['group_commit_ms']} ms (group commit); segments "
             f"sealed into the store at least every {d(s['segment_seal_s'])}",
             "  snapshots: " + ("off" if not s["snapshots"]["enabled"] else
                                ", ".join(f"{k.removesuffix('_s')} every {d(v)}"
                                          for k, v in s["snapshots"].items()
                                          if k != "enabled")),
             f"  retention: segments {s['retention']['segments_days']:g} days, archive "
             f"after {s['retention']['archive_after_days']:g} days "
             f"({s['retention']['archive_tier']}), deleted after "
             f"{s['retention']['archive_delete_days']:g} days",
             "  drills: " + (f"every {d(s['drills']['interval_s'])} at "
                             f"{s['drills']['at']}" if s["drills"]["enabled"] else "off"),
             "", "Destinations:"]
    for dest in doc["destinations"]:
        lines.append(f"  {dest['name']:<10} "
                     f"{'required' if dest['required'] else 'optional':<9} {dest['url']}")
    secs = e["seconds"]
    lines += ["", "Expected restore time of the newest point: "
              + ("unknown" if secs is None else d(secs))
              + (f" for {e['restore_bytes']:,} bytes" if e["restore_bytes"] else "")
              + f" ({e['basis']})"
              + ("" if e["meets_rto"] is None else
                 " -- within the RTO" if e["meets_rto"] else " -- EXCEEDS THE RTO")]
    for w in doc["warnings"]:
        lines.append(f"WARNING: {w}")
    for sc in doc["scenarios"]:
        lines += ["", f"Scenario: {sc['scenario']}"]
        lines += [f"  {n}. {step}" for n, step in enumerate(sc["steps"], 1)]
    return "\n".join(lines)
