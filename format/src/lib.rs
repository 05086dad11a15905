//! Sluice's record batch format: the bytes a partition log stores, the
//! Rust client sends, and a batch consumer reads back.
//!
//! It owns the layout of a batch and nothing else: encoding records into a
//! batch, checking a batch it is handed, compressing and decompressing the
//! records section, and decoding records out of a batch without copying
//! their keys and values. It knows no files, no gRPC, no topics and no
//! producers' rules: the broker's storage engine appends and recovers
//! batches, the broker's produce path decides what a client may send, and
//! the client decides how to batch. There is one copy of the format, here;
//! `docs/FORMAT.md` describes it for readers in other languages.
//!
//! - [`batch`]: the header, the record encoding, the checksum, the builder,
//!   the zero-copy reader and the allocation-free record walk.
//! - [`compression`]: the codecs a batch's attributes can name (lz4 and
//!   zstd, with Kafka's attribute codes) and the bound on what a
//!   compressed batch may expand to.
//! - `varint`: LEB128 and zigzag varints inside records.
//!
//! A batch, as stored and as sent (little-endian; see [`batch`] for every
//! field):
//!
//! ```text
//! magic "SLB1" | length | base_offset | crc | attributes | epoch | count
//! | first_timestamp | max_timestamp | producer_id | base_sequence
//! | records section (the records, or one lz4/zstd frame of them)
//! ```

pub mod batch;
pub mod compression;
pub mod varint;

pub use batch::{
    BatchBuilder, BatchError, BatchHeader, BatchIter, EncodedBatch, Header, ProducerInfo, Record,
    RecordBatch, RecordView, StoredRecord, decode_records,
};
pub use compression::Compression;
