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
//! - What is verified is exactly what is applied. [`verify`] reads the parts once,
//!   hashing each byte as it copies it into a private copy: an unnamed 0600 file in
//!   a 0700 directory beside the store (`<store dir>/import-tmp/`), bounded by the
//!   length the trailer declares and checked against the free space first. The
//!   signature is checked on that hash, the header is parsed again from the copy,
//!   and [`VerifiedBundle::items`] decrypts only the copy. A stick whose files are
//!   swapped or rewritten during or after verification changes nothing: bytes
//!   changed while being copied fail the signature, bytes changed later are never
//!   read. (age alone authenticates nothing here: anyone can encrypt to a public
//!   key.) The copy has no name, so it vanishes with the process, even on SIGKILL.
//! - Export writes parts under `*.tmp` names and renames them only after the trailer
//!   is written and synced, so a bundle cut short by a full stick is never mistaken
//!   for a complete one; on failure the parts written so far are removed.
//! - `Item::End` carries the item count, so a payload cut at an AEAD chunk boundary
//!   is still refused.
//! - Items are applied with exactly the engine functions the network uses, so a
//!   record that comes both ways is integrated once, and receipts are idempotent.
//!
//! What an error leaves behind: export — no bundle, the outbox untouched. Import —
//! refused before any write (`NoRoom` when the private copy does not fit, with the
//! sizes), except an interruption after application began: then each applied item
//! is committed, progress is kept, and importing again copies and verifies the
//! bundle again and resumes.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Classify, ErrorClass};
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
    #[error(
        "not enough free space in {} to check the bundle in private: it needs {need} bytes, {} free; free some space on that filesystem and import again (nothing was applied)",
        dir.display(),
        free.map(|f| f.to_string()).unwrap_or_else(|| "an unknown number of bytes".into())
    )]
    NoRoom {
        dir: PathBuf,
        need: u64,
        free: Option<u64>,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The private directory bundles are copied into could not be prepared or written.
    #[error("{}: cannot prepare the private import directory: {source}", dir.display())]
    Staging {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The private copy, written complete and hashed, cannot be read back (short:
    /// it does not hold what was written into it).
    #[error("cannot read the private copy of the bundle back: {source}")]
    Copy {
        #[source]
        source: io::Error,
    },
}

/// What a bundle's errors mean (see [`crate::error`]). A bundle that fails its checks
/// — cut short, altered, forged, not for us — is outside input refused as a whole:
/// permanent for that bundle (bring a good copy), never corruption of this node,
/// which applied nothing from it. Corruption is the private copy not reading back
/// what was written into it a moment before: this node's own disk. A full stick or
/// filesystem needs a person.
impl Classify for BundleError {
    fn class(&self) -> ErrorClass {
        match self {
            BundleError::BadMagic { .. }
            | BundleError::Version(_)
            | BundleError::Truncated(_)
            | BundleError::BadSignature(_)
            | BundleError::Untrusted(_)
            | BundleError::WrongRecipient { .. }
            | BundleError::Decrypt(_)
            | BundleError::Content(_)
            | BundleError::Full { .. }
            | BundleError::NoRoom { .. } => ErrorClass::Permanent,
            BundleError::Io { source, .. } | BundleError::Staging { source, .. } => source.class(),
            BundleError::Copy { source } if source.kind() == io::ErrorKind::UnexpectedEof => {
                ErrorClass::Corruption
            }
            BundleError::Copy { source } => source.class(),
        }
    }
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
            source: e,
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
    /// `health` (added in 0.2 within v1; absent from older bundles): the sender's
    /// health report and its descendants' (`crate::health`).
    PullState {
        cursor: Cursor,
        include_own: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        health: Vec<crate::wire::health::HealthReport>,
        /// Results of the parent's orders (`crate::remote`), like `health`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        order_results: Vec<crate::wire::orders::OrderResult>,
    },
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
            source: io::Error::new(
                io::ErrorKind::NotFound,
                "no such bundle (expected <name>.001)",
            ),
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

/// A bundle whose signature has been checked, held in a private copy: the bytes
/// that were hashed are the only bytes [`VerifiedBundle::items`] ever decrypts.
pub struct VerifiedBundle {
    pub header: BundleHeader,
    /// An unnamed 0600 file in the private directory: no path leads to it, and it
    /// disappears when the last descriptor closes (also on SIGKILL).
    copy: File,
    payload_start: u64,
    payload_len: u64,
    pub total_bytes: u64,
}

/// Room kept free beside the private copy for the store's own writes.
const STAGING_HEADROOM: u64 = 16 << 20;

/// Reads the header only (to know the sender before choosing a key).
pub fn read_header(path: &Path) -> Result<(BundleHeader, Vec<PathBuf>, u64), BundleError> {
    let parts = find_parts(path)?;
    let (header, start) = parse_header(PartReader::new(parts.clone()), path)?;
    Ok((header, parts, start))
}

fn parse_header(mut r: impl Read, path: &Path) -> Result<(BundleHeader, u64), BundleError> {
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
    Ok((header, 10 + hlen as u64))
}

/// Checks the trailer's magic and declared length; returns the signature.
fn check_trailer(
    trailer: &[u8; TRAILER_LEN as usize],
    signed_len: u64,
) -> Result<[u8; 64], BundleError> {
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
    Ok(trailer[12..].try_into().unwrap_or([0; 64]))
}

/// Reads `buf.len()` bytes at `offset` of the stream the parts make up.
fn read_parts_at(
    parts: &[PathBuf],
    sizes: &[u64],
    mut offset: u64,
    buf: &mut [u8],
) -> Result<(), BundleError> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    for (p, &size) in parts.iter().zip(sizes) {
        if done == buf.len() {
            break;
        }
        if offset >= size {
            offset -= size;
            continue;
        }
        let want = ((size - offset) as usize).min(buf.len() - done);
        File::open(p)
            .and_then(|f| f.read_exact_at(&mut buf[done..done + want], offset))
            .map_err(|e| BundleError::Truncated(format!("{}: {e}", p.display())))?;
        done += want;
        offset = 0;
    }
    if done < buf.len() {
        return Err(BundleError::Truncated("the trailer is cut short".into()));
    }
    Ok(())
}

/// Free bytes for an unprivileged user on the filesystem holding `dir` (statvfs).
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statvfs is a valid value; statvfs fills it for a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a live out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Removes copies a process killed between creating and unlinking them may have
/// left (only where the system lacks unnamed files); recent ones may be in use.
fn clear_stale_copies(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let stale = e
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(600));
        if stale && e.file_name().to_string_lossy().starts_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Checks structure, recipient and signature, reading every byte of the parts once
/// into a private copy in `private_dir` (created 0700) while hashing it; the items
/// are later decrypted from that copy, never from the parts again.
pub fn verify(
    path: &Path,
    me: &str,
    trusted: &dyn Fn(&str) -> Option<PublicKeys>,
    private_dir: &Path,
) -> Result<VerifiedBundle, BundleError> {
    verify_with(path, me, trusted, private_dir, &mut |_| {})
}

/// [`verify`], calling `after_part(i)` once part `i` has been copied (tests use it
/// to change the stick under a running verification).
fn verify_with(
    path: &Path,
    me: &str,
    trusted: &dyn Fn(&str) -> Option<PublicKeys>,
    private_dir: &Path,
    after_part: &mut dyn FnMut(usize),
) -> Result<VerifiedBundle, BundleError> {
    // Cheap refusals first, from the parts themselves; everything they decided is
    // checked again on the private copy below.
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
    // The trailer declares the signed length: nothing more than that (and the
    // trailer) is ever copied.
    let signed_len = total - TRAILER_LEN;
    let mut trailer = [0u8; TRAILER_LEN as usize];
    read_parts_at(&parts, &sizes, signed_len, &mut trailer)?;
    check_trailer(&trailer, signed_len)?;

    let dir_err = |source: io::Error| BundleError::Staging {
        dir: private_dir.to_path_buf(),
        source,
    };
    crate::filemode::private_dir(private_dir).map_err(dir_err)?;
    clear_stale_copies(private_dir);
    let no_room = |free: Option<u64>| BundleError::NoRoom {
        dir: private_dir.to_path_buf(),
        need: total + STAGING_HEADROOM,
        free,
    };
    let free = free_bytes(private_dir);
    if free.is_some_and(|f| f < total + STAGING_HEADROOM) {
        return Err(no_room(free));
    }
    let copy = crate::filemode::unnamed_file_in(private_dir).map_err(dir_err)?;
    let mut out = io::BufWriter::with_capacity(1 << 16, &copy);
    let write_err = |e: io::Error| {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            no_room(free_bytes(private_dir))
        } else {
            dir_err(e)
        }
    };
    let mut hash = Sha256::new();
    let mut at = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    for (i, (p, &size)) in parts.iter().zip(&sizes).enumerate() {
        let f = File::open(p).map_err(|e| BundleError::io(p, e))?;
        // Bounded by the size measured above: a part that grows is not read further.
        let mut r = f.take(size);
        let mut left = size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..want]).map_err(|e| {
                BundleError::Truncated(format!(
                    "{} changed while it was being read: {e}",
                    p.display()
                ))
            })?;
            let signed = (signed_len.saturating_sub(at)).min(want as u64) as usize;
            hash.update(&buf[..signed]);
            out.write_all(&buf[..want]).map_err(write_err)?;
            at += want as u64;
            left -= want as u64;
        }
        after_part(i);
    }
    out.flush().map_err(write_err)?;
    drop(out);

    // From here on only the private copy is read.
    use std::os::unix::fs::FileExt;
    let (again, start_again) = parse_header(CopyReader::new(&copy, 0)?, path)?;
    if again != header || start_again != payload_start {
        return Err(BundleError::BadSignature(
            "the header changed while the bundle was being read".into(),
        ));
    }
    copy.read_exact_at(&mut trailer, signed_len)
        .map_err(|source| BundleError::Copy { source })?;
    let sig = ed25519_dalek::Signature::from_bytes(&check_trailer(&trailer, signed_len)?);
    let digest: [u8; 32] = hash.finalize().into();
    use ed25519_dalek::Verifier;
    sender.verifying.verify(&digest, &sig).map_err(|_| {
        BundleError::BadSignature(format!("checked against {}'s trusted key", header.sender))
    })?;
    Ok(VerifiedBundle {
        header,
        copy,
        payload_start,
        payload_len: signed_len - payload_start,
        total_bytes: total,
    })
}

