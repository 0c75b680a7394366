//! `export` and `import`.

use std::path::Path;

use exactly::internals::inspect;
use exactly::internals::transfer::{self, ExportSummary};
use exactly::{Error, Options, Partition, Store};
use serde_json::json;

use crate::{open, out, Ctx, Outcome};

pub(crate) fn export(ctx: &Ctx, dir: &Path, partition: &Partition, file: &Path) -> Outcome {
    let (store, _) = open(dir)?;
    let estimate = inspect::partition_meta(&store, partition)?.map_or(0, |m| m.keys_estimate);
    let bar = out::bar(ctx, estimate, "exporting");
    let summary = transfer::export(&store, partition, file, &mut |n| bar.set_position(n));
    bar.finish_and_clear();
    let summary = summary.map_err(|e| match e {
        Error::NotAssigned(p) => Error::InvalidPartition {
            partition: p.to_string(),
            reason: "the store has no data for this partition",
        },
        other => other,
    })?;
    store.close()?;
    report(ctx, "exported", &summary, file);
    Ok(())
}

fn report(ctx: &Ctx, verb: &str, s: &ExportSummary, file: &Path) {
    let h = &s.header;
    if ctx.json {
        out::json(&json!({
            verb: file.display().to_string(),
            "topic": h.partition.topic(),
            "partition": h.partition.partition(),
            "format_version": h.version,
            "entries": s.entries,
            "marks": s.marks,
            "claims": s.claims,
            "sources": s.sources,
            "committed_offset": h.offset,
            "epoch": h.epoch,
            "bytes": s.bytes,
        }));
    } else {
        println!(
            "{verb} {}: {} entries ({} marks, {} claims), {} sources, offset {}, epoch {}, {} bytes: {}",
            h.partition,
            s.entries,
            s.marks,
            s.claims,
            s.sources,
            h.offset.map_or("-".into(), |o| o.to_string()),
            h.epoch,
            s.bytes,
            file.display()
        );
    }
}

/// Whether `dir` is missing or an empty directory: import creates a store
/// there.
fn is_fresh(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

pub(crate) fn import(ctx: &Ctx, dir: &Path, file: &Path, to: Option<&Partition>) -> Outcome {
    let size = std::fs::metadata(file).map_err(|e| Error::Io {
        path: file.to_path_buf(),
        source: e,
    })?;
    let store = if is_fresh(dir) {
        // A new store takes the export's options fixed at creation.
        let header = transfer::read_export(file, &mut |_| {})?.header;
        let options = Options::default()
            .key_mode(header.key_mode)
            .time_domain(header.time_domain);
        Store::open(dir, options)?
    } else {
        open(dir)?.0
    };
    let bar = out::byte_bar(ctx, size.len(), "checking");
    let mut last = 0;
    let summary = transfer::import(&store, file, to, &mut |n| {
        if n < last {
            bar.set_message("applying");
        }
        last = n;
        bar.set_position(n);
    });
    bar.finish_and_clear();
    let summary = summary?;
    store.close()?;
    if ctx.json {
        out::json(&json!({
            "imported": file.display().to_string(),
            "topic": summary.partition.topic(),
            "partition": summary.partition.partition(),
            "entries": summary.file.entries,
            "sources": summary.file.sources,
            "written": summary.written,
            "kept": summary.kept,
            "expired": summary.expired,
            "offset_before": summary.offset.0,
            "offset_after": summary.offset.1,
            "epoch_before": summary.epoch.0,
            "epoch_after": summary.epoch.1,
        }));
    } else {
        let o = |o: Option<i64>| o.map_or("-".into(), |o| o.to_string());
        println!(
            "imported {} into {}: {} entries and {} sources: {} written, {} kept (the store's \
             expire later), {} expired; offset {} -> {}, epoch {} -> {}",
            file.display(),
            summary.partition,
            summary.file.entries,
            summary.file.sources,
            summary.written,
            summary.kept,
            summary.expired,
            o(summary.offset.0),
            o(summary.offset.1),
            summary.epoch.0,
            summary.epoch.1
        );
    }
    Ok(())
}
