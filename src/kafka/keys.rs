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
}

impl KeySource {
    /// The value of the first header named `name`.
    pub fn header(name: impl Into<String>) -> Self {
        Self::Header(name.into())
    }

    /// The key computed by `f`; `None` means the message has no key.
    pub fn custom<F>(f: F) -> Self
    where
        F: for<'m> Fn(&'m BorrowedMessage<'_>) -> Option<Cow<'m, [u8]>> + Send + 'static,
    {
        Self::Custom(Box::new(f))
    }

    /// The key of `message`, or `None` if it has none (an empty key counts
    /// as none).
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
        }
    }
}

/// What to do with a message that has no idempotency key, or one the store
/// cannot take (empty, or longer than the store's `max_key_len`).
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
