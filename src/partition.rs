//! Kafka partitions: the unit of sharding.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Longest Kafka topic name.
const MAX_TOPIC_LEN: usize = 249;
/// Prefix of the column family that holds a partition's shard.
const CF_PREFIX: &str = "p/";

/// A Kafka topic and partition number: the unit a consumer group assigns, and
/// the unit the store shards by.
///
/// Construction never fails; a topic name or partition number that Kafka would
/// not accept is reported as [`Error::InvalidPartition`] by the store.
///
/// ```
/// use exactly::Partition;
/// let p = Partition::new("orders", 3);
/// assert_eq!(p.topic(), "orders");
/// assert_eq!(p.partition(), 3);
/// assert_eq!(p.to_string(), "orders/3");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    topic: Arc<str>,
    partition: i32,
}

impl Partition {
    /// The partition `partition` of `topic`.
    pub fn new(topic: impl AsRef<str>, partition: i32) -> Self {
        Self {
            topic: Arc::from(topic.as_ref()),
            partition,
        }
    }

    /// The topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition number.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Checks the topic and number against Kafka's rules: a topic of 1 to 249
    /// characters from `[a-zA-Z0-9._-]`, other than `.` and `..`, and a
    /// partition number of 0 or more.
    pub(crate) fn validate(&self) -> Result<()> {
        let reason = if self.partition < 0 {
            Some("partition number is negative")
        } else if self.topic.is_empty() {
            Some("topic name is empty")
        } else if self.topic.len() > MAX_TOPIC_LEN {
            Some("topic name is longer than 249 characters")
        } else if &*self.topic == "." || &*self.topic == ".." {
            Some("topic name cannot be '.' or '..'")
        } else if !self
            .topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            Some("topic name has characters other than [a-zA-Z0-9._-]")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidPartition {
                partition: self.to_string(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// The name of the column family that holds this partition's shard.
    pub(crate) fn cf_name(&self) -> String {
        format!("{CF_PREFIX}{}/{}", self.topic, self.partition)
    }

    /// The partition whose column family is `name`, if `name` is one.
    pub(crate) fn from_cf_name(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(CF_PREFIX)?;
        let (topic, number) = rest.rsplit_once('/')?;
        let p = Self::new(topic, number.parse().ok()?);
        p.validate().ok().map(|()| p)
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_names_are_valid() {
        for t in ["orders", "a", "my.topic_v2-x", &"x".repeat(249)] {
            assert!(Partition::new(t, 0).validate().is_ok(), "{t}");
        }
    }

    #[test]
    fn bad_names_and_numbers_are_rejected() {
        let long = "x".repeat(250);
        let bad = [
            Partition::new("orders", -1),
            Partition::new("", 0),
            Partition::new(&long, 0),
            Partition::new(".", 0),
            Partition::new("..", 0),
            Partition::new("a/b", 0),
            Partition::new("spaces here", 0),
            Partition::new("ünïcode", 0),
        ];
        for p in bad {
            assert!(
                matches!(p.validate(), Err(Error::InvalidPartition { .. })),
                "{p} should be rejected"
            );
        }
    }

    #[test]
    fn cf_names_round_trip() {
        let p = Partition::new("orders.v1", 12);
        assert_eq!(p.cf_name(), "p/orders.v1/12");
        assert_eq!(Partition::from_cf_name(&p.cf_name()), Some(p));
        assert_eq!(Partition::from_cf_name("default"), None);
        assert_eq!(Partition::from_cf_name("p/orders/x"), None);
        assert_eq!(Partition::from_cf_name("p/orders/-1"), None);
    }
}