/// Reads the private copy from an offset, independently of any other reader.
struct CopyReader {
    file: File,
    pos: u64,
}

impl CopyReader {
    fn new(file: &File, pos: u64) -> Result<CopyReader, BundleError> {
        Ok(CopyReader {
            file: file
                .try_clone()
                .map_err(|source| BundleError::Copy { source })?,
            pos,
        })
    }
}

impl Read for CopyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
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
    BufReader<age::stream::StreamReader<io::Take<BufReader<CopyReader>>>>,
>;

/// Decrypts and yields items one by one (constant memory).
pub struct ItemReader {
    inner: ItemLimit<PayloadReader>,
    seen: u64,
    ended: bool,
}

impl VerifiedBundle {
    /// Decrypts the payload of the private copy, item by item.
    pub fn items(&self, me: &Identity) -> Result<ItemReader, BundleError> {
        let r = CopyReader::new(&self.copy, self.payload_start)?;
        let payload = BufReader::with_capacity(1 << 16, r).take(self.payload_len);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_bundle_is_a_permanent_refusal_and_a_short_private_copy_is_corruption() {
        use std::io::ErrorKind;
        let p = || PathBuf::from("/media/stick/b.001");
        let cases = [
            (BundleError::BadMagic { path: p() }, ErrorClass::Permanent),
            (BundleError::Version(9), ErrorClass::Permanent),
            (BundleError::Truncated("cut".into()), ErrorClass::Permanent),
            (BundleError::BadSignature("x".into()), ErrorClass::Permanent),
            (BundleError::Untrusted("x".into()), ErrorClass::Permanent),
            (
                BundleError::WrongRecipient {
                    to: "b".into(),
                    me: "a".into(),
                },
                ErrorClass::Permanent,
            ),
            (BundleError::Decrypt("x".into()), ErrorClass::Permanent),
            (BundleError::Content("x".into()), ErrorClass::Permanent),
            (
                BundleError::Full {
                    path: p(),
                    written: 1,
                },
                ErrorClass::Permanent,
            ),
            (
                BundleError::NoRoom {
                    dir: p(),
                    need: 2,
                    free: Some(1),
                },
                ErrorClass::Permanent,
            ),
            (
                BundleError::Io {
                    path: p(),
                    source: ErrorKind::NotFound.into(),
                },
                ErrorClass::Permanent,
            ),
            (
                BundleError::Staging {
                    dir: p(),
                    source: ErrorKind::PermissionDenied.into(),
                },
                ErrorClass::Permanent,
            ),
            (
                BundleError::Copy {
                    source: ErrorKind::UnexpectedEof.into(),
                },
                ErrorClass::Corruption,
            ),
            (
                BundleError::Copy {
                    source: std::io::Error::from_raw_os_error(libc::EMFILE),
                },
                ErrorClass::Permanent,
            ),
        ];
        for (e, class) in cases {
            assert_eq!(e.class(), class, "{e}");
        }
        // A full disk is named as such, not as an I/O error.
        let full = BundleError::io(&p(), std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(full, BundleError::Full { .. }), "{full}");
        let missing = find_parts(Path::new("/nonexistent/bundle")).unwrap_err();
        assert!(
            missing.to_string().contains("no such bundle") && missing.is_permanent(),
            "{missing}"
        );
    }

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
                health: Vec::new(),
                order_results: Vec::new(),
            })
            .unwrap();
        }
        let parts = w.finish().unwrap();
        assert!(parts.len() > 1, "{parts:?}");
        let trusted = |n: &str| (n == "a").then(|| a.public());
        let v = verify(&parts[1], "hub", &trusted, &dir.path().join("import-tmp")).unwrap();
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

    /// Item `i` of a test bundle: numbers zstd cannot shrink, so parts fill up.
    fn item(i: u64) -> Item {
        let x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Item::PullState {
            cursor: Cursor {
                eff: x,
                seq: x.rotate_left(17),
            },
            include_own: false,
            health: Vec::new(),
            order_results: Vec::new(),
        }
    }

    /// A genuine bundle from "a" to "hub" of `n` items, in parts of `part_size`.
    fn genuine(dir: &Path, n: u64, part_size: u64) -> (Identity, Identity, Vec<PathBuf>) {
        let a = Identity::init(&dir.join("ka"), "a").unwrap();
        let hub = Identity::init(&dir.join("kh"), "hub").unwrap();
        let stick = dir.join("stick");
        std::fs::create_dir_all(&stick).unwrap();
        let mut w =
            BundleWriter::create(&stick.join("b.csb"), header(part_size), &a, &hub.public())
                .unwrap();
        for i in 0..n {
            w.write(&item(i)).unwrap();
        }
        (a, hub, w.finish().unwrap())
    }

    fn all_items(v: &VerifiedBundle, me: &Identity) -> Vec<Item> {
        let mut r = v.items(me).unwrap();
        let mut out = Vec::new();
        while let Some(i) = r.next_item().unwrap() {
            out.push(i);
        }
        out
    }

    /// The decrypted (still compressed) payload of a bundle's bytes, read as a
    /// reader that trusts whatever the stick holds would read it.
    fn plaintext(bytes: &[u8], start: usize, len: usize, me: &Identity) -> Vec<u8> {
        let dec = age::Decryptor::new(&bytes[start..start + len]).unwrap();
        let id: &dyn age::Identity = &me.age;
        let mut out = Vec::new();
        dec.decrypt(std::iter::once(id))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// What anyone can make with the hub's public key alone: `items`, compressed
    /// and encrypted to the hub, exactly `cipher_len` bytes long (a zstd skippable
    /// frame pads the plaintext; age's random grease stanza is retried until the
    /// lengths line up).
    fn forged_payload(items: &[Item], cipher_len: usize, hub: &PublicKeys) -> Vec<u8> {
        let mut cbor = Vec::new();
        for i in items {
            ciborium::ser::into_writer(i, &mut cbor).unwrap();
        }
        let packed = zstd::encode_all(cbor.as_slice(), 3).unwrap();
        let mut guess = cipher_len / 2;
        for _ in 0..100_000 {
            let mut plain = packed.clone();
            let pad = guess.checked_sub(packed.len() + 8).expect("room to pad");
            plain.extend(0x184D_2A50u32.to_le_bytes());
            plain.extend((pad as u32).to_le_bytes());
            plain.extend(std::iter::repeat(0u8).take(pad));
            let r: &dyn age::Recipient = &hub.age;
            let enc = age::Encryptor::with_recipients(std::iter::once(r)).unwrap();
            let mut out = Vec::new();
            let mut w = enc.wrap_output(&mut out).unwrap();
            w.write_all(&plain).unwrap();
            w.finish().unwrap();
            if out.len() == cipher_len {
                return out;
            }
            guess = (guess as i64 + cipher_len as i64 - out.len() as i64) as usize;
        }
        panic!("could not forge a payload of {cipher_len} bytes");
    }

    #[test]
    fn a_bundle_swapped_on_the_stick_after_verification_is_never_applied() {
        let dir = tempfile::tempdir().unwrap();
        let (a, hub, parts) = genuine(dir.path(), 300, 0);
        let trusted = |n: &str| (n == "a").then(|| a.public());
        let bytes = std::fs::read(&parts[0]).unwrap();
        let v = verify(&parts[0], "hub", &trusted, &dir.path().join("import-tmp")).unwrap();
        let (start, len) = (v.payload_start as usize, v.payload_len as usize);

        // Between verification and decryption the stick now holds the same header,
        // then a payload of the same length that anyone could have encrypted to the
        // hub, then the genuine trailer.
        let evil = Item::PullState {
            cursor: Cursor {
                eff: 666_666,
                seq: 666_666,
            },
            include_own: true,
            health: Vec::new(),
            order_results: Vec::new(),
        };
        let forged = forged_payload(&[evil.clone(), Item::End { items: 1 }], len, &hub.public());
        let mut swapped = bytes[..start].to_vec();
        swapped.extend(&forged);
        swapped.extend(&bytes[start + len..]);
        assert_eq!(swapped.len(), bytes.len());
        std::fs::write(&parts[0], &swapped).unwrap();
        // A second pass over the stick would decrypt the forgery without complaint.
        let forged_plain = plaintext(&swapped, start, len, &hub);
        let mut z = zstd::stream::read::Decoder::new(forged_plain.as_slice()).unwrap();
        let first: Item = ciborium::de::from_reader(&mut z).unwrap();
        assert_eq!(first, evil, "the forgery is valid age to the hub");

        let got = all_items(&v, &hub);
        assert_eq!(got.len(), 300, "every signed item, and only those");
        assert!(!got.contains(&evil), "the swapped-in payload was applied");
        assert_eq!(got[0], item(0));
        // And the swapped stick verifies no more.
        assert!(matches!(
            verify(&parts[0], "hub", &trusted, &dir.path().join("import-tmp")),
            Err(BundleError::BadSignature(_))
        ));
    }

    #[test]
    fn a_part_swapped_while_the_bundle_is_being_read_fails_the_signature() {
        let dir = tempfile::tempdir().unwrap();
        let (a, hub, parts) = genuine(dir.path(), 1000, 4096);
        assert!(parts.len() >= 3, "{parts:?}");
        let trusted = |n: &str| (n == "a").then(|| a.public());
        // The same bundle written again: the same header, another encryption of the
        // same content (another file key), so its parts are valid age ciphertext to
        // the hub but not the signed bytes.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        let mut w =
            BundleWriter::create(&other.join("b.csb"), header(4096), &a, &hub.public()).unwrap();
        for i in 0..1000 {
            w.write(&item(i)).unwrap();
        }
        let other_parts = w.finish().unwrap();
        let private = dir.path().join("import-tmp");
        let mut swap = |i: usize| {
            if i == 0 {
                std::fs::copy(&other_parts[1], &parts[1]).unwrap();
            }
        };
        let r = verify_with(&parts[0], "hub", &trusted, &private, &mut swap);
        assert!(
            matches!(r, Err(BundleError::BadSignature(_))),
            "{:?}",
            r.err()
        );
        // Nothing of the copy is left in the private directory.
        assert_eq!(std::fs::read_dir(&private).unwrap().count(), 0);
    }

    #[test]
    fn the_private_copy_lives_in_a_0700_directory_and_has_no_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, hub, parts) = genuine(dir.path(), 10, 0);
        let trusted = |n: &str| (n == "a").then(|| a.public());
        let private = dir.path().join("store-dir/import-tmp");
        let v = verify(&parts[0], "hub", &trusted, &private).unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(std::fs::read_dir(&private).unwrap().count(), 0);
        let mode = v.copy.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(all_items(&v, &hub).len(), 10);
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
            health: Vec::new(),
            order_results: Vec::new(),
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
