//! Node identity for USB bundles: an Ed25519 signing key and an age (X25519)
//! encryption key per node, and the public keys of the nodes it trusts.
//!
//! Files (in `node.keys_dir`, default `<store dir>/keys`, created 0700; missing
//! parents are created 0750):
//! ```text
//! signing.key   hex of the 32-byte Ed25519 secret key      (0600)
//! age.key       AGE-SECRET-KEY-1…  the age X25519 identity (0600)
//! node.pub      the public key line                        (0644)
//! ```
//! Public key line, as `keys show` prints it and `keys trust` reads it:
//! `clinicsync-node v1 <node-id> <ed25519 public key, hex> <age1… recipient>`.
//! Trusted keys live in the store (`trusted_keys`), so they travel with its backups.
//! Trust is changed only by a technician (`keys trust|untrust`), every change is
//! audited, and a different key for a node already trusted needs `--replace`:
//! a stick-borne key line must not silently take over a known node's identity.
//!
//! We invent no cryptography: age (X25519 + ChaCha20-Poly1305 STREAM) encrypts,
//! ed25519-dalek signs.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::error::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no keys in {0} (run `clinicsync keys init` first)")]
    Missing(PathBuf),
    #[error("keys already exist in {0}; refusing to overwrite them")]
    Exists(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key file `keys init` wrote holds something else now.
    #[error("invalid key material in {}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("not a clinicsync public key line: {0}")]
    BadPublicLine(String),
}

/// A key file that holds no key is this node's stored identity damaged (corruption:
/// nothing can be signed or opened with it); missing or existing keys and a bad key
/// line typed by a person are permanent; I/O errors keep their own class.
impl Classify for KeyError {
    fn class(&self) -> ErrorClass {
        match self {
            KeyError::Missing(_) | KeyError::Exists(_) | KeyError::BadPublicLine(_) => {
                ErrorClass::Permanent
            }
            KeyError::Io { source, .. } => source.class(),
            KeyError::Invalid { .. } => ErrorClass::Corruption,
        }
    }
}

/// This node's secret keys. Never printed.
pub struct Identity {
    pub node: String,
    pub signing: SigningKey,
    pub age: age::x25519::Identity,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({}, secret keys hidden)", self.node)
    }
}

/// Another node's public keys.
#[derive(Clone, Debug)]
pub struct PublicKeys {
    pub node: String,
    pub verifying: VerifyingKey,
    pub age: age::x25519::Recipient,
}

impl PartialEq for PublicKeys {
    fn eq(&self, other: &Self) -> bool {
        self.line() == other.line()
    }
}

impl PublicKeys {
    pub fn line(&self) -> String {
        format!(
            "clinicsync-node v1 {} {} {}",
            self.node,
            hex::encode(self.verifying.as_bytes()),
            self.age
        )
    }

    pub fn parse(line: &str) -> Result<PublicKeys, KeyError> {
        let bad = || KeyError::BadPublicLine(line.trim().chars().take(120).collect());
        let parts: Vec<&str> = line.split_whitespace().collect();
        let ["clinicsync-node", "v1", node, sig, age_pub] = parts.as_slice() else {
            return Err(bad());
        };
        if !crate::model::valid_node_id(node) {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(sig, &mut bytes).map_err(|_| bad())?;
        let verifying = VerifyingKey::from_bytes(&bytes).map_err(|_| bad())?;
        let age = age::x25519::Recipient::from_str(age_pub).map_err(|_| bad())?;
        Ok(PublicKeys {
            node: node.to_string(),
            verifying,
            age,
        })
    }
}

impl Identity {
    pub fn public(&self) -> PublicKeys {
        PublicKeys {
            node: self.node.clone(),
            verifying: self.signing.verifying_key(),
            age: self.age.to_public(),
        }
    }

