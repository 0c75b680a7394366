//! The store manifest: a small text file that marks a directory as a store
//! and records the on-disk format version and the options fixed at creation.
//!
//! ```text
//! exactly store
//! format_version = 2
//! key_mode = raw
//! time_domain = processing
//! ledger = required
//! claim_grace_ms = 604800000
//! checksum = 0123456789abcdef
//! ```
//! The checksum is the XXH3-64 of the lines above it, so damage is detected
//! rather than misread.

use std::path::Path;

use crate::config::{KeyMode, TimeDomain};
use crate::durable::{self, seal, unseal};
use crate::error::{Error, Result};

/// File name of the manifest inside the store directory.
pub(crate) const MANIFEST_FILE: &str = "EXACTLY";
/// The on-disk format this build writes and the newest it reads. Version 2
/// adds journal records (a batch's changes logged as one value until a
/// table holds them, `src/journal.rs`): a build of version 1 would not see
/// the marks they hold, so it must refuse such a store. Version 1 stores
/// open, and are upgraded at their first open.
pub(crate) const FORMAT_VERSION: u32 = 2;
const HEADER: &str = "exactly store";

/// What the manifest records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub(crate) format_version: u32,
    pub(crate) key_mode: KeyMode,
    pub(crate) time_domain: TimeDomain,
    /// Whether the store keeps a durability ledger (`EXACTLY-LEDGER`) that
    /// must be present. Stores created before the ledger existed get one, and
    /// this flag, at their first open by a build that knows it.
    pub(crate) ledger_required: bool,
    /// How long past its lease a claim stays on disk and can still be
    /// confirmed: the TTL the store was created with, fixed from then on, so
    /// that a later `ttl` never makes the answer depend on whether
    /// compaction ran. Stores created before it existed get it (from the TTL
    /// of that open) at their first open by a build that knows it.
    pub(crate) claim_grace_ms: Option<u64>,
}

impl Manifest {
    fn body(&self) -> String {
        let mut body = format!(
            "{HEADER}\nformat_version = {}\nkey_mode = {}\ntime_domain = {}\n",
            self.format_version,
            self.key_mode.as_str(),
            self.time_domain.as_str()
        );
        if self.ledger_required {
            body.push_str("ledger = required\n");
        }
        if let Some(grace) = self.claim_grace_ms {
            body.push_str(&format!("claim_grace_ms = {grace}\n"));
        }
        body
    }

    pub(crate) fn encode(&self) -> String {
        seal(&self.body())
    }

    /// Parses a manifest. `Ok(None)` if the text is not a manifest at all
    /// (wrong header); `Err(Corruption)` if it is one but damaged.
    pub(crate) fn decode(text: &[u8]) -> Result<Option<Self>> {
        if !text.starts_with(HEADER.as_bytes()) {
            return Ok(None);
        }
        let corrupt = |what: &str| Error::Corruption(format!("store manifest: {what}"));
        let body = unseal(text, "store manifest")?;
        let mut format_version = None;
        let mut key_mode = None;
        // Absent in manifests written before time domains existed.
        let mut time_domain = Some(TimeDomain::ProcessingTime);
        let mut ledger_required = false;
        let mut claim_grace_ms = None;
        for line in body.lines().skip(1) {
            match line.split_once(" = ") {
                Some(("format_version", v)) => format_version = v.parse().ok(),
                Some(("key_mode", v)) => key_mode = KeyMode::parse(v),
                Some(("time_domain", v)) => time_domain = TimeDomain::parse(v),
                Some(("ledger", v)) => ledger_required = v == "required",
                Some(("claim_grace_ms", v)) => {
                    claim_grace_ms = Some(v.parse().map_err(|_| corrupt("bad claim_grace_ms"))?);
                }
                // Unknown fields may come from a newer format; the version check decides.
                _ => {}
            }
        }
        let format_version = format_version.ok_or_else(|| corrupt("no format_version"))?;
        if format_version > FORMAT_VERSION {
            return Err(Error::UnsupportedFormat {
                found: format_version,
                supported: FORMAT_VERSION,
            });
        }
        let key_mode = key_mode.ok_or_else(|| corrupt("no valid key_mode"))?;
        let time_domain = time_domain.ok_or_else(|| corrupt("no valid time_domain"))?;
        Ok(Some(Self {
            format_version,
            key_mode,
            time_domain,
            ledger_required,
            claim_grace_ms,
        }))
    }

    /// Reads the manifest of `dir`; `Ok(None)` if there is none.
    pub(crate) fn read(dir: &Path) -> Result<Option<Self>> {
        let Some(text) = durable::read_if_exists(&dir.join(MANIFEST_FILE))? else {
            return Ok(None);
        };
        match Self::decode(&text)? {
            Some(m) => Ok(Some(m)),
            None => Err(Error::NotAStore {
                path: dir.to_path_buf(),
            }),
        }
    }

    /// Writes the manifest durably (see [`durable::replace`]).
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        durable::replace(
            &dir.join(MANIFEST_FILE),
            &dir.join(format!("{MANIFEST_FILE}.tmp")),
            self.encode().as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            key_mode: KeyMode::Hashed,
            time_domain: TimeDomain::EventTime,
            ledger_required: true,
            claim_grace_ms: Some(3_600_000),
        }
    }

    #[test]
    fn round_trips() {
        let m = manifest();
        assert_eq!(Manifest::decode(m.encode().as_bytes()).unwrap(), Some(m));
    }

    #[test]
    fn foreign_text_is_not_a_manifest() {
        assert_eq!(Manifest::decode(b"hello").unwrap(), None);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let text = manifest().encode().into_bytes();
        for i in HEADER.len()..text.len() {
            let mut damaged = text.clone();
            damaged[i] ^= 0x04;
            assert!(
                matches!(
                    Manifest::decode(&damaged),
                    Err(Error::Corruption(_) | Error::UnsupportedFormat { .. })
                ),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn newer_format_is_refused() {
        let body = format!("{HEADER}\nformat_version = 9\nkey_mode = raw\n");
        let text = seal(&body);
        assert!(matches!(
            Manifest::decode(text.as_bytes()),
            Err(Error::UnsupportedFormat {
                found: 9,
                supported: FORMAT_VERSION
            })
        ));
    }
}
