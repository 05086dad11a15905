//! The codecs of a batch's records section.
//!
//! Bits 0-2 of a batch's attributes name the codec, with Kafka's codes so
//! that a batch translated from Kafka keeps its attribute: 0 none, 3 lz4
//! (an LZ4 *frame*, written with its content checksum), 4 zstd (one zstd frame). Kafka's 1 (gzip) and 2
//! (snappy) are not Sluice codecs and, like 5 to 7, are refused.
//!
//! Only the records section is compressed; the header, with its record
//! count, timestamps and producer fields, stays readable, so storage,
//! recovery, indexing and idempotence never decompress. The checksum covers
//! the bytes as stored.
//!
//! Decompression is bounded by [`MAX_RECORDS_SECTION`]: a batch is refused
//! rather than allowed to expand without limit (a "zip bomb" would
//! otherwise cost the broker its memory).

use std::io::{Read, Write};

/// The most bytes a compressed records section may expand to. Batches are
/// at most 16 MiB as sent; this leaves room for a 4:1 ratio at that size,
/// and far more for common batch sizes.
pub const MAX_RECORDS_SECTION: usize = 64 * 1024 * 1024;
/// Attribute bits that hold the codec.
pub const ATTR_COMPRESSION_MASK: u16 = 0b111;
/// zstd's level: 3 is zstd's own default, the usual speed/ratio balance.
const ZSTD_LEVEL: i32 = 3;

/// A batch's codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// Records stored as they are.
    #[default]
    None,
    /// One LZ4 frame (fast, modest ratio).
    Lz4,
    /// One zstd frame at level 3 (better ratio, more CPU).
    Zstd,
}

/// Why a records section could not be compressed or decompressed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressionError {
    #[error(
        "compression code {0} in the batch attributes is not supported (0 none, 3 lz4, 4 zstd)"
    )]
    Unsupported(u16),
    #[error("the {codec} records section does not decompress: {reason}")]
    Corrupt { codec: Compression, reason: String },
    #[error("the {codec} records section expands past {limit} bytes")]
    TooLarge { codec: Compression, limit: usize },
}

impl Compression {
    /// Every codec, for tests and help texts.
    pub const ALL: [Compression; 3] = [Compression::None, Compression::Lz4, Compression::Zstd];

    /// The codec named by `attributes` (bits 0-2).
    pub fn from_attributes(attributes: u16) -> Result<Compression, CompressionError> {
        match attributes & ATTR_COMPRESSION_MASK {
            0 => Ok(Compression::None),
            3 => Ok(Compression::Lz4),
            4 => Ok(Compression::Zstd),
            other => Err(CompressionError::Unsupported(other)),
        }
    }

