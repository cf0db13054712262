//! USB sneakernet: encrypted, signed bundle files carrying the same protocol as the
//! network (push batches out, receipts and pull pages back).
//!
//! Bundle byte stream, version 1 (split into `<name>.001`, `.002`, … parts of at
//! most `part_size` bytes each; parts are plain slices of this stream):
//! ```text
//! struct Bundle {
//!     magic:      [u8; 4] = b"CSYB",
//!     version:    u16 BE = 1,
//!     header_len: u32 BE,
//!     header:     CBOR(BundleHeader),           // plaintext, covered by the signature
//!     payload:    age v1 file (X25519 recipient = header.recipient)
//!                 of zstd( CBOR(Item) CBOR(Item) … CBOR(Item::End) ),
//!     trailer:    b"CSYE" | u64 BE length of everything before the trailer
//!                 | Ed25519 signature (64 bytes) of SHA-256(everything before the trailer),
//! }
//! ```
//! Invariants
//! - Nothing is applied before the whole stream's signature is verified against a
//!   trusted key of the sender, and the header names this node as recipient.
//! - Export writes parts under `*.tmp` names and renames them only after the trailer
//!   is written and synced, so a bundle cut short by a full stick is never mistaken
//!   for a complete one; on failure the parts written so far are removed.
//! - `Item::End` carries the item count, so a payload cut at an AEAD chunk boundary
//!   is still refused.
//! - Items are applied with exactly the engine functions the network uses, so a
//!   record that comes both ways is integrated once, and receipts are idempotent.
//!
//! What an error leaves behind: export — no bundle, the outbox untouched. Import —
//! refused before any write, except an interruption after application began: then
//! each applied item is committed, progress is kept, and importing again resumes.
//! (The file is read twice — verify, then apply; a stick altered between the two
//! passes is caught by age's authenticated encryption, not by the signature.)

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{Identity, PublicKeys};
use crate::wire::{Cursor, PullResponse, PushRequest, Receipt};

pub const MAGIC: &[u8; 4] = b"CSYB";
pub const TRAILER_MAGIC: &[u8; 4] = b"CSYE";
pub const VERSION: u16 = 1;
const TRAILER_LEN: u64 = 4 + 8 + 64;
const MAX_HEADER: usize = 4096;
/// Largest single item accepted inside a bundle (decompressed).
const MAX_ITEM: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: not a clinicsync bundle (bad magic bytes)")]
    BadMagic { path: PathBuf },
    #[error("bundle format version {0} is not supported (this node reads version {VERSION})")]
    Version(u16),
    #[error("bundle is truncated: {0}")]
    Truncated(String),
    #[error("bundle signature does not match: the bundle was altered or corrupted ({0})")]
    BadSignature(String),
    #[error(
        "bundle is signed by {0:?}, which this node does not trust (see `clinicsync keys trust`)"
    )]
    Untrusted(String),
    #[error("bundle is encrypted to {to:?}, not to this node ({me:?})")]
    WrongRecipient { to: String, me: String },
    #[error("bundle cannot be decrypted: {0}")]
    Decrypt(String),
    #[error("bundle content is invalid: {0}")]
    Content(String),
    #[error("no space left on {path} after {written} bytes; no bundle was left behind")]
    Full { path: PathBuf, written: u64 },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}

impl BundleError {
    fn io(path: &Path, e: io::Error) -> BundleError {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            return BundleError::Full {
                path: path.to_path_buf(),
                written: 0,
            };
        }
        BundleError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// Plaintext header, covered by the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleHeader {
    /// Random id, hex.
    pub id: String,
    /// `export` (child → parent) or `return` (parent → child).
    pub kind: String,
    pub sender: String,
    pub recipient: String,
    /// Per sender → recipient, increasing: older bundles are refused after newer ones.
    pub seq: u64,
    pub created_ms: u64,
    pub part_size: u64,
}

/// One unit of a bundle's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Item {
    /// Export: a batch of outbox records, exactly as a network push.
    Push(PushRequest),
    /// Export: where the child's pull cursor stands.
    PullState { cursor: Cursor, include_own: bool },
    /// Return: the parent's answers for pushed records.
    Receipts(Vec<Receipt>),
    /// Return: a pull page from the child's cursor.
    Page(PullResponse),
    /// Last item: how many came before it.
    End { items: u64 },
}

