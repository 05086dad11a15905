//! Sluice's gRPC contract, `sluice.v1`, as Rust types and tonic services.
//!
//! The `.proto` files under `proto/sluice/v1/` are the contract other
//! languages read; this crate compiles them (with protox, so no `protoc` is
//! needed), exposes the encoded descriptor set for server reflection, and
//! holds the one key partitioner that the broker and every client share,
//! and the W3C `traceparent` codec ([`trace`]) they share too.

pub mod trace;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("sluice.v1");

    /// The encoded `FileDescriptorSet` of every `sluice.v1` file, for gRPC
    /// server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sluice_descriptor");

    impl TopicPartitions {
        /// (topic, partition) pairs as one message per topic, topics in
        /// order, each topic's partitions in the order given.
        pub fn group<'a>(pairs: impl IntoIterator<Item = (&'a str, u32)>) -> Vec<TopicPartitions> {
            let mut by_topic: std::collections::BTreeMap<&str, Vec<u32>> = Default::default();
            for (topic, partition) in pairs {
                by_topic.entry(topic).or_default().push(partition);
            }
            by_topic
                .into_iter()
                .map(|(topic, partitions)| TopicPartitions {
                    topic: topic.to_owned(),
                    partitions,
                })
                .collect()
        }

        /// The (topic, partition) pairs of `sets`.
        pub fn flatten(sets: Vec<TopicPartitions>) -> impl Iterator<Item = (String, u32)> {
            sets.into_iter().flat_map(|set| {
                let topic = set.topic;
                set.partitions.into_iter().map(move |p| (topic.clone(), p))
            })
        }
    }
}

/// HTTP/2 settings both ends of a Sluice connection use, the broker's
/// server and every client's channel (docs/BENCHMARKS.md, "Transport").
pub mod transport {
    /// Flow-control window of one stream. The HTTP/2 default of 64 KiB caps
    /// a stream at 64 KiB per round trip; 4 MiB lets a produce stream or a
    /// subscription keep a few MiB in flight, while a reader that stops
    /// reading still stops the stream after 4 MiB (flow control).
    pub const STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
    /// Flow-control window of one connection, shared by its streams.
    pub const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
    /// The largest DATA frame each end accepts (SETTINGS_MAX_FRAME_SIZE).
    /// The default, 16 KiB, cuts a 1 MiB batch into 64 frames, each with
    /// its own header, wakeup and flow-control step; at 1 MiB a batch goes
    /// in one or two. Measured on 2 cores (1 KiB records, batches of
    /// 1000; medians of three sweeps against the 16 KiB default): produce
    /// +8 to +56%, catch-up consume +3 to +46%, broker CPU per GB produced
    /// -9 to -38%. Larger windows, hyper's adaptive window and a larger
    /// client buffer gained nothing measurable.
    pub const MAX_FRAME_BYTES: u32 = 1024 * 1024;
}

/// Bytes a record counts against a topic's `max_record_bytes`: the length
/// of the `sluice.v1.Record` message with these fields, as prost encodes it
/// (proto3: empty scalars are left out, a present optional key is not), so
/// the limit also bounds what a consumer receives for the record. One rule
/// for the broker, which enforces it on records and on encoded batches
/// alike, and the client, which refuses an oversized record before it
/// can take down the batch it would be sent in.
pub fn record_message_len(
    key: Option<usize>,
    value: usize,
    headers: impl Iterator<Item = (usize, usize)>,
    timestamp_ms: i64,
) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    let field = |tag, len: usize| key_len(tag) + encoded_len_varint(len as u64) + len;
    let nonempty = |tag, len: usize| if len == 0 { 0 } else { field(tag, len) };
    key.map_or(0, |len| field(1, len))
        + nonempty(2, value)
        + headers
            .map(|(k, v)| field(3, nonempty(1, k) + nonempty(2, v)))
            .sum::<usize>()
        + if timestamp_ms == 0 {
            0
        } else {
            key_len(4) + encoded_len_varint(timestamp_ms as u64)
        }
}

