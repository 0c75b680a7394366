//! The commands that only read: `stats`, `check`, `inspect`.

use std::io::BufRead;
use std::path::Path;

use exactly::internals::inspect::{self, EntryState, Lookup, PartitionMeta};
use exactly::{KeyMode, Partition, Store};
use serde_json::{json, Value};

use crate::{open, out, Ctx, Failure, Outcome};

/// Live marks and claims of a partition, counted by a scan.
fn count_live(store: &Store, meta: &PartitionMeta) -> exactly::Result<(u64, u64)> {
    let clock_now = inspect::now(store);
    let partition_now = inspect::partition_now(store, meta);
    let (mut marks, mut claims) = (0, 0);
    inspect::for_each_entry(store, &meta.partition, |e| {
        match inspect::judge(Some(e.state), partition_now, clock_now) {
            Lookup::Duplicate { .. } => marks += 1,
            Lookup::InFlight { .. } => claims += 1,
            Lookup::New => {}
        }
        Ok(true)
    })?;
    Ok((marks, claims))
}

pub(crate) fn stats(ctx: &Ctx, dir: &Path, exact: bool) -> Outcome {
    let (store, info) = open(dir)?;
    let now = inspect::now(&store);
    let partitions = inspect::partitions(&store);
    let bar = out::bar(ctx, partitions.len() as u64, "partitions");
    let mut rows = Vec::new();
    for p in &partitions {
        let Some(meta) = inspect::partition_meta(&store, p)? else {
            continue;
        };
        let (marks, claims) = if exact {
            let (m, c) = count_live(&store, &meta)?;
            (m, Some(c))
        } else {
            (meta.keys_estimate, None)
        };
        let filter_bytes = inspect::snapshot_filter_bytes(&store, &meta);
        rows.push((meta, marks, claims, filter_bytes));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let ledger = info.ledger;
    if ctx.json {
        let parts: Vec<Value> = rows
            .iter()
            .map(|(m, marks, claims, fb)| {
                json!({
                    "topic": m.partition.topic(),
                    "partition": m.partition.partition(),
                    "committed_offset": m.offset,
                    "epoch": m.epoch,
                    "live_marks": marks,
                    "live_marks_exact": exact,
                    "claims": claims,
                    "event_time": m.event_time,
                    "watermark": m.watermark,
                    "filter_snapshot": m.snapshot_id.map(|id| format!("{id:016x}")),
                    "filter_bytes": fb,
                    "filter_bits_per_key": fb.map(|b| bits_per_key(b, *marks)),
                    "disk_bytes": m.disk_bytes,
                })
            })
            .collect();
        out::json(&json!({
            "store": {
                "path": dir.display().to_string(),
                "format_version": info.format_version,
                "key_mode": key_mode(info.key_mode),
                "time_domain": format!("{:?}", info.time_domain),
                "claim_grace_ms": info.claim_grace_ms,
                "now_ms": now,
                "ledger": ledger.map(|l| json!({
                    "sequence": l.sequence, "clock_ms": l.clock, "manifest": l.manifest,
                })),
            },
            "partitions": parts,
        }));
        return Ok(());
    }
    let mut t = out::table(&["store", ""]);
    t.add_row(vec!["path".to_string(), dir.display().to_string()]);
    t.add_row(vec![
        "format version".to_string(),
        info.format_version.to_string(),
    ]);
    t.add_row(vec![
        "key mode".to_string(),
        key_mode(info.key_mode).to_string(),
    ]);
    t.add_row(vec![
        "time domain".to_string(),
        format!("{:?}", info.time_domain),
    ]);
    t.add_row(vec![
        "claim grace".to_string(),
        info.claim_grace_ms.map_or("-".into(), |g| {
            humantime::format_duration(std::time::Duration::from_millis(g)).to_string()
        }),
    ]);
    t.add_row(vec!["store time".to_string(), out::time(now)]);
    if let Some(l) = ledger {
        t.add_row(vec![
            "ledger".to_string(),
            format!(
                "sequence {} durable, clock {}, MANIFEST-{:06}",
                l.sequence,
                out::time(l.clock),
                l.manifest
            ),
        ]);
    }
    println!("{t}");
    let marks_header = if exact {
        "live marks"
    } else {
        "keys (estimate)"
    };
    let mut t = out::table(&[
        "partition",
        "offset",
        "epoch",
        marks_header,
        "claims",
        "filter bits/key",
        "disk bytes",
    ]);
    for (m, marks, claims, fb) in &rows {
        t.add_row(vec![
            m.partition.to_string(),
            m.offset.map_or("-".into(), |o| o.to_string()),
            m.epoch.to_string(),
            marks.to_string(),
            claims.map_or("-".into(), |c| c.to_string()),
            fb.map_or("- (no snapshot)".into(), |b| {
                format!("{:.1}", bits_per_key(b, *marks))
            }),
            m.disk_bytes.to_string(),
        ]);
    }
    println!("{t}");
    if !exact {
        println!("(keys: RocksDB's estimate, expired marks included; --exact counts live marks and claims)");
    }
    Ok(())
}

fn bits_per_key(bytes: usize, keys: u64) -> f64 {
    (bytes as f64 * 8.0) / (keys.max(1) as f64)
}

fn key_mode(mode: KeyMode) -> &'static str {
    match mode {
        KeyMode::Raw => "raw",
        _ => "hashed",
    }
}