// ---------------------------------------------------------------- writing

/// Writes a stream into numbered part files under temporary names.
struct PartWriter {
    base: PathBuf,
    part_size: u64,
    parts: Vec<PathBuf>,
    current: Option<File>,
    in_part: u64,
    written: u64,
}

impl PartWriter {
    fn new(base: PathBuf, part_size: u64) -> PartWriter {
        // Parts a killed writer left under temporary names are not a bundle: clear them.
        if let (Some(dir), Some(name)) = (base.parent(), base.file_name()) {
            let prefix = name.to_string_lossy().to_string();
            if let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }) {
                for e in entries.flatten() {
                    let n = e.file_name().to_string_lossy().to_string();
                    if n.starts_with(&prefix) && n.ends_with(".tmp") {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        PartWriter {
            base,
            part_size: if part_size == 0 { u64::MAX } else { part_size },
            parts: Vec::new(),
            current: None,
            in_part: 0,
            written: 0,
        }
    }

    fn part_name(base: &Path, n: usize) -> PathBuf {
        let mut s = base.as_os_str().to_owned();
        s.push(format!(".{n:03}"));
        PathBuf::from(s)
    }

    fn tmp(p: &Path) -> PathBuf {
        let mut s = p.as_os_str().to_owned();
        s.push(".tmp");
        PathBuf::from(s)
    }

    fn open_next(&mut self) -> io::Result<()> {
        if let Some(f) = self.current.take() {
            f.sync_all()?;
        }
        let name = PartWriter::part_name(&self.base, self.parts.len() + 1);
        let f = File::create(PartWriter::tmp(&name))?;
        self.parts.push(name);
        self.current = Some(f);
        self.in_part = 0;
        Ok(())
    }

    /// Syncs and renames every part to its final name.
    fn finish(mut self) -> io::Result<Vec<PathBuf>> {
        if let Some(f) = self.current.take() {
            f.sync_all()?;
        }
        for p in &self.parts {
            std::fs::rename(PartWriter::tmp(p), p)?;
        }
        Ok(std::mem::take(&mut self.parts))
    }
}

impl Write for PartWriter {
    // Writes the whole buffer, crossing part boundaries: some writers above us (age's
    // header encoder) treat a short write as an error.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            if self.current.is_none() || self.in_part >= self.part_size {
                self.open_next()?;
            }
            let room = (self.part_size - self.in_part).min((buf.len() - done) as u64) as usize;
            let f = self
                .current
                .as_mut()
                .ok_or_else(|| io::Error::other("no open part"))?;
            f.write_all(&buf[done..done + room])?;
            self.in_part += room as u64;
            self.written += room as u64;
            done += room;
        }
        Ok(done)
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.current {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for PartWriter {
    fn drop(&mut self) {
        // Not finished: leave nothing that could be taken for a bundle.
        for p in &self.parts {
            let _ = std::fs::remove_file(PartWriter::tmp(p));
        }
    }
}

struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Streams items into an encrypted, signed bundle. Call [`BundleWriter::finish`];
/// dropping it unfinished removes what was written.
pub struct BundleWriter {
    stream: Option<
        zstd::stream::write::Encoder<'static, age::stream::StreamWriter<Hashing<PartWriter>>>,
    >,
    signer: ed25519_dalek::SigningKey,
    path: PathBuf,
    items: u64,
    pub header: BundleHeader,
}

impl BundleWriter {
    pub fn create(
        path: &Path,
        header: BundleHeader,
        me: &Identity,
        to: &PublicKeys,
    ) -> Result<BundleWriter, BundleError> {
        let mut out = Hashing {
            inner: PartWriter::new(path.to_path_buf(), header.part_size),
            hash: Sha256::new(),
            len: 0,
        };
        let head = to_cbor(&header)?;
        let err = |e| BundleError::io(path, e);
        out.write_all(MAGIC).map_err(err)?;
        out.write_all(&VERSION.to_be_bytes()).map_err(err)?;
        out.write_all(&(head.len() as u32).to_be_bytes())
            .map_err(err)?;
        out.write_all(&head).map_err(err)?;
        let recipient: &dyn age::Recipient = &to.age;
        let enc = age::Encryptor::with_recipients(std::iter::once(recipient))
            .map_err(|e| BundleError::Content(format!("cannot encrypt to {}: {e}", to.node)))?;
        let age_out = enc.wrap_output(out).map_err(err)?;
        let z = zstd::stream::write::Encoder::new(age_out, 6).map_err(err)?;
        Ok(BundleWriter {
            stream: Some(z),
            signer: me.signing.clone(),
            path: path.to_path_buf(),
            items: 0,
            header,
        })
    }

    pub fn write(&mut self, item: &Item) -> Result<(), BundleError> {
        let bytes = to_cbor(item)?;
        let path = self.path.clone();
        let s = self
            .stream
            .as_mut()
            .ok_or_else(|| BundleError::Content("bundle already finished".into()))?;
        s.write_all(&bytes).map_err(|e| BundleError::io(&path, e))?;
        self.items += 1;
        Ok(())
    }

    /// Writes `End`, the trailer and signature, syncs, and gives the part files their
    /// final names.
    pub fn finish(mut self) -> Result<Vec<PathBuf>, BundleError> {
        let items = self.items;
        self.write(&Item::End { items })?;
        let path = self.path.clone();
        let err = |e| BundleError::io(&path, e);
        let z = self
            .stream
            .take()
            .ok_or_else(|| BundleError::Content("bundle already finished".into()))?;
        let age_out = z.finish().map_err(err)?;
        let hashing = age_out.finish().map_err(err)?;
        let digest: [u8; 32] = hashing.hash.finalize().into();
        let len = hashing.len;
        let mut parts = hashing.inner;
        use ed25519_dalek::Signer;
        let sig = self.signer.sign(&digest);
        parts.write_all(TRAILER_MAGIC).map_err(err)?;
        parts.write_all(&len.to_be_bytes()).map_err(err)?;
        parts.write_all(&sig.to_bytes()).map_err(err)?;
        let written = parts.written;
        parts.finish().map_err(|e| match BundleError::io(&path, e) {
            BundleError::Full { path, .. } => BundleError::Full { path, written },
            other => other,
        })
    }
}

fn to_cbor<T: Serialize>(v: &T) -> Result<Vec<u8>, BundleError> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(v, &mut out).map_err(|e| BundleError::Content(e.to_string()))?;
    Ok(out)
}

// ---------------------------------------------------------------- reading

/// The part files of a bundle, found from any one of them (or the base name).
pub fn find_parts(path: &Path) -> Result<Vec<PathBuf>, BundleError> {
    let s = path.to_string_lossy();
    let base = match s.rsplit_once('.') {
        Some((b, ext)) if ext.len() == 3 && ext.chars().all(|c| c.is_ascii_digit()) => {
            PathBuf::from(b)
        }
        _ => path.to_path_buf(),
    };
    let mut parts = Vec::new();
    for n in 1.. {
        let p = PartWriter::part_name(&base, n);
        if !p.exists() {
            break;
        }
        parts.push(p);
    }
    if parts.is_empty() {
        if path.is_file() {
            return Ok(vec![path.to_path_buf()]);
        }
        return Err(BundleError::Io {
            path: path.to_path_buf(),
            message: "no such bundle (expected <name>.001)".into(),
        });
    }
    Ok(parts)
}

/// Reads the parts as one stream.
struct PartReader {
    parts: Vec<PathBuf>,
    next: usize,
    current: Option<BufReader<File>>,
}

impl PartReader {
    fn new(parts: Vec<PathBuf>) -> PartReader {
        PartReader {
            parts,
            next: 0,
            current: None,
        }
    }
}

impl Read for PartReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.current.is_none() {
                let Some(p) = self.parts.get(self.next) else {
                    return Ok(0);
                };
                self.current = Some(BufReader::with_capacity(1 << 16, File::open(p)?));
                self.next += 1;
            }
            let n = self
                .current
                .as_mut()
                .map(|r| r.read(buf))
                .unwrap_or(Ok(0))?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            self.current = None;
        }
    }
}

