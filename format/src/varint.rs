//! Variable-length integers for the record encoding inside a batch.
//!
//! Unsigned LEB128 for lengths and counts, zigzag on top of it for values that
//! may be negative (timestamp deltas, the `-1` of a null key). Decoding is
//! bounds-checked and never panics: a truncated or overlong varint is `None`.
//! Kafka's record format uses the same zigzag varints (the Kafka listener
//! reads and writes its records with these).

/// The most bytes a `u64` takes in LEB128.
pub const MAX_VARINT_LEN: usize = 10;

/// How many bytes `value` takes as an unsigned varint.
#[inline]
pub fn uvarint_len(value: u64) -> usize {
    // Each byte carries 7 bits; `| 1` makes zero take one byte.
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

#[inline]
pub fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

#[inline]
pub fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

#[inline]
pub fn varint_len(value: i64) -> usize {
    uvarint_len(zigzag(value))
}

#[inline]
pub fn put_uvarint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

#[inline]
pub fn put_varint(buf: &mut Vec<u8>, value: i64) {
    put_uvarint(buf, zigzag(value));
}

/// Reads an unsigned varint from the front of `buf`, returning it and the
/// number of bytes it took.
#[inline]
pub fn get_uvarint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        let chunk = u64::from(byte & 0x7f);
        // The tenth byte may only carry the top bit of a u64.
        if i == MAX_VARINT_LEN - 1 && chunk > 1 {
            return None;
        }
        value |= chunk << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[inline]
pub fn get_varint(buf: &[u8]) -> Option<(i64, usize)> {
    get_uvarint(buf).map(|(v, n)| (unzigzag(v), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_edges() {
        for v in [
            0u64,
            1,
            127,
            128,
            255,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_uvarint(&mut buf, v);
            assert_eq!(buf.len(), uvarint_len(v), "length of {v}");
            assert_eq!(get_uvarint(&buf), Some((v, buf.len())));
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX, -64, 64] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v));
            assert_eq!(get_varint(&buf), Some((v, buf.len())));
        }
    }

    #[test]
    fn rejects_truncated_and_overlong() {
        assert_eq!(get_uvarint(&[]), None);
        assert_eq!(get_uvarint(&[0x80]), None);
        assert_eq!(get_uvarint(&[0xff; 11]), None);
        // Ten bytes whose last one overflows 64 bits.
        let mut overlong = vec![0xff; 9];
        overlong.push(0x02);
        assert_eq!(get_uvarint(&overlong), None);
    }
}
