//! The export file's format: its header, its records, and reading it back
//! whole, checked (layout, record count, checksum); the module
//! documentation of `transfer` describes the layout.

use std::fs;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use super::{ExportHeader, ExportSummary, EXPORT_VERSION};
use crate::config::{KeyMode, TimeDomain, MAX_KEY_LEN_LIMIT};
use crate::error::{Error, Result};
use crate::layout::Entry;
use crate::sequence::SourceState;
use crate::Partition;

const MAGIC: &[u8; 8] = b"EXEXPORT";
pub(super) const TAG_ENTRY: u8 = 1;
pub(super) const TAG_SOURCE: u8 = 2;
pub(super) const TAG_END: u8 = 0;

pub(super) fn encode_header(h: &ExportHeader) -> Vec<u8> {
    let mut v = Vec::with_capacity(64 + h.partition.topic().len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&h.version.to_be_bytes());
    v.push(match h.key_mode {
        KeyMode::Raw => 0,
        KeyMode::Hashed => 1,
    });
    v.push(match h.time_domain {
        TimeDomain::ProcessingTime => 0,
        TimeDomain::EventTime => 1,
    });
    let topic = h.partition.topic().as_bytes();
    // Topics are at most 249 bytes (validated by the store).
    v.extend_from_slice(&u16::try_from(topic.len()).unwrap_or(u16::MAX).to_be_bytes());
    v.extend_from_slice(topic);
    v.extend_from_slice(&h.partition.partition().to_be_bytes());
    v.extend_from_slice(&h.offset.unwrap_or(-1).to_be_bytes());
    v.extend_from_slice(&h.epoch.to_be_bytes());
    v.push(u8::from(h.event_time.is_some()) | (u8::from(h.watermark.is_some()) << 1));
    v.extend_from_slice(&h.event_time.unwrap_or(0).to_be_bytes());
    v.extend_from_slice(&h.watermark.unwrap_or(0).to_be_bytes());
    v.extend_from_slice(&h.exported_at.to_be_bytes());
    v
}

pub(super) struct HashingWriter<W: Write> {
    pub(super) inner: W,
    pub(super) hash: Xxh3,
    pub(super) bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(super) fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(b)?;
        self.hash.update(b);
        self.bytes += b.len() as u64;
        Ok(())
    }
}

