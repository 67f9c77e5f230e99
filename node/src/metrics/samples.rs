//! A reader of the Prometheus text format: what a scrape returned, by series, for tests
//! and tooling that check exact values (the daemon only writes the format).

use std::collections::BTreeMap;

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

    /// The names of every series (one per labelled series).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(|(n, _)| n.as_str())
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
