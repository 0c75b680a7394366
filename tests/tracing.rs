//! The store's `tracing` events: a store's life (create, assign, revoke,
//! reassign from its filter snapshot, a newer epoch and a fenced older one,
//! a stop without close, reopen, rebuild, compaction, close) emits the
//! lifecycle events with their fields, and the per-key path emits nothing,
//! even with every level enabled.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exactly::{Error, Options, Partition, Store, Verdict};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// One event as the capturing layer saw it.
#[derive(Debug, Clone)]
struct Captured {
    level: Level,
    target: String,
    message: String,
    fields: BTreeMap<String, String>,
    /// The names of the spans it was emitted in, outermost first.
    spans: Vec<String>,
}

impl Captured {
    fn field(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("event {:?} has no field {name}: {self:?}", self.message))
    }

    fn number(&self, name: &str) -> u64 {
        self.field(name)
            .parse()
            .unwrap_or_else(|_| panic!("field {name} of {self:?} is not a number"))
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// A layer that keeps every event.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

impl Capture {
    fn take(&self) -> Vec<Captured> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl<S> Layer<S> for Capture
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut fields = fields.0;
        let message = fields.remove("message").unwrap_or_default();
        let spans = ctx
            .event_scope(event)
            .map(|scope| scope.from_root().map(|s| s.name().to_owned()).collect())
            .unwrap_or_default();
        self.0.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            message,
            fields,
            spans,
        });
    }
}

/// The one event with `message` among `events`.
fn one<'e>(events: &'e [Captured], message: &str) -> &'e Captured {
    let found: Vec<&Captured> = events.iter().filter(|e| e.message == message).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {message:?} event, got {}: {events:#?}",
        found.len()
    );
    found[0]
}