pub(crate) fn check(
    ctx: &Ctx,
    dir: &Path,
    partition: &Partition,
    key: Option<String>,
    hashed: bool,
    stdin: bool,
) -> Outcome {
    let keys: Vec<String> = match (key, stdin) {
        (Some(k), false) => vec![k],
        (None, true) => std::io::stdin()
            .lock()
            .lines()
            .collect::<Result<_, _>>()
            .map_err(|e| Failure::Found(format!("reading standard input: {e}")))?,
        (Some(_), true) => return Err(Failure::Found("give a KEY or --stdin, not both".into())),
        (None, false) => return Err(Failure::Found("give a KEY, or --stdin".into())),
    };
    let (store, info) = open(dir)?;
    if hashed && info.key_mode != KeyMode::Hashed {
        return Err(Failure::Found(
            "--hashed: this store keeps raw keys; give the key itself".into(),
        ));
    }
    let meta = inspect::partition_meta(&store, partition)?;
    let now = inspect::now(&store);
    let partition_now = meta
        .as_ref()
        .map_or(now, |m| inspect::partition_now(&store, m));
    let mut answers = Vec::new();
    for k in keys.iter().filter(|k| !k.is_empty() || !stdin) {
        let stored = if hashed {
            out::parse_hash(k)
                .ok_or_else(|| Failure::Found(format!("--hashed: {k:?} is not 32 hex digits")))?
        } else {
            let raw = out::parse_key(k)
                .ok_or_else(|| Failure::Found(format!("{k:?}: bad hex after hex:")))?;
            inspect::stored_key(&store, &raw)?
        };
        let state = match meta {
            Some(_) => inspect::read_stored(&store, partition, &stored)?,
            None => None,
        };
        answers.push((k, inspect::judge(state, partition_now, now)));
    }
    if ctx.json {
        let v: Vec<Value> = answers
            .iter()
            .map(|(k, a)| match a {
                Lookup::New => json!({"key": k, "verdict": "new"}),
                Lookup::Duplicate { expires_at } => json!({
                    "key": k, "verdict": "duplicate",
                    "expires_at_ms": expires_at, "expires_at": out::time(*expires_at),
                }),
                Lookup::InFlight { lease_until, epoch } => json!({
                    "key": k, "verdict": "in_flight", "epoch": epoch,
                    "expires_at_ms": lease_until, "expires_at": out::time(*lease_until),
                }),
            })
            .collect();
        out::json(&json!({ "partition": partition.to_string(), "now_ms": now, "keys": v }));
        return Ok(());
    }
    let mut t = out::table(&["key", "verdict", "until"]);
    for (k, a) in &answers {
        let (verdict, until) = match a {
            Lookup::New => ("New".to_string(), "-".to_string()),
            Lookup::Duplicate { expires_at } => (
                "Duplicate".to_string(),
                out::when(*expires_at, partition_now),
            ),
            Lookup::InFlight { lease_until, epoch } => (
                format!("InFlight (epoch {epoch})"),
                out::when(*lease_until, now),
            ),
        };
        t.add_row(vec![k.to_string(), verdict, until]);
    }
    println!("{t}");
    Ok(())
}

pub(crate) fn inspect(ctx: &Ctx, dir: &Path, partition: &Partition, limit: u64) -> Outcome {
    let (store, info) = open(dir)?;
    let Some(meta) = inspect::partition_meta(&store, partition)? else {
        return Err(Failure::Found(format!(
            "{partition} has no data in this store"
        )));
    };
    let now = inspect::now(&store);
    let partition_now = inspect::partition_now(&store, &meta);
    let mut entries = Vec::new();
    let mut total = 0u64;
    inspect::for_each_entry(&store, partition, |e| {
        total += 1;
        if (entries.len() as u64) < limit {
            entries.push(e);
        }
        Ok(true)
    })?;
    let live = |s: EntryState| !matches!(inspect::judge(Some(s), partition_now, now), Lookup::New);
    if ctx.json {
        let v: Vec<Value> = entries
            .iter()
            .map(|e| {
                let key = out::key(info.key_mode, &e.key);
                match e.state {
                    EntryState::Done { expires_at } => json!({
                        "key": key, "state": "done", "live": live(e.state),
                        "expires_at_ms": expires_at, "expires_at": out::time(expires_at),
                    }),
                    EntryState::Claimed {
                        lease_until,
                        epoch,
                        token,
                    } => json!({
                        "key": key, "state": "claimed", "live": live(e.state), "epoch": epoch,
                        "token": token, "expires_at_ms": lease_until,
                        "expires_at": out::time(lease_until),
                    }),
                }
            })
            .collect();
        out::json(&json!({
            "partition": partition.to_string(),
            "committed_offset": meta.offset,
            "epoch": meta.epoch,
            "now_ms": now,
            "entries_total": total,
            "entries": v,
        }));
        return Ok(());
    }
    println!(
        "{partition}: offset {}, epoch {}, {total} entries on disk (showing {})",
        meta.offset.map_or("-".into(), |o| o.to_string()),
        meta.epoch,
        entries.len()
    );
    let mut t = out::table(&["key", "state", "expires"]);
    for e in &entries {
        let (state, at, base) = match e.state {
            EntryState::Done { expires_at } => ("done".to_string(), expires_at, partition_now),
            EntryState::Claimed {
                lease_until, epoch, ..
            } => (format!("claimed (epoch {epoch})"), lease_until, now),
        };
        let state = if live(e.state) {
            state
        } else {
            format!("{state}, expired")
        };
        t.add_row(vec![
            out::key(info.key_mode, &e.key),
            state,
            out::when(at, base),
        ]);
    }
    println!("{t}");
    Ok(())
}
