//! Output: keys, times and tables for people, progress bars.

use std::time::{Duration, UNIX_EPOCH};

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use exactly::KeyMode;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::Ctx;

/// A stored key for people: the key itself when it is printable (raw
/// stores), else `hex:` and its bytes; the hash in hex in hashed stores.
pub(crate) fn key(mode: KeyMode, stored: &[u8]) -> String {
    let printable = stored.iter().all(|b| b.is_ascii_graphic() || *b == b' ');
    match mode {
        KeyMode::Raw if printable => String::from_utf8_lossy(stored).into_owned(),
        KeyMode::Raw => format!("hex:{}", hex(stored)),
        _ => hex(stored),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses hex digits into bytes.
pub(crate) fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| {
            s.get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

/// Parses 32 hex digits (a stored hash).
pub(crate) fn parse_hash(s: &str) -> Option<Vec<u8>> {
    parse_hex(s).filter(|h| h.len() == 16)
}

/// A key from the command line: `hex:` and hex digits for a key that is
/// not text (as [`key`] shows one), else the text itself.
pub(crate) fn parse_key(s: &str) -> Option<Vec<u8>> {
    match s.strip_prefix("hex:") {
        Some(h) => parse_hex(h),
        None => Some(s.as_bytes().to_vec()),
    }
}

/// A time in ms since the Unix epoch, in RFC 3339 (UTC).
pub(crate) fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `ms` relative to `now`: "in 59m 59s", "1h ago".
pub(crate) fn relative(ms: u64, now: u64) -> String {
    let secs = |d: u64| humantime::format_duration(Duration::from_secs(d / 1_000)).to_string();
    if ms >= now {
        format!("in {}", secs(ms - now))
    } else {
        format!("{} ago", secs(now - ms))
    }
}

/// `ms` as a time and relative to `now`.
pub(crate) fn when(ms: u64, now: u64) -> String {
    format!("{} ({})", time(ms), relative(ms, now))
}

/// A table with a header row.
pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(header.iter().copied());
    t
}

/// A progress bar of `len` units on standard error, hidden with `--quiet`,
/// with `--json` and when standard error is not a terminal.
pub(crate) fn bar(ctx: &Ctx, len: u64, what: &str) -> ProgressBar {
    if ctx.quiet || ctx.json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({eta})") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// A progress bar of bytes.
pub(crate) fn byte_bar(ctx: &Ctx, len: u64, what: &str) -> ProgressBar {
    let bar = bar(ctx, len, what);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {bytes}/{total_bytes} ({eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Prints a JSON value.
pub(crate) fn json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}