#[test]
fn a_stores_life_is_logged_and_the_per_key_path_is_silent() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let options = Options::default().ttl(Duration::from_secs(3600));
    let p = Partition::new("orders", 3);

    tracing::subscriber::with_default(subscriber, || {
        // Creation.
        let store = Store::open(&path, options.clone()).unwrap();
        let events = capture.take();
        assert_eq!(one(&events, "creating a new store").spans, ["open"]);
        let opened = one(&events, "store opened");
        assert_eq!(opened.level, Level::INFO);
        assert_eq!(opened.target, "exactly::engine");
        assert_eq!(opened.spans, ["open"]);
        assert_eq!(opened.field("created"), "true");
        assert_eq!(opened.number("partitions"), 0);

        // First assign: nothing on disk, the filter is built by a scan.
        store.assign(&p).unwrap();
        let events = capture.take();
        let assigned = one(&events, "partition assigned");
        assert_eq!(assigned.level, Level::INFO);
        assert_eq!(assigned.field("partition"), "orders/3");
        assert_eq!(assigned.field("resume"), "None");
        assert!(assigned.field("why").contains("no offset committed"));
        assert_eq!(assigned.field("filter"), "rebuilt");
        assert_eq!(assigned.number("epoch"), 0);
        let rebuilding = one(&events, "rebuilding the filter from disk");
        assert_eq!(rebuilding.level, Level::DEBUG);
        assert!(rebuilding.field("why").starts_with("no valid snapshot"));
        assert_eq!(rebuilding.spans, ["assign"]);
        assert_eq!(
            one(&events, "filter rebuilt from disk").number("live_marks"),
            0
        );

        // The per-key path: a poll batch of 1 000 keys and its commit log
        // nothing at any level.
        let mut batch = store.batch(&p).unwrap();
        for i in 0u32..1_000 {
            assert_eq!(
                batch.check_and_mark(&i.to_be_bytes()).unwrap(),
                Verdict::New
            );
        }
        batch.set_offset(10);
        batch.commit().unwrap();
        for i in 0u32..100 {
            assert_eq!(
                store.check(&p, &i.to_be_bytes()).unwrap(),
                Verdict::Duplicate
            );
        }
        let events = capture.take();
        assert!(events.is_empty(), "per-key events: {events:#?}");

        // Revoke saves the filter; the next assign loads it.
        store.revoke(&p).unwrap();
        let events = capture.take();
        let revoked = one(&events, "partition revoked");
        assert_eq!(revoked.field("partition"), "orders/3");
        assert_eq!(revoked.field("resume"), "Some(10)");
        assert_eq!(revoked.field("snapshot"), "true");
        one(&events, "filter snapshot saved");

        store.assign(&p).unwrap();
        let events = capture.take();
        let assigned = one(&events, "partition assigned");
        assert_eq!(assigned.field("filter"), "snapshot");
        assert_eq!(assigned.field("resume"), "Some(10)");
        assert_eq!(assigned.field("why"), "the store's committed offset");
        assert_eq!(one(&events, "filter snapshot loaded").spans, ["assign"]);
        assert!(!events
            .iter()
            .any(|e| e.message == "filter rebuilt from disk"));

        // A newer epoch, then an older one: fenced.
        store.assign_with_epoch(&p, 5).unwrap();
        let events = capture.take();
        let moved = one(&events, "assigned partition moved to a newer epoch");
        assert_eq!(
            (moved.number("epoch"), moved.number("previous_epoch")),
            (5, 0)
        );
        assert!(matches!(
            store.assign_with_epoch(&p, 3),
            Err(Error::Fenced { .. })
        ));
        let events = capture.take();
        let fenced = one(
            &events,
            "fenced: an epoch older than the partition's was refused",
        );
        assert_eq!(fenced.level, Level::WARN);
        assert_eq!(fenced.field("partition"), "orders/3");
        assert_eq!(
            (fenced.number("current"), fenced.number("attempted")),
            (5, 3)
        );
        let mut batch = store.batch(&p).unwrap();
        batch.fence(4);
        batch.mark(b"late").unwrap();
        assert!(matches!(batch.commit(), Err(Error::Fenced { .. })));
        let events = capture.take();
        let fenced = one(&events, "fenced: a batch of another epoch was refused");
        assert_eq!(
            (fenced.number("current"), fenced.number("attempted")),
            (5, 4)
        );

        // A write since the snapshot, then a stop without close.
        let mut batch = store.batch(&p).unwrap();
        batch.mark(b"after the snapshot").unwrap();
        batch.set_offset(20);
        batch.commit().unwrap();
        drop(store);
        capture.take();

        let store = Store::open(&path, options.clone()).unwrap();
        let events = capture.take();
        assert!(!events.iter().any(|e| e.message == "creating a new store"));
        let opened = one(&events, "store opened");
        assert_eq!(opened.field("created"), "false");
        assert_eq!(opened.number("partitions"), 1);
        assert_eq!(opened.field("torn_tail_cut"), "false");
        // Never synced: recovery replayed writes past the durable sequence.
        assert!(opened.number("sequence") > opened.number("durable_sequence"));

        store.assign(&p).unwrap();
        let events = capture.take();
        let assigned = one(&events, "partition assigned");
        assert_eq!(assigned.field("filter"), "rebuilt");
        assert_eq!(assigned.field("resume"), "Some(20)");
        assert_eq!(assigned.number("epoch"), 5);
        // The write after the snapshot removed its id.
        assert!(one(&events, "rebuilding the filter from disk")
            .field("why")
            .starts_with("no valid snapshot"));
        let rebuilt = one(&events, "filter rebuilt from disk");
        assert_eq!(rebuilt.number("live_marks"), 1_001);
        assert_eq!(rebuilt.number("expired_marks"), 0);

        store.compact(&p).unwrap();
        let events = capture.take();
        let compacted = one(&events, "partition compacted");
        assert_eq!(compacted.field("partition"), "orders/3");
        assert_eq!(compacted.number("dropped"), 0);

        store.close().unwrap();
        let events = capture.take();
        assert_eq!(
            one(&events, "partition revoked").field("resume"),
            "Some(20)"
        );
        assert_eq!(one(&events, "store closed").number("partitions"), 1);
        // Nothing in this life was an error.
        assert!(events.iter().all(|e| e.level > Level::WARN), "{events:#?}");
    });
}
