//! Credentials between a child and its parent: a token is 32 random bytes in hex,
//! given to the child in a file only it may read; the parent keeps only its
//! SHA-256 (`hub.children[].token_sha256`) and compares digests in constant time,
//! so neither a leaked hub config nor response timing gives a token away.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// A fresh credential: 32 bytes from the OS's random source, as 64 hex digits.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// A fresh random identifier (bundles, remote orders): 16 bytes from the OS, in hex.
/// Not a credential: it names a thing, it grants nothing.
pub fn new_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Equality of two digests without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The hex SHA-256 of a credential, as it goes into `hub.children`.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Reads a credential file: the first line, trimmed. Never logged. A file with any
/// group or world permission bits is refused ([`crate::filemode::check_credential`]).
pub fn read_token(path: &Path) -> Result<Secret, std::io::Error> {
    crate::filemode::check_credential(path)?;
    let text = std::fs::read_to_string(path)?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Secret::new(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_hashes_are_hex_sha256() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(constant_time_eq(&[7; 32], &[7; 32]));
        let mut other = [7; 32];
        other[31] = 8;
        assert!(!constant_time_eq(&[7; 32], &other));
    }
}