/// A bundle whose signature has been checked.
pub struct VerifiedBundle {
    pub header: BundleHeader,
    parts: Vec<PathBuf>,
    payload_start: u64,
    payload_len: u64,
    pub total_bytes: u64,
}

/// Reads the header only (to know the sender before choosing a key).
pub fn read_header(path: &Path) -> Result<(BundleHeader, Vec<PathBuf>, u64), BundleError> {
    let parts = find_parts(path)?;
    let mut r = PartReader::new(parts.clone());
    let mut fixed = [0u8; 10];
    r.read_exact(&mut fixed).map_err(|_| {
        BundleError::Truncated(format!(
            "{} is shorter than a bundle header",
            path.display()
        ))
    })?;
    if &fixed[..4] != MAGIC {
        return Err(BundleError::BadMagic {
            path: path.to_path_buf(),
        });
    }
    let version = u16::from_be_bytes([fixed[4], fixed[5]]);
    if version != VERSION {
        return Err(BundleError::Version(version));
    }
    let hlen = u32::from_be_bytes([fixed[6], fixed[7], fixed[8], fixed[9]]) as usize;
    if hlen > MAX_HEADER {
        return Err(BundleError::Content(format!(
            "header of {hlen} bytes is over {MAX_HEADER}"
        )));
    }
    let mut head = vec![0u8; hlen];
    r.read_exact(&mut head)
        .map_err(|_| BundleError::Truncated("the header is cut short".into()))?;
    let header: BundleHeader = ciborium::de::from_reader(head.as_slice())
        .map_err(|e| BundleError::Content(format!("unreadable header: {e}")))?;
    Ok((header, parts, 10 + hlen as u64))
}

