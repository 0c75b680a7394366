//! `exactly`: look inside a store and operate it from the shell (feature
//! `cli`). Human tables by default, `--json` for scripts; progress bars on
//! standard error when it is a terminal. See `docs/operations.md`.
//!
//! Every command opens the store with its exclusive lock, as a consumer
//! does, and refuses a store that a running consumer holds (`Locked`); see
//! `docs/operations.md` for why there is no read-only mode next to a
//! running writer.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]

// The examples' helpers (generator, keys, CPU time), which the comparison
// harness shares with `examples/compare.rs`.
#[path = "../../../examples/common/mod.rs"]
mod common;
mod compare;
mod compare_redis;
mod maintain;
mod out;
mod read;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use exactly::internals::inspect::{self, StoreInfo};
use exactly::{Error, Options, Partition, Store};

#[derive(Parser)]
#[command(
    name = "exactly",
    version,
    about = "Inspect and operate an exactly dedup store",
    long_about = "Inspect and operate an exactly dedup store. Every command takes the store's \
                  lock: stop the consumer that holds it first."
)]
struct Cli {
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per partition: offset, epoch, live marks, claims, filter, disk; and the store's manifest and ledger.
    Stats {
        /// The store directory.
        dir: PathBuf,
        /// Count live marks and claims exactly (scans every partition) instead of RocksDB's estimate.
        #[arg(long)]
        exact: bool,
    },
    /// Whether keys were processed: New, Duplicate or InFlight, with the expiry.
    Check {
        /// The store directory.
        dir: PathBuf,
        /// The topic.
        topic: String,
        /// The partition number.
        partition: i32,
        /// The key (omit with --stdin); `hex:` and hex digits for a key that is not text, as `inspect` shows it.
        key: Option<String>,
        /// The key is given as the 32 hex digits of its stored hash (hashed stores; as `inspect` shows it).
        #[arg(long)]
        hashed: bool,
        /// Read keys from standard input, one per line.
        #[arg(long)]
        stdin: bool,
    },
    /// A partition's marks and claims, with their expiry.
    Inspect {
        /// The store directory.
        dir: PathBuf,
        /// The topic.
        topic: String,
        /// The partition number.
        partition: i32,
        /// Show at most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Write a partition's marks, claims and offset to a file.
    Export {
        /// The store directory.
        dir: PathBuf,
        /// The topic.
        topic: String,
        /// The partition number.
        partition: i32,
        /// The export file to write.
        file: PathBuf,
    },
    /// Merge an export file into a store: never lowers an offset or an epoch, keeps the later expiry.
    Import {
        /// The store directory (created if missing).
        dir: PathBuf,
        /// The export file.
        file: PathBuf,
        /// Import into this topic instead of the exported one.
        #[arg(long, requires = "to_partition")]
        to_topic: Option<String>,
        /// Import into this partition number instead of the exported one.
        #[arg(long, requires = "to_topic")]
        to_partition: Option<i32>,
    },
    /// Check the store's health; exit status 0 only when healthy.
    Verify {
        /// The store directory.
        dir: PathBuf,
    },
    /// Drop expired marks from disk now and report what was dropped.
    Compact {
        /// The store directory.
        dir: PathBuf,
        /// Only this topic's partition (with PARTITION).
        #[arg(requires = "partition")]
        topic: Option<String>,
        /// Only this partition number.
        partition: Option<i32>,
    },
    /// Run the comparison harness (the rows of `examples/compare.rs`) on this machine.
    Bench {
        /// Messages in the generated stream.
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        /// Only these rows, comma-separated (e.g. exactly-batch,naive-rocksdb).
        #[arg(long)]
        only: Option<String>,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// What a command reports when it fails.
pub(crate) enum Failure {
    /// A store or file error.
    Store(Error),
    /// The command ran and found a problem (an unhealthy store, bad input).
    Found(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Self::Store(e)
    }
}

pub(crate) type Outcome = Result<(), Failure>;

/// Settings every command shares.
pub(crate) struct Ctx {
    pub(crate) json: bool,
    pub(crate) quiet: bool,
}

/// Opens an existing store (never creates one) with its lock.
pub(crate) fn open(dir: &std::path::Path) -> Result<(Store, StoreInfo), Failure> {
    Ok(inspect::open_existing(dir, Options::default())?)
}

/// A partition from the command line, validated.
pub(crate) fn partition(topic: &str, number: i32) -> Partition {
    Partition::new(topic, number)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ctx = Ctx {
        json: cli.json,
        quiet: cli.quiet,
    };
    let outcome = match cli.command {
        Command::Stats { dir, exact } => read::stats(&ctx, &dir, exact),
        Command::Check {
            dir,
            topic,
            partition: n,
            key,
            hashed,
            stdin,
        } => read::check(&ctx, &dir, &partition(&topic, n), key, hashed, stdin),
        Command::Inspect {
            dir,
            topic,
            partition: n,
            limit,
        } => read::inspect(&ctx, &dir, &partition(&topic, n), limit),
        Command::Export {
            dir,
            topic,
            partition: n,
            file,
        } => transfer::export(&ctx, &dir, &partition(&topic, n), &file),
        Command::Import {
            dir,
            file,
            to_topic,
            to_partition,
        } => {
            let to = to_topic.zip(to_partition).map(|(t, n)| partition(&t, n));
            transfer::import(&ctx, &dir, &file, to.as_ref())
        }
        Command::Verify { dir } => maintain::verify(&ctx, &dir),
        Command::Compact {
            dir,
            topic,
            partition: n,
        } => {
            let only = topic.zip(n).map(|(t, n)| partition(&t, n));
            maintain::compact(&ctx, &dir, only.as_ref())
        }
        Command::Bench {
            messages,
            only,
            out,
        } => maintain::bench(&ctx, messages, only, out),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Found(message)) => {
            eprintln!("exactly: {message}");
            ExitCode::FAILURE
        }
        Err(Failure::Store(e)) => {
            eprintln!("exactly: {}", explain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error in plain words, with what to do about it.
fn explain(e: &Error) -> String {
    match e {
        Error::Locked { path } => format!(
            "the store at {} is locked: another process (a running consumer?) has it open. \
             This tool opens a store only with its lock, never beside a running writer; stop \
             the consumer, or run the command on a copy of the directory taken while it was \
             stopped",
            path.display()
        ),
        Error::NotAStore { path } => format!(
            "{} is not an exactly store (it has no EXACTLY manifest); this tool never creates one",
            path.display()
        ),
        other => other.to_string(),
    }
}
