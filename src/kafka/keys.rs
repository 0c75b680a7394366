//! Where a message's idempotency key comes from, and what to do without one.

use std::borrow::Cow;

use rdkafka::message::{BorrowedMessage, Headers, Message};

/// A closure that extracts a message's idempotency key.
pub type KeyFn = dyn for<'m> Fn(&'m BorrowedMessage<'_>) -> Option<Cow<'m, [u8]>> + Send;

/// Where a message's idempotency key comes from.
pub enum KeySource {
    /// The Kafka message key.
    MessageKey,
    /// The value of the first header with this name (e.g. `idempotency-key`).
    Header(String),
    /// A closure, e.g. a field of the payload.
    Custom(Box<KeyFn>),
    /// Sequence mode: the message's source, epoch and sequence number, from
    /// headers. One state per source instead of one mark per message (see
    /// [`Batch::check_sequence`](crate::Batch::check_sequence)); the
    /// handler's key is `source/epoch/sequence`. The claim mode dedups such
    /// messages by that key, one mark per message.
    Sequence(SequenceHeaders),
}

impl KeySource {
    /// The value of the first header named `name`.
    pub fn header(name: impl Into<String>) -> Self {
        Self::Header(name.into())
    }

    /// Sequence mode, reading the headers `headers` names.
    pub fn sequence(headers: SequenceHeaders) -> Self {
        Self::Sequence(headers)
    }

    /// The key computed by `f`; `None` means the message has no key.
    pub fn custom<F>(f: F) -> Self
    where
        F: for<'m> Fn(&'m BorrowedMessage<'_>) -> Option<Cow<'m, [u8]>> + Send + 'static,
    {
        Self::Custom(Box::new(f))
    }

    /// The key of `message`, or `None` if it has none (an empty key counts
    /// as none). Sequence mode: `source/epoch/sequence`, or `None` if a
    /// header is missing or does not parse.
    pub fn extract<'m>(&self, message: &'m BorrowedMessage<'_>) -> Option<Cow<'m, [u8]>> {
        let key = match self {
            Self::MessageKey => message.key().map(Cow::Borrowed),
            Self::Header(name) => message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == name.as_str())
                    .and_then(|h| h.value)
                    .map(Cow::Borrowed)
            }),
            Self::Custom(f) => f(message),
            Self::Sequence(h) => h.read(message).map(|id| Cow::Owned(id.key())),
        };
        key.filter(|k| !k.is_empty())
    }
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MessageKey => f.write_str("MessageKey"),
            Self::Header(name) => f.debug_tuple("Header").field(name).finish(),
            Self::Custom(_) => f.write_str("Custom(..)"),
            Self::Sequence(h) => f.debug_tuple("Sequence").field(h).finish(),
        }
    }
}

/// Where sequence mode finds a message's source id, epoch and sequence
/// number: headers, the numbers in decimal ASCII (`"42"`). Without an epoch
/// header every message is of epoch 0.
///
/// ```
/// use exactly::kafka::{KeySource, SequenceHeaders};
///
/// let keys = KeySource::sequence(
///     SequenceHeaders::new("producer-id", "sequence").epoch("producer-epoch"),
/// );
/// # let _ = keys;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceHeaders {
    source: String,
    sequence: String,
    epoch: Option<String>,
}

impl SequenceHeaders {
    /// The source id from header `source`, the sequence number from header
    /// `sequence`.
    pub fn new(source: impl Into<String>, sequence: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            sequence: sequence.into(),
            epoch: None,
        }
    }

    /// The source's epoch from header `name` (a producer restarted with a
    /// higher epoch starts its numbers afresh; a lower one is fenced).
    #[must_use]
    pub fn epoch(mut self, name: impl Into<String>) -> Self {
        self.epoch = Some(name.into());
        self
    }

    /// The message's source, epoch and number; `None` if a header is
    /// missing, the source is empty, or a number does not parse.
    pub(super) fn read<'m>(&self, m: &'m BorrowedMessage<'_>) -> Option<SequenceId<'m>> {
        let headers = m.headers()?;
        let header = |name: &str| headers.iter().find(|h| h.key == name).and_then(|h| h.value);
        let number =
            |name: &str| -> Option<u64> { std::str::from_utf8(header(name)?).ok()?.parse().ok() };
        let source = header(&self.source).filter(|s| !s.is_empty())?;
        let seq = number(&self.sequence)?;
        let epoch = match &self.epoch {
            Some(name) => number(name)?,
            None => 0,
        };
        Some(SequenceId { source, epoch, seq })
    }
}

/// A message's place in its source's sequence.
#[derive(Debug, Clone, Copy)]
pub(super) struct SequenceId<'m> {
    pub(super) source: &'m [u8],
    pub(super) epoch: u64,
    pub(super) seq: u64,
}

impl SequenceId<'_> {
    /// The message's idempotency key for the handler: `source/epoch/seq`.
    pub(super) fn key(&self) -> Vec<u8> {
        let mut k = self.source.to_vec();
        k.extend_from_slice(format!("/{}/{}", self.epoch, self.seq).as_bytes());
        k
    }
}

/// What to do with a message that has no idempotency key, or one the store
/// cannot take (empty, or longer than the store's `max_key_len`); in
/// sequence mode, one without the headers or whose numbers do not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingKey {
    /// Call the handler (with `None` as the key) without deduplication:
    /// such messages are processed at least once.
    Process,
    /// Skip the message without calling the handler.
    Skip,
    /// Stop with [`ConsumeError::MissingKey`](super::ConsumeError::MissingKey) (the default). The messages
    /// before it are committed; the consumer is positioned at it.
    #[default]
    Fail,
}