/// Checks structure, recipient and signature; reads every byte once.
pub fn verify(
    path: &Path,
    me: &str,
    trusted: &dyn Fn(&str) -> Option<PublicKeys>,
) -> Result<VerifiedBundle, BundleError> {
    let (header, parts, payload_start) = read_header(path)?;
    if header.recipient != me {
        return Err(BundleError::WrongRecipient {
            to: header.recipient.clone(),
            me: me.to_string(),
        });
    }
    let sender =
        trusted(&header.sender).ok_or_else(|| BundleError::Untrusted(header.sender.clone()))?;
    let mut sizes = Vec::new();
    for p in &parts {
        sizes.push(
            std::fs::metadata(p)
                .map_err(|e| BundleError::io(p, e))?
                .len(),
        );
    }
    let total: u64 = sizes.iter().sum();
    if header.part_size > 0 {
        if let Some(i) = sizes[..sizes.len() - 1]
            .iter()
            .position(|&s| s != header.part_size)
        {
            return Err(BundleError::Truncated(format!(
                "part {} is {} bytes, expected {}",
                parts[i].display(),
                sizes[i],
                header.part_size
            )));
        }
    }
    if total < payload_start + TRAILER_LEN {
        return Err(BundleError::Truncated(format!(
            "only {total} bytes; the trailer is missing"
        )));
    }
    let signed_len = total - TRAILER_LEN;
    let mut r = PartReader::new(parts.clone());
    let mut hash = Sha256::new();
    let mut left = signed_len;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..want])
            .map_err(|e| BundleError::Truncated(e.to_string()))?;
        hash.update(&buf[..want]);
        left -= want as u64;
    }
    let mut trailer = [0u8; TRAILER_LEN as usize];
    r.read_exact(&mut trailer)
        .map_err(|e| BundleError::Truncated(e.to_string()))?;
    if &trailer[..4] != TRAILER_MAGIC {
        return Err(BundleError::Truncated(
            "the trailer is missing (was the stick pulled during export, or a part lost?)".into(),
        ));
    }
    let claimed = u64::from_be_bytes(trailer[4..12].try_into().unwrap_or([0; 8]));
    if claimed != signed_len {
        return Err(BundleError::Truncated(format!(
            "trailer says {claimed} bytes, found {signed_len}"
        )));
    }
    let sig = ed25519_dalek::Signature::from_bytes(trailer[12..].try_into().unwrap_or(&[0; 64]));
    let digest: [u8; 32] = hash.finalize().into();
    use ed25519_dalek::Verifier;
    sender.verifying.verify(&digest, &sig).map_err(|_| {
        BundleError::BadSignature(format!("checked against {}'s trusted key", header.sender))
    })?;
    Ok(VerifiedBundle {
        header,
        parts,
        payload_start,
        payload_len: signed_len - payload_start,
        total_bytes: total,
    })
}

/// Bounds one CBOR item read from the decompressed stream.
struct ItemLimit<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ItemLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other(format!(
                "an item is larger than {MAX_ITEM} bytes"
            )));
        }
        let want = (buf.len() as u64).min(self.left) as usize;
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

