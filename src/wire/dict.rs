//! zstd dictionaries for FHIR, shipped in the binary and named by id in every v2
//! frame that uses one.
//!
//! Invariants
//! - An id, once shipped, always names the same bytes and is never removed: a frame
//!   written with dictionary 1 decodes on every later build. A new dictionary gets a
//!   new id and is added beside the old ones.
//! - Id 0 means "no dictionary"; it is never in [`SHIPPED`].
//! - The encoder uses the newest id both peers announced ([`super::Accept::choose`]);
//!   a frame naming an id not in [`SHIPPED`] is refused
//!   ([`super::WireError::UnknownDictionary`]), never decoded without it.
//!
//! How a dictionary is made: `tests/bench/train-dict.sh` (zstd --train on synthetic
//! FHIR from clinicsync's generator and a third-party one, a fixed `--dictID`).

/// Every dictionary this build has: (id, zstd dictionary bytes), oldest first.
pub const SHIPPED: &[(u32, &[u8])] = &[(1, include_bytes!("dict/fhir-v1.zdict"))];

/// The bytes of dictionary `id`, if shipped.
pub fn bytes(id: u32) -> Option<&'static [u8]> {
    SHIPPED.iter().find(|(i, _)| *i == id).map(|(_, b)| *b)
}

/// The newest shipped dictionary.
pub fn newest() -> u32 {
    SHIPPED.iter().map(|(i, _)| *i).max().unwrap_or(0)
}

/// The shipped ids, for messages ("1, 2").
pub fn known() -> String {
    let ids: Vec<String> = SHIPPED.iter().map(|(i, _)| i.to_string()).collect();
    ids.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_dictionaries_carry_their_own_id_and_decode() {
        assert!(!SHIPPED.is_empty());
        let mut seen = std::collections::HashSet::new();
        for (id, bytes) in SHIPPED {
            assert_ne!(*id, 0, "id 0 means no dictionary");
            assert!(seen.insert(*id), "dictionary id {id} shipped twice");
            // A zstd dictionary: its magic, then the id it was trained with.
            assert_eq!(&bytes[..4], &[0x37, 0xa4, 0x30, 0xec], "dictionary {id}");
            let embedded = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
            assert_eq!(
                embedded, *id,
                "dictionary {id} was trained with --dictID {embedded}"
            );
            assert!(
                bytes.len() <= 112 << 10,
                "dictionary {id} is {} bytes",
                bytes.len()
            );
            let sample = br#"{"id":"x","resourceType":"Observation","status":"final"}"#;
            let packed = zstd::bulk::Compressor::with_dictionary(3, bytes)
                .unwrap()
                .compress(sample)
                .unwrap();
            let back = zstd::bulk::Decompressor::with_dictionary(bytes)
                .unwrap()
                .decompress(&packed, 1 << 10)
                .unwrap();
            assert_eq!(back, sample);
        }
    }
}
