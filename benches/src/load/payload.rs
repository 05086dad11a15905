//! The record values a run sends (`sluice-bench --payload`):
//!
//! - `fill`, the default and what every earlier figure was measured with:
//!   8 zero bytes (where end-to-end runs put the send time) and then the
//!   byte `0x5a`, every record the same. It compresses to almost nothing,
//!   so it says nothing about compression.
//! - `random`: pseudo-random bytes, different in every record:
//!   incompressible, the worst case for a codec.
//! - `json`: JSON order events of exactly the record size: repeating field
//!   names, ids, amounts and timestamps that vary per record, items from a
//!   small catalogue and a free-text note from a small vocabulary padding
//!   the event to size. Compressible the way real event payloads are, and
//!   different in every record of a batch, so a codec cannot just point
//!   back at the previous record.
//!
//! Values are built before the timed phase (one batch's worth per
//! producer) and reused, so payload generation is not on the measured
//! path. End-to-end runs overwrite each value's first 8 bytes with its due
//! send time ([`stamp`]): their `json` values are then not JSON, but as
//! compressible.

use bytes::{BufMut as _, Bytes, BytesMut};

/// What the record values hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Payload {
    /// 8 zero bytes, then 0x5a: every record the same (the default).
    #[default]
    Fill,
    /// Pseudo-random bytes: incompressible.
    Random,
    /// JSON order events, varying per record: compressible like real events.
    Json,
}

impl Payload {
    /// The name, as `--payload` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Payload::Fill => "fill",
            Payload::Random => "random",
            Payload::Json => "json",
        }
    }

    /// `n` values of `record_bytes` bytes each, in one allocation. `seed`
    /// (a producer's index, say) makes the values of different producers
    /// differ; within one call every `random` and `json` value differs.
    pub fn values(self, n: u64, record_bytes: u64, seed: u64) -> Vec<Bytes> {
        let size = record_bytes as usize;
        let mut buffer = BytesMut::with_capacity(n as usize * size);
        let mut json = String::with_capacity(size + 64);
        for i in 0..n {
            match self {
                Payload::Fill => {
                    buffer.put_u64_le(0);
                    buffer.put_bytes(0x5a, size.saturating_sub(8));
                }
                Payload::Random => {
                    let mut rng = SplitMix64::new(seed, i);
                    let mut left = size;
                    while left > 0 {
                        let word = rng.next().to_le_bytes();
                        let take = left.min(word.len());
                        buffer.put_slice(&word[..take]);
                        left -= take;
                    }
                }
                Payload::Json => {
                    order_event(&mut json, size, seed, i);
                    buffer.put_slice(json.as_bytes());
                }
            }
        }
        split(buffer.freeze(), size)
    }
}

/// `values` with each one's first 8 bytes replaced by `stamp`
/// (little-endian), in one new allocation.
pub fn stamp(values: &[Bytes], stamp: u64) -> Vec<Bytes> {
    let size = values.first().map_or(0, Bytes::len);
    let mut buffer = BytesMut::with_capacity(values.len() * size);
    for value in values {
        buffer.put_u64_le(stamp);
        buffer.put_slice(&value[8..]);
    }
    split(buffer.freeze(), size)
}

fn split(all: Bytes, size: usize) -> Vec<Bytes> {
    (0..all.len().checked_div(size).unwrap_or(0))
        .map(|i| all.slice(i * size..(i + 1) * size))
        .collect()
}

/// SplitMix64: small, fast, and good enough to vary test data.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64, index: u64) -> SplitMix64 {
        let mut rng = SplitMix64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index);
        rng.next();
        rng
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const EVENTS: [&str; 4] = [
    "order.created",
    "order.paid",
    "order.shipped",
    "order.cancelled",
];
const TIERS: [&str; 4] = ["standard", "silver", "gold", "platinum"];
const COUNTRIES: [&str; 8] = ["DE", "FR", "NL", "SE", "PL", "ES", "IT", "GB"];
const CITIES: [&str; 8] = [
    "Berlin",
    "Paris",
    "Amsterdam",
    "Stockholm",
    "Warsaw",
    "Madrid",
    "Milan",
    "London",
];
const CURRENCIES: [&str; 3] = ["EUR", "SEK", "GBP"];
const PAYMENTS: [&str; 4] = ["card", "paypal", "invoice", "bank_transfer"];
const SHIPPING: [&str; 3] = ["standard", "express", "pickup"];
const PRODUCTS: [&str; 12] = [
    "wireless mouse",
    "usb-c cable 2m",
    "mechanical keyboard",
    "27in monitor",
    "laptop stand",
    "noise cancelling headphones",
    "webcam 1080p",
    "desk lamp",
    "ergonomic chair",
    "portable ssd 1tb",
    "phone charger",
    "hdmi adapter",
];
const WORDS: [&str; 24] = [
    "please", "leave", "the", "parcel", "at", "front", "door", "ring", "bell", "twice", "call",
    "before", "delivery", "gift", "wrap", "no", "invoice", "in", "box", "back", "entrance",
    "second", "floor", "thanks",
];

