//! A zombie for the changelog tests: an instance that lost partition 0
//! without knowing it (paused past its session timeout, say) and whose
//! store never saw the new owner's records. It still reads the partition
//! from offset 0 and publishes to the changelog; on the mock cluster
//! nothing fences it, on a broker with KIP-447 its transactions abort, and
//! a broker that does not filter aborted records shows them to a restore
//! all the same.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::kafka::rdkafka::{Offset, TopicPartitionList};
use exactly::kafka::{
    changelog_topic, Changelog, ConsumeError, DedupContext, GroupStore, IdempotentConsumer,
    KeySource, MIN_CLAIM_LEASE,
};
use exactly::{Options, Partition, Store};

use super::{client, consumer_config, read_all, Instance, DEADLINE, GROUP, HEADER, TOPIC};

/// The changelog of instance `name`.
pub fn changelog(servers: &str, name: &str) -> Changelog {
    Changelog::new(
        &client(servers),
        GROUP,
        name,
        Duration::from_secs(8 * 24 * 3600),
        Duration::from_secs(10),
    )
    .unwrap()
}

/// Partition 0 of the input topic.
pub fn p0() -> Partition {
    Partition::new(TOPIC, 0)
}

/// The zombie, on its own store directory, with the shortest claim lease.
pub fn zombie(servers: &str, dir: &Path) -> Instance {
    let store = Arc::new(Store::open(dir, Options::default()).unwrap());
    store.assign(&p0()).unwrap();
    let group = GroupStore::new(store.clone());
    let consumer: BaseConsumer<DedupContext> = consumer_config(servers)
        .create_with_context(DedupContext::new(&group))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(TOPIC, 0, Offset::Offset(0))
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let consumer = IdempotentConsumer::new(consumer, KeySource::header(HEADER))
        .changelog(changelog(servers, "zombie"))
        .claim_lease(MIN_CLAIM_LEASE);
    Instance { consumer, store }
}

/// A zombie in claim mode whose handler fails (its downstream call timed
/// out): it claims the first key it sees as new and releases the claim.
pub fn zombie_claims_and_releases(servers: &str, dir: &Path) {
    let mut z = zombie(servers, dir);
    let started = Instant::now();
    loop {
        let result = z
            .consumer
            .poll_batch_claimed(Duration::from_millis(100), |_, _, _, _| {
                Err::<(), _>("downstream timed out")
            });
        match result {
            Err(ConsumeError::Handler { .. }) => return,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(started.elapsed() < DEADLINE, "the zombie handled nothing");
    }
}

/// The last changelog record of partition 0 for `key`: `Some(None)` for a
/// removal, `Some(Some(value))` for a mark or a claim.
pub fn last_record_of(servers: &str, key: &str) -> Option<Option<Vec<u8>>> {
    let mut stored = vec![1u8];
    stored.extend_from_slice(key.as_bytes());
    read_all(servers, &changelog_topic(GROUP, TOPIC), 0)
        .into_iter()
        .rfind(|(k, _)| *k == stored)
        .map(|(_, v)| v)
}
