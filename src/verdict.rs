//! The answer to "already processed?".

/// The answer to "already processed?".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The key has no live mark: process the message.
    New,
    /// The key was marked and its mark has not expired: skip the message.
    Duplicate,
}