/// Writes into `out` an order event of exactly `size` bytes: the event's
/// fields, then a `note` of words padding it to size. An event whose
/// fields alone are longer than `size` is cut (and then not valid JSON).
fn order_event(out: &mut String, size: usize, seed: u64, index: u64) {
    use std::fmt::Write as _;
    let mut rng = SplitMix64::new(seed, index);
    out.clear();
    let sequence = (seed << 40) | index;
    let created_ms = 1_764_000_000_000 + sequence % 1_000_000_000 + rng.below(1000);
    let _ = write!(
        out,
        r#"{{"type":"{}","event_id":"evt-{:016x}","order_id":"ord-{:010}","customer":{{"id":"cus-{:06}","tier":"{}","country":"{}"}},"created_at_ms":{},"currency":"{}","items":["#,
        rng.pick(&EVENTS),
        rng.next(),
        sequence,
        rng.below(1_000_000),
        rng.pick(&TIERS),
        rng.pick(&COUNTRIES),
        created_ms,
        rng.pick(&CURRENCIES),
    );
    let mut total = 0;
    for item in 0..1 + rng.below(4) {
        let (qty, price) = (1 + rng.below(5), 199 + rng.below(50_000));
        total += qty * price;
        let _ = write!(
            out,
            r#"{}{{"sku":"SKU-{:05}","name":"{}","qty":{qty},"unit_price_cents":{price}}}"#,
            if item == 0 { "" } else { "," },
            rng.below(100_000),
            rng.pick(&PRODUCTS),
        );
    }
    let _ = write!(
        out,
        r#"],"total_cents":{total},"payment":{{"method":"{}","status":"captured"}},"shipping":{{"method":"{}","city":"{}","postcode":"{:05}"}},"note":""#,
        rng.pick(&PAYMENTS),
        rng.pick(&SHIPPING),
        rng.pick(&CITIES),
        rng.below(100_000),
    );
    let end = "\"}";
    let mut first = true;
    while out.len() + end.len() < size {
        if !first {
            out.push(' ');
        }
        out.push_str(rng.pick(&WORDS));
        first = false;
    }
    // Cut the last word (or the event) to make room for the end exactly.
    out.truncate(size.saturating_sub(end.len()));
    if out.len() + end.len() == size {
        out.push_str(end);
    } else {
        // Smaller than "\"}": only happens for sizes below 2.
        out.truncate(size);
    }
    while out.len() < size {
        out.push(' ');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_the_stamp_slot_then_0x5a() {
        let values = Payload::Fill.values(3, 64, 7);
        assert_eq!(values.len(), 3);
        for v in &values {
            assert_eq!(v.len(), 64);
            assert_eq!(&v[..8], &[0; 8]);
            assert!(v[8..].iter().all(|b| *b == 0x5a));
        }
    }

    #[test]
    fn every_payload_has_the_size_asked_for() {
        for payload in [Payload::Fill, Payload::Random, Payload::Json] {
            for size in [8, 9, 15, 64, 100, 333, 700, 1024, 4096] {
                let values = payload.values(20, size, 1);
                assert_eq!(values.len(), 20);
                assert!(
                    values.iter().all(|v| v.len() == size as usize),
                    "{payload:?} at {size}"
                );
            }
        }
    }

    #[test]
    fn json_events_are_json_and_differ_per_record_and_producer() {
        let values = Payload::Json.values(200, 1024, 3);
        let mut seen = std::collections::HashSet::new();
        for v in &values {
            let event: serde_json::Value = serde_json::from_slice(v).expect("valid JSON");
            assert!(event["order_id"].as_str().unwrap().starts_with("ord-"));
            assert!(!event["items"].as_array().unwrap().is_empty());
            assert!(event["note"].as_str().unwrap().len() > 100, "{event}");
            assert!(seen.insert(v.clone()), "a repeated value");
        }
        let other = Payload::Json.values(200, 1024, 4);
        assert!(other.iter().all(|v| !seen.contains(v)));
        // Built from text: printable ASCII throughout.
        assert!(values.iter().flatten().all(|b| (0x20..0x7f).contains(b)));
        // Deterministic: the same seed gives the same values.
        assert_eq!(Payload::Json.values(200, 1024, 3), values);
    }

    #[test]
    fn json_compresses_and_random_does_not() {
        // A crude ratio: distinct 4-byte windows per byte. Repetitive text
        // has few; random bytes have nearly one per position.
        let distinct = |values: &[Bytes]| {
            let all: Vec<u8> = values.iter().flatten().copied().collect();
            let windows: std::collections::HashSet<&[u8]> = all.windows(4).collect();
            windows.len() as f64 / all.len() as f64
        };
        let json = distinct(&Payload::Json.values(100, 1024, 0));
        let random = distinct(&Payload::Random.values(100, 1024, 0));
        assert!(json < 0.2, "json: {json}");
        assert!(random > 0.9, "random: {random}");
    }

    #[test]
    fn stamping_replaces_the_first_8_bytes_only() {
        let values = Payload::Json.values(4, 256, 0);
        let stamped = stamp(&values, 0x0102_0304_0506_0708);
        assert_eq!(stamped.len(), 4);
        for (s, v) in stamped.iter().zip(&values) {
            assert_eq!(s.len(), 256);
            assert_eq!(
                u64::from_le_bytes(s[..8].try_into().unwrap()),
                0x0102_0304_0506_0708
            );
            assert_eq!(s[8..], v[8..]);
        }
        assert!(stamp(&[], 1).is_empty());
    }
}