type PayloadReader = zstd::stream::read::Decoder<
    'static,
    BufReader<age::stream::StreamReader<io::Take<PartReader>>>,
>;

/// Decrypts and yields items one by one (constant memory).
pub struct ItemReader {
    inner: ItemLimit<PayloadReader>,
    seen: u64,
    ended: bool,
}

impl VerifiedBundle {
    pub fn items(&self, me: &Identity) -> Result<ItemReader, BundleError> {
        let mut r = PartReader::new(self.parts.clone());
        io::copy(&mut (&mut r).take(self.payload_start), &mut io::sink())
            .map_err(|e| BundleError::Truncated(e.to_string()))?;
        let payload = r.take(self.payload_len);
        let dec = age::Decryptor::new(payload).map_err(|e| BundleError::Decrypt(e.to_string()))?;
        let identity: &dyn age::Identity = &me.age;
        let plain = dec
            .decrypt(std::iter::once(identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => BundleError::Decrypt(
                    "it was not encrypted to this node's key (keys changed since it was written?)"
                        .into(),
                ),
                other => BundleError::Decrypt(other.to_string()),
            })?;
        let mut z = zstd::stream::read::Decoder::new(plain)
            .map_err(|e| BundleError::Decrypt(e.to_string()))?;
        z.window_log_max(24)
            .map_err(|e| BundleError::Decrypt(e.to_string()))?;
        Ok(ItemReader {
            inner: ItemLimit {
                inner: z,
                left: MAX_ITEM,
            },
            seen: 0,
            ended: false,
        })
    }
}

impl ItemReader {
    /// The next item, `None` after a correct `End`.
    pub fn next_item(&mut self) -> Result<Option<Item>, BundleError> {
        if self.ended {
            return Ok(None);
        }
        self.inner.left = MAX_ITEM;
        let item: Item = ciborium::de::from_reader_with_recursion_limit(&mut self.inner, 16)
            .map_err(|e| match e {
                ciborium::de::Error::Io(io) => {
                    BundleError::Decrypt(format!("payload unreadable: {io}"))
                }
                other => BundleError::Content(other.to_string()),
            })?;
        if let Item::End { items } = item {
            if items != self.seen {
                return Err(BundleError::Truncated(format!(
                    "End says {items} items, read {}",
                    self.seen
                )));
            }
            self.ended = true;
            return Ok(None);
        }
        self.seen += 1;
        Ok(Some(item))
    }
}

/// A fresh random bundle id.
pub fn new_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(part_size: u64) -> BundleHeader {
        BundleHeader {
            id: "00".into(),
            kind: "export".into(),
            sender: "a".into(),
            recipient: "hub".into(),
            seq: 1,
            created_ms: 0,
            part_size,
        }
    }

    #[test]
    fn a_bundle_round_trips_across_parts() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::init(&dir.path().join("ka"), "a").unwrap();
        let hub = Identity::init(&dir.path().join("kh"), "hub").unwrap();
        let path = dir.path().join("b.csb");
        let mut w = BundleWriter::create(&path, header(300), &a, &hub.public()).unwrap();
        for i in 0..50 {
            w.write(&Item::PullState {
                cursor: Cursor { eff: i, seq: i },
                include_own: false,
            })
            .unwrap();
        }
        let parts = w.finish().unwrap();
        assert!(parts.len() > 1, "{parts:?}");
        let trusted = |n: &str| (n == "a").then(|| a.public());
        let v = verify(&parts[1], "hub", &trusted).unwrap();
        let mut items = v.items(&hub).unwrap();
        let mut n = 0;
        while items.next_item().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 50);
        assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .path()
            .to_string_lossy()
            .ends_with(".tmp")));
    }

    #[test]
    fn an_unfinished_bundle_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::init(&dir.path().join("ka"), "a").unwrap();
        let hub = Identity::init(&dir.path().join("kh"), "hub").unwrap();
        let path = dir.path().join("b.csb");
        let mut w = BundleWriter::create(&path, header(0), &a, &hub.public()).unwrap();
        w.write(&Item::PullState {
            cursor: Cursor::default(),
            include_own: true,
        })
        .unwrap();
        drop(w);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            left.iter()
                .all(|n| !n.to_string_lossy().starts_with("b.csb")),
            "{left:?}"
        );
    }
}