/// Reads an export file, checking everything, and gives each entry to
/// `visit` (key without tag, entry) as it goes.
pub(super) fn read_file(
    file: &Path,
    progress: &mut dyn FnMut(u64),
    visit: &mut dyn FnMut(Record<'_>) -> Result<()>,
) -> Result<ExportSummary> {
    let f = fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let size = f.metadata().map_err(|e| Error::io(file, e))?.len();
    let mut r = Reader {
        inner: BufReader::new(f),
        hash: Xxh3::new(),
        bytes: 0,
        path: file.to_path_buf(),
    };
    let magic = r.take(8)?;
    if magic != MAGIC {
        return Err(r.bad("it does not start with EXEXPORT (not an export file)"));
    }
    let version = u16::from_be_bytes(r.array()?);
    if version > EXPORT_VERSION || version == 0 {
        return Err(r.bad(&format!(
            "export format version {version}; this build reads up to {EXPORT_VERSION}"
        )));
    }
    let key_mode = match r.byte()? {
        0 => KeyMode::Raw,
        1 => KeyMode::Hashed,
        other => return Err(r.bad(&format!("unknown key mode {other}"))),
    };
    let time_domain = match r.byte()? {
        0 => TimeDomain::ProcessingTime,
        1 => TimeDomain::EventTime,
        other => return Err(r.bad(&format!("unknown time domain {other}"))),
    };
    let topic_len = usize::from(u16::from_be_bytes(r.array()?));
    let topic =
        String::from_utf8(r.take(topic_len)?).map_err(|_| r.bad("the topic is not UTF-8"))?;
    let partition = Partition::new(topic, i32::from_be_bytes(r.array()?));
    partition
        .validate()
        .map_err(|e| r.bad(&format!("the partition is not valid: {e}")))?;
    let offset = i64::from_be_bytes(r.array()?);
    if offset < -1 {
        return Err(r.bad(&format!("negative offset {offset}")));
    }
    let epoch = u64::from_be_bytes(r.array()?);
    let present = r.byte()?;
    let event_time = u64::from_be_bytes(r.array()?);
    let watermark = u64::from_be_bytes(r.array()?);
    let exported_at = u64::from_be_bytes(r.array()?);
    let header = ExportHeader {
        version,
        partition,
        key_mode,
        time_domain,
        offset: (offset >= 0).then_some(offset),
        epoch,
        event_time: (present & 1 != 0).then_some(event_time),
        watermark: (present & 2 != 0).then_some(watermark),
        exported_at,
    };
    let (mut entries, mut marks, mut claims, mut sources) = (0u64, 0u64, 0u64, 0u64);
    loop {
        match r.byte()? {
            TAG_ENTRY => {}
            TAG_SOURCE if version >= 2 => {
                let source_len =
                    usize::try_from(u32::from_be_bytes(r.array()?)).unwrap_or(usize::MAX);
                if source_len == 0 || source_len > MAX_KEY_LEN_LIMIT {
                    return Err(r.bad(&format!("a source of {source_len} bytes")));
                }
                let source = r.take(source_len)?;
                let value_len =
                    usize::try_from(u32::from_be_bytes(r.array()?)).unwrap_or(usize::MAX);
                if value_len > 1 << 16 {
                    return Err(r.bad(&format!("a source state of {value_len} bytes")));
                }
                let value = r.take(value_len)?;
                let state = SourceState::decode(&value).ok_or_else(|| {
                    r.bad(&format!(
                        "source {} has a malformed state",
                        source.escape_ascii()
                    ))
                })?;
                sources += 1;
                visit(Record::Source(&source, state))?;
                continue;
            }
            TAG_END => break,
            other => return Err(r.bad(&format!("unknown record tag {other}"))),
        }
        let key_len = usize::try_from(u32::from_be_bytes(r.array()?)).unwrap_or(usize::MAX);
        if key_len == 0 || key_len > MAX_KEY_LEN_LIMIT {
            return Err(r.bad(&format!("a key of {key_len} bytes")));
        }
        let key = r.take(key_len)?;
        let value_len = usize::from(r.byte()?);
        let value = r.take(value_len)?;
        let entry = Entry::decode(&value)
            .ok_or_else(|| r.bad(&format!("entry {} has a malformed value", entries + 1)))?;
        match entry {
            Entry::Done { .. } => marks += 1,
            Entry::Claimed { .. } => claims += 1,
        }
        entries += 1;
        visit(Record::Entry(&key, entry))?;
        if entries.is_multiple_of(1_024) {
            progress(r.bytes);
        }
    }
    let count = u64::from_be_bytes(r.array()?);
    let computed = r.hash.digest();
    let mut stored = [0u8; 8];
    r.inner
        .read_exact(&mut stored)
        .map_err(|_| r.bad("it is cut short (no checksum)"))?;
    if u64::from_be_bytes(stored) != computed {
        return Err(r.bad("checksum mismatch: the file is damaged"));
    }
    if count != entries + sources {
        return Err(r.bad(&format!(
            "it says {count} records but holds {}",
            entries + sources
        )));
    }
    let mut rest = [0u8; 1];
    if r.inner.read(&mut rest).map_err(|e| Error::io(file, e))? != 0 {
        return Err(r.bad("bytes follow its end"));
    }
    progress(size);
    Ok(ExportSummary {
        header,
        entries,
        marks,
        claims,
        sources,
        bytes: size,
    })
}

/// One record of an export file: an entry (key without its tag), or a
/// sequence source's state.
pub(super) enum Record<'a> {
    Entry(&'a [u8], Entry),
    Source(&'a [u8], SourceState),
}

struct Reader<R: Read> {
    inner: R,
    hash: Xxh3,
    bytes: u64,
    path: PathBuf,
}

impl<R: Read> Reader<R> {
    fn bad(&self, reason: &str) -> Error {
        Error::BadExport {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    fn take(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        let got = (&mut self.inner)
            .take(n as u64)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(&self.path, e))?;
        if got != n {
            return Err(self.bad("it is cut short"));
        }
        self.hash.update(&buf);
        self.bytes += n as u64;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let v = self.take(N)?;
        v.try_into().map_err(|_| self.bad("it is cut short"))
    }

    fn byte(&mut self) -> Result<u8> {
        let [b] = self.array::<1>()?;
        Ok(b)
    }
}
