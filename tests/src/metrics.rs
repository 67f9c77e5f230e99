//! A daemon's Prometheus endpoint, scraped from inside its namespace (every namespace has
//! its own loopback, so each node answers on the default 127.0.0.1:9477), and the
//! exposition read back into numbers.
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

use flynode::netns::Netns;

/// The default `[metrics] listen`.
pub const LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9477));

/// `GET path` on `addr` inside `ns`: the status code and the body.
pub fn get(ns: &Netns, addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let response = ns.enter(|| -> io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        Ok(out)
    })??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no end of head in {response:?}")))?;
    let code = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status line in {head:?}")))?;
    Ok((code, body.to_owned()))
}

/// The metrics of the daemon in `ns` (default address); panics unless it answers 200.
pub fn scrape(ns: &Netns) -> Samples {
    match get(ns, LISTEN, "/metrics") {
        Ok((200, body)) => Samples::parse(&body),
        Ok((code, body)) => panic!("GET /metrics in {}: {code}\n{body}", ns.name()),
        Err(e) => panic!("GET /metrics in {}: {e}", ns.name()),
    }
}

/// Every sample of an exposition: (name, labels) → value.
#[derive(Debug, Default)]
pub struct Samples(BTreeMap<(String, BTreeMap<String, String>), f64>);

impl Samples {
    /// Reads the text format; panics on a line it cannot read or a series twice.
    pub fn parse(text: &str) -> Samples {
        let mut out = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (
                    name.to_owned(),
                    labels(rest.strip_suffix('}').expect("closing brace")),
                ),
                None => (series.to_owned(), BTreeMap::new()),
            };
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            assert!(
                out.insert((name, labels), value).is_none(),
                "series twice: {line}"
            );
        }
        Samples(out)
    }

    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.0.get(&(name.to_owned(), labels)).copied()
    }

    /// A counter's value; panics (listing the family) when the series is missing.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let v = self.get(name, labels).unwrap_or_else(|| {
            let family: Vec<_> = self.0.keys().filter(|(n, _)| n == name).collect();
            panic!("no series {name} {labels:?}; the family has {family:?}")
        });
        assert!(v >= 0.0 && v.fract() == 0.0, "{name} {labels:?} = {v}");
        v as u64
    }

    /// Every series of `name`: labels → value.
    pub fn family(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.0
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, l), v)| (l.clone(), *v))
            .collect()
    }
}

/// `a="x",b="y, \"z\""` → {a: x, b: y, "z"}.
fn labels(mut rest: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("closing quote") {
                (_, '\\') => value.push(chars.next().expect("escaped character").1),
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        out.insert(key.to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    out
}
