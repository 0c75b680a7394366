//! Scraping the Prometheus exporter over HTTP, for the metrics tests: a
//! plain HTTP/1.0 GET and a parser of the text format.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use exactly::Partition;

/// A loopback port nobody listens on (bound, then released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The samples of one scrape, by metric name and label set (a summary's
/// quantile lines left out).
pub struct Scraped(HashMap<(String, BTreeMap<String, String>), f64>);

impl Scraped {
    /// The sample of `name` with exactly the labels `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.0.get(&(name.to_owned(), labels)).copied()
    }

    /// The sample of `name` for partition `p` (labels `topic` and
    /// `partition` only).
    pub fn partition(&self, name: &str, p: &Partition) -> Option<f64> {
        let number = p.partition().to_string();
        self.get(name, &[("topic", p.topic()), ("partition", &number)])
    }

    /// The sum of every sample of `name`, whatever its labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v)
            .sum()
    }
}

/// GETs `/metrics` with a plain HTTP/1.0 request (the response is
/// delimited by the end of the connection) and parses the text format.
pub fn scrape(port: u16) -> Scraped {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    let mut samples = HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let labels: BTreeMap<String, String> = labels
            .trim_end_matches('}')
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        if labels.contains_key("quantile") {
            continue;
        }
        samples.insert(
            (name.to_owned(), labels),
            value.parse::<f64>().expect("a number"),
        );
    }
    Scraped(samples)
}