/// Kafka's murmur2 hash (`org.apache.kafka.common.utils.Utils.murmur2`),
/// bit for bit, so keys land where a Kafka client would put them.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        if tail.len() >= 3 {
            h ^= u32::from(tail[2]) << 16;
        }
        if tail.len() >= 2 {
            h ^= u32::from(tail[1]) << 8;
        }
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition a key goes to among `partitions`: Kafka's default,
/// `(murmur2(key) & 0x7fffffff) % partitions`. Stable across restarts and
/// versions: changing it would reorder every keyed topic.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    ((murmur2(key) as u32) & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_partitions_group_by_topic_and_flatten_back() {
        let pairs = [("b", 1), ("a", 0), ("a", 3)];
        let sets = v1::TopicPartitions::group(pairs);
        assert_eq!(sets.len(), 2);
        assert_eq!(
            (sets[0].topic.as_str(), sets[0].partitions.clone()),
            ("a", vec![0, 3])
        );
        let back: Vec<(String, u32)> = v1::TopicPartitions::flatten(sets).collect();
        assert_eq!(
            back,
            vec![("a".into(), 0), ("a".into(), 3), ("b".into(), 1)]
        );
    }

    /// Vectors from Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_kafka() {
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input),
                *expected,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        for n in [1u32, 2, 7, 64] {
            for key in [&b""[..], b"a", b"user-42", &[0xff; 33]] {
                let p = partition_for_key(key, n);
                assert!(p < n);
                assert_eq!(p, partition_for_key(key, n));
            }
        }
        assert_eq!(
            partition_for_key(b"foobar", 10),
            ((-790_332_482i32 as u32) & 0x7fff_ffff) % 10
        );
    }

    /// The .proto files are the contract other languages read: every
    /// service, method, message, field, oneof, enum and enum value carries a
    /// comment. The embedded descriptor set keeps the comments (protox
    /// includes source info), so reflection clients see them too.
    #[test]
    fn every_element_of_the_contract_is_documented() {
        use prost::Message;
        use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};
        use std::collections::HashMap;

        fn check_enum(
            e: &EnumDescriptorProto,
            path: Vec<i32>,
            name: &str,
            docs: &HashMap<Vec<i32>, String>,
            missing: &mut Vec<String>,
        ) {
            let mut need = |path: &[i32], what: String| {
                if docs.get(path).is_none_or(|c| c.trim().is_empty()) {
                    missing.push(what);
                }
            };
            need(&path, format!("enum {name}"));
            for (i, value) in e.value.iter().enumerate() {
                let mut p = path.clone();
                p.extend([2, i as i32]);
                need(&p, format!("enum value {name}.{}", value.name()));
            }
        }

        fn check_message(
            m: &DescriptorProto,
            path: Vec<i32>,
            name: &str,
            docs: &HashMap<Vec<i32>, String>,
            missing: &mut Vec<String>,
        ) {
            let need = |path: &[i32], what: String, missing: &mut Vec<String>| {
                if docs.get(path).is_none_or(|c| c.trim().is_empty()) {
                    missing.push(what);
                }
            };
            need(&path, format!("message {name}"), missing);
            for (i, field) in m.field.iter().enumerate() {
                let mut p = path.clone();
                p.extend([2, i as i32]);
                need(&p, format!("field {name}.{}", field.name()), missing);
            }
            for (i, oneof) in m.oneof_decl.iter().enumerate() {
                // proto3 `optional` makes a synthetic oneof with no source.
                let synthetic = m
                    .field
                    .iter()
                    .any(|f| f.oneof_index == Some(i as i32) && f.proto3_optional());
                if !synthetic {
                    let mut p = path.clone();
                    p.extend([8, i as i32]);
                    need(&p, format!("oneof {name}.{}", oneof.name()), missing);
                }
            }
            for (i, nested) in m.nested_type.iter().enumerate() {
                let mut p = path.clone();
                p.extend([3, i as i32]);
                let nested_name = format!("{name}.{}", nested.name());
                check_message(nested, p, &nested_name, docs, missing);
            }
            for (i, e) in m.enum_type.iter().enumerate() {
                let mut p = path.clone();
                p.extend([4, i as i32]);
                check_enum(e, p, &format!("{name}.{}", e.name()), docs, missing);
            }
        }

        let set = FileDescriptorSet::decode(v1::FILE_DESCRIPTOR_SET).unwrap();
        let mut missing = Vec::new();
        let mut checked = 0;
        for file in set.file.iter().filter(|f| f.package() == "sluice.v1") {
            let docs: HashMap<Vec<i32>, String> = file
                .source_code_info
                .as_ref()
                .expect("the descriptor set keeps source info")
                .location
                .iter()
                .filter_map(|l| Some((l.path.clone(), l.leading_comments.clone()?)))
                .collect();
            for (i, m) in file.message_type.iter().enumerate() {
                check_message(m, vec![4, i as i32], m.name(), &docs, &mut missing);
                checked += 1;
            }
            for (i, e) in file.enum_type.iter().enumerate() {
                check_enum(e, vec![5, i as i32], e.name(), &docs, &mut missing);
            }
            let undocumented = |path: &[i32]| docs.get(path).is_none_or(|c| c.trim().is_empty());
            for (i, service) in file.service.iter().enumerate() {
                if undocumented(&[6, i as i32]) {
                    missing.push(format!("service {}", service.name()));
                }
                for (j, method) in service.method.iter().enumerate() {
                    if undocumented(&[6, i as i32, 2, j as i32]) {
                        missing.push(format!("method {}.{}", service.name(), method.name()));
                    }
                }
            }
        }
        assert!(checked > 20, "only {checked} messages found");
        assert!(
            missing.is_empty(),
            "undocumented in the .proto files: {missing:#?}"
        );
    }

    #[test]
    fn the_descriptor_set_names_every_service() {
        // The encoded set holds the names as plain strings.
        let text = String::from_utf8_lossy(v1::FILE_DESCRIPTOR_SET);
        for service in ["AdminService", "ProduceService", "ConsumeService"] {
            assert!(
                text.contains(service),
                "{service} missing from the descriptor set"
            );
        }
    }
}
