//! `verify`, `compact` and `bench`.

use std::path::{Path, PathBuf};

use exactly::internals::inspect::{self, EntryState};
use exactly::internals::verify;
use exactly::{Error, Partition, Store};
use serde_json::{json, Value};

use crate::{open, out, Ctx, Failure, Outcome};

pub(crate) fn verify(ctx: &Ctx, dir: &Path) -> Outcome {
    // A store that fails the checks made at open (manifest, ledger, logs)
    // does not open: that is the finding.
    let (store, _) = match open(dir) {
        Ok(opened) => opened,
        Err(Failure::Store(e @ (Error::Corruption(_) | Error::UnsupportedFormat { .. }))) => {
            if ctx.json {
                out::json(&json!({
                    "healthy": false,
                    "findings": [{"check": "open", "ok": false, "detail": e.to_string()}],
                }));
            }
            return Err(Failure::Found(format!(
                "unhealthy: the store does not open: {e}"
            )));
        }
        Err(other) => return Err(other),
    };
    let total: u64 = inspect::partitions(&store)
        .iter()
        .filter_map(|p| inspect::partition_meta(&store, p).ok().flatten())
        .map(|m| m.keys_estimate)
        .sum();
    let bar = out::bar(ctx, total, "verifying");
    let report = verify::verify(&store, &mut |n| bar.set_position(n));
    bar.finish_and_clear();
    let report = report?;
    store.close()?;
    if ctx.json {
        let findings: Vec<Value> = report
            .findings
            .iter()
            .map(|f| json!({"check": f.check, "ok": f.ok, "detail": f.detail}))
            .collect();
        out::json(&json!({"healthy": report.healthy(), "findings": findings}));
    } else {
        let mut t = out::table(&["check", "", "detail"]);
        for f in &report.findings {
            t.add_row(vec![
                f.check.clone(),
                if f.ok { "ok" } else { "FAILED" }.to_string(),
                f.detail.clone(),
            ]);
        }
        println!("{t}");
    }
    if report.healthy() {
        Ok(())
    } else {
        let failed = report.findings.iter().filter(|f| !f.ok).count();
        Err(Failure::Found(format!("unhealthy: {failed} checks failed")))
    }
}

/// Entries on disk, and how many of them no longer count.
fn census(store: &Store, p: &Partition) -> exactly::Result<(u64, u64, u64)> {
    let Some(meta) = inspect::partition_meta(store, p)? else {
        return Ok((0, 0, 0));
    };
    let now = inspect::now(store);
    let partition_now = inspect::partition_now(store, &meta);
    let (mut marks, mut claims, mut dead) = (0, 0, 0);
    inspect::for_each_entry(store, p, |e| {
        match e.state {
            EntryState::Done { .. } => marks += 1,
            EntryState::Claimed { .. } => claims += 1,
        }
        if !inspect::is_retained(store, e.state, partition_now, now) {
            dead += 1;
        }
        Ok(true)
    })?;
    Ok((marks, claims, dead))
}

pub(crate) fn compact(ctx: &Ctx, dir: &Path, only: Option<&Partition>) -> Outcome {
    let (store, _) = open(dir)?;
    let partitions = match only {
        Some(p) => {
            if inspect::partition_meta(&store, p)?.is_none() {
                return Err(Failure::Found(format!("{p} has no data in this store")));
            }
            vec![p.clone()]
        }
        None => inspect::partitions(&store),
    };
    let bar = out::bar(ctx, partitions.len() as u64, "compacting");
    let mut rows = Vec::new();
    for p in &partitions {
        let disk = |s: &Store| inspect::partition_meta(s, p).map(|m| m.map_or(0, |m| m.disk_bytes));
        let (marks0, claims0, dead) = census(&store, p)?;
        let bytes0 = disk(&store)?;
        inspect::compact(&store, p)?;
        let (marks1, claims1, _) = census(&store, p)?;
        let bytes1 = disk(&store)?;
        rows.push((
            p.clone(),
            marks0,
            marks1,
            claims0,
            claims1,
            dead,
            bytes0,
            bytes1,
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    store.close()?;
    if ctx.json {
        let v: Vec<Value> = rows
            .iter()
            .map(|(p, m0, m1, c0, c1, dead, b0, b1)| {
                json!({
                    "topic": p.topic(), "partition": p.partition(),
                    "marks_dropped": m0.saturating_sub(*m1),
                    "claims_dropped": c0.saturating_sub(*c1),
                    "expired_before": dead,
                    "entries_before": m0 + c0, "entries_after": m1 + c1,
                    "disk_bytes_before": b0, "disk_bytes_after": b1,
                })
            })
            .collect();
        out::json(&json!({ "partitions": v }));
        return Ok(());
    }
    let mut t = out::table(&[
        "partition",
        "marks dropped",
        "claims dropped",
        "entries before -> after",
        "disk bytes before -> after",
    ]);
    for (p, m0, m1, c0, c1, _, b0, b1) in &rows {
        t.add_row(vec![
            p.to_string(),
            m0.saturating_sub(*m1).to_string(),
            c0.saturating_sub(*c1).to_string(),
            format!("{} -> {}", m0 + c0, m1 + c1),
            format!("{b0} -> {b1}"),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub(crate) fn bench(
    ctx: &Ctx,
    messages: u64,
    only: Option<String>,
    out: Option<PathBuf>,
) -> Outcome {
    if ctx.json {
        return Err(Failure::Found(
            "bench prints a table; use --out FILE for its figures as JSON".into(),
        ));
    }
    if messages == 0 {
        return Err(Failure::Found("--messages must be at least 1".into()));
    }
    if let Some(unknown) = only
        .iter()
        .flat_map(|o| o.split(','))
        .find(|name| !crate::compare::ROWS.contains(name))
    {
        return Err(Failure::Found(format!(
            "unknown row {unknown:?}; the rows are {}",
            crate::compare::ROWS.join(", ")
        )));
    }
    let mut args = vec!["--messages".to_string(), messages.to_string()];
    if let Some(only) = only {
        args.extend(["--only".to_string(), only]);
    }
    if let Some(out) = out {
        args.extend(["--json".to_string(), out.display().to_string()]);
    }
    crate::compare::run(args);
    Ok(())
}