    /// Creates and writes new keys; refuses to overwrite existing ones.
    pub fn init(dir: &Path, node: &str) -> Result<Identity, KeyError> {
        let io = |path: &Path, source: std::io::Error| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        if dir.join("signing.key").exists() || dir.join("age.key").exists() {
            return Err(KeyError::Exists(dir.to_path_buf()));
        }
        crate::filemode::private_dir(dir).map_err(|e| io(dir, e))?;
        let signing = SigningKey::generate(&mut rand::rngs::OsRng);
        let age = age::x25519::Identity::generate();
        write_secret(&dir.join("signing.key"), &hex::encode(signing.to_bytes()))
            .map_err(|e| io(dir, e))?;
        write_secret(&dir.join("age.key"), age.to_string().expose_secret())
            .map_err(|e| io(dir, e))?;
        let id = Identity {
            node: node.to_string(),
            signing,
            age,
        };
        let public = dir.join("node.pub");
        write_public(&public, &id.public().line()).map_err(|e| io(&public, e))?;
        Ok(id)
    }

    pub fn load(dir: &Path, node: &str) -> Result<Identity, KeyError> {
        let sig_path = dir.join("signing.key");
        let age_path = dir.join("age.key");
        if !sig_path.exists() || !age_path.exists() {
            return Err(KeyError::Missing(dir.to_path_buf()));
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| KeyError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let invalid = |p: &Path, m: &str| KeyError::Invalid {
            path: p.to_path_buf(),
            message: m.to_string(),
        };
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(read(&sig_path)?.trim(), &mut bytes)
            .map_err(|_| invalid(&sig_path, "expected 64 hex characters"))?;
        let age = age::x25519::Identity::from_str(read(&age_path)?.trim())
            .map_err(|_| invalid(&age_path, "expected AGE-SECRET-KEY-1…"))?;
        Ok(Identity {
            node: node.to_string(),
            signing: SigningKey::from_bytes(&bytes),
            age,
        })
    }
}

fn write_secret(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

fn write_public(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    f.write_all(content.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_that_holds_no_key_is_corruption_and_keeps_its_path() {
        use crate::error::ErrorClass;
        let dir = tempfile::tempdir().unwrap();
        Identity::init(dir.path(), "clinic-a").unwrap();
        std::fs::write(dir.path().join("signing.key"), "not hex\n").unwrap();
        let err = Identity::load(dir.path(), "clinic-a").unwrap_err();
        assert_eq!(err.class(), ErrorClass::Corruption, "{err}");
        assert!(err.to_string().contains("signing.key"), "{err}");
        let cases = [
            (KeyError::Missing(dir.path().into()), ErrorClass::Permanent),
            (KeyError::Exists(dir.path().into()), ErrorClass::Permanent),
            (KeyError::BadPublicLine("x".into()), ErrorClass::Permanent),
            (
                KeyError::Io {
                    path: dir.path().into(),
                    source: std::io::ErrorKind::PermissionDenied.into(),
                },
                ErrorClass::Permanent,
            ),
        ];
        for (e, class) in cases {
            assert_eq!(e.class(), class, "{e}");
        }
    }

    #[test]
    fn keys_round_trip_and_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::init(dir.path(), "clinic-a").unwrap();
        assert!(matches!(
            Identity::init(dir.path(), "clinic-a"),
            Err(KeyError::Exists(_))
        ));
        let again = Identity::load(dir.path(), "clinic-a").unwrap();
        assert_eq!(id.public(), again.public());
        let line = id.public().line();
        assert_eq!(PublicKeys::parse(&line).unwrap(), id.public());
        assert!(!format!("{id:?}").contains(&hex::encode(id.signing.to_bytes())));
        use std::os::unix::fs::PermissionsExt;
        let mode = |name: &str| {
            std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("signing.key"), 0o600);
        assert_eq!(mode("age.key"), 0o600);
        assert_eq!(mode("node.pub"), 0o644);
        assert_eq!(mode("."), 0o700);
        let public = std::fs::read_to_string(dir.path().join("node.pub")).unwrap();
        assert_eq!(PublicKeys::parse(public.trim()).unwrap(), id.public());
    }

    #[test]
    fn a_garbled_public_line_is_refused() {
        assert!(PublicKeys::parse("clinicsync-node v1 a zz age1x").is_err());
        assert!(PublicKeys::parse("ssh-ed25519 AAAA").is_err());
    }
}