    /// The attribute bits that name this codec.
    pub fn attribute_bits(self) -> u16 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    /// The codec's name, as settings and flags spell it.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// Parses a name as [`Compression::name`] spells it.
    pub fn from_name(name: &str) -> Option<Compression> {
        Compression::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Compresses a records section.
    pub fn compress(self, records: &[u8]) -> Vec<u8> {
        match self {
            Compression::None => records.to_vec(),
            Compression::Lz4 => {
                // With the frame's content checksum: LZ4 itself detects
                // nothing, and a records section that decodes to the wrong
                // bytes must not pass for a batch.
                let info = lz4_flex::frame::FrameInfo::new().content_checksum(true);
                let mut encoder = lz4_flex::frame::FrameEncoder::with_frame_info(
                    info,
                    Vec::with_capacity(records.len() / 2 + 64),
                );
                encoder
                    .write_all(records)
                    .expect("writing into a Vec cannot fail");
                encoder.finish().expect("finishing into a Vec cannot fail")
            }
            Compression::Zstd => zstd::bulk::compress(records, ZSTD_LEVEL)
                .expect("zstd compresses any input into a Vec"),
        }
    }

    /// Decompresses a records section, refusing one that expands past
    /// `limit` bytes, and one that is not exactly one frame: bytes after
    /// the frame (a second frame included) are refused, so every reader
    /// of the format decodes a section the same way.
    pub fn decompress(self, section: &[u8], limit: usize) -> Result<Vec<u8>, CompressionError> {
        let corrupt = |reason: String| CompressionError::Corrupt {
            codec: self,
            reason,
        };
        let mut out = Vec::new();
        // One byte past the limit tells "exactly at the limit" from "over".
        let bound = limit as u64 + 1;
        // What the decoder left of the section once its frame ended.
        let mut rest: &[u8] = section;
        let read = match self {
            Compression::None => return Ok(section.to_vec()),
            Compression::Lz4 => {
                let mut decoder = lz4_flex::frame::FrameDecoder::new(&mut rest);
                (&mut decoder).take(bound).read_to_end(&mut out)
            }
            Compression::Zstd => {
                let mut decoder = zstd::stream::read::Decoder::with_buffer(&mut rest)
                    .map_err(|e| corrupt(e.to_string()))?
                    .single_frame();
                (&mut decoder).take(bound).read_to_end(&mut out)
            }
        };
        read.map_err(|e| corrupt(e.to_string()))?;
        if out.len() > limit {
            return Err(CompressionError::TooLarge { codec: self, limit });
        }
        if !rest.is_empty() {
            return Err(corrupt(format!(
                "{} bytes after the end of the frame",
                rest.len()
            )));
        }
        Ok(out)
    }
}

/// Parses a codec's name (`none`, `lz4`, `zstd`), as command lines take it.
impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(name: &str) -> Result<Compression, String> {
        Compression::from_name(name).ok_or_else(|| format!("{name:?}: expected none, lz4 or zstd"))
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..20_000u32)
            .flat_map(|i| format!("{{\"order\":{i},\"state\":\"paid\"}}").into_bytes())
            .collect()
    }

    #[test]
    fn every_codec_round_trips() {
        let data = sample();
        for codec in Compression::ALL {
            let packed = codec.compress(&data);
            if codec != Compression::None {
                assert!(packed.len() < data.len() / 3, "{codec} barely compressed");
            }
            assert_eq!(codec.decompress(&packed, data.len()).unwrap(), data);
        }
    }

    #[test]
    fn attributes_name_kafkas_codes_and_refuse_the_rest() {
        for codec in Compression::ALL {
            assert_eq!(
                Compression::from_attributes(codec.attribute_bits() | 0x10),
                Ok(codec)
            );
            assert_eq!(Compression::from_name(codec.name()), Some(codec));
            assert_eq!(codec.name().parse::<Compression>(), Ok(codec));
        }
        assert_eq!(
            "gzip".parse::<Compression>(),
            Err("\"gzip\": expected none, lz4 or zstd".to_string())
        );
        for code in [1u16, 2, 5, 6, 7] {
            assert_eq!(
                Compression::from_attributes(code),
                Err(CompressionError::Unsupported(code))
            );
        }
    }

    #[test]
    fn expansion_past_the_limit_is_refused() {
        let zeros = vec![0u8; 1 << 20];
        for codec in [Compression::Lz4, Compression::Zstd] {
            let packed = codec.compress(&zeros);
            assert!(packed.len() < 10_000);
            assert_eq!(
                codec.decompress(&packed, (1 << 20) - 1),
                Err(CompressionError::TooLarge {
                    codec,
                    limit: (1 << 20) - 1
                })
            );
            assert_eq!(codec.decompress(&packed, 1 << 20).unwrap().len(), 1 << 20);
        }
    }

    #[test]
    fn a_section_is_exactly_one_frame() {
        let data = sample();
        for codec in [Compression::Lz4, Compression::Zstd] {
            let packed = codec.compress(&data);
            let mut trailing = packed.clone();
            trailing.extend_from_slice(b"junk");
            let mut two_frames = packed.clone();
            two_frames.extend_from_slice(&packed);
            for section in [trailing, two_frames] {
                match codec.decompress(&section, MAX_RECORDS_SECTION) {
                    Err(CompressionError::Corrupt { reason, .. }) => {
                        assert!(reason.contains("after the end of the frame"), "{reason}")
                    }
                    other => panic!("{codec}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for codec in [Compression::Lz4, Compression::Zstd] {
            let mut packed = codec.compress(&sample());
            let n = packed.len();
            packed[n / 2] ^= 0xff;
            packed.truncate(n - 3);
            assert!(codec.decompress(&packed, MAX_RECORDS_SECTION).is_err());
            assert!(
                codec
                    .decompress(b"not a frame", MAX_RECORDS_SECTION)
                    .is_err()
            );
        }
    }
}
