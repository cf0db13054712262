//! TLS without a proxy: the hub's HTTPS certificate (reloadable), the child's trust
//! in its hub (a private CA, an optional key pin), and certificate errors named in
//! words a technician can act on.
//!
//! - Server ([`ServerTls`]): `hub.tls_cert_file` (PEM chain, end-entity first) and
//!   `hub.tls_key_file` (PEM private key: PKCS#8, PKCS#1 or SEC1). The key must belong
//!   to the certificate. [`ServerTls::reload`] swaps both for *new* connections;
//!   connections already open keep the certificate they were made with. A reload that
//!   fails (unreadable file, key of another certificate) keeps the old pair.
//! - Client ([`client_config`]): with `parent.ca_file` the hub must chain to one of
//!   the certificates in that file, and **only** to those: the public web roots are
//!   not trusted beside it, so a public CA's mistake cannot impersonate a private
//!   hub. Without `ca_file` the public web roots (webpki-roots) are used, as before.
//!   `parent.pin_sha256` (SHA-256 of the hub certificate's SubjectPublicKeyInfo, hex
//!   or base64; one or a list, any of which matches) is checked *in addition to* the
//!   chain, after it: a pinned hub must still present a valid certificate for its
//!   name. A list lets clinics accept the hub's next key before it is switched to.
//! - Errors: [`TlsError`] for files and keys (permanent: a person must fix a file);
//!   [`TlsProblem`] classifies a failed handshake (unknown CA, name mismatch, expired,
//!   pin mismatch, a plain-HTTP hub behind an `https://` URL) with a hint.
//!
//! Crypto is rustls with the *ring* provider, the one ureq already links.
//!
//! Computing a pin with openssl:
//! `openssl x509 -in hub.crt -noout -pubkey | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64`

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use sha2::{Digest, Sha256};

use crate::error::{Classify, ErrorClass};

/// A certificate or key file that cannot be used. Permanent: a person must fix it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        source: rustls::Error,
    },
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS setup failed: {0}")]
    Setup(rustls::Error),
}

impl Classify for TlsError {
    fn class(&self) -> ErrorClass {
        match self {
            TlsError::Read { .. }
            | TlsError::NoCertificate { .. }
            | TlsError::NoKey { .. }
            | TlsError::Invalid { .. }
            | TlsError::KeyMismatch { .. }
            | TlsError::Setup(_) => ErrorClass::Permanent,
        }
    }
}

/// The crypto provider of every TLS config here (ring, as ureq's rustls).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file, in order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey {
        path: path.to_path_buf(),
    })
}

/// A certificate chain and its key, checked to belong together.
pub fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(cert)?;
    let der = load_key(key)?;
    match CertifiedKey::from_der(chain, der, &provider()) {
        Ok(k) => Ok(k),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }),
        Err(source) => Err(TlsError::Invalid {
            path: key.to_path_buf(),
            what: "unusable private key",
            source,
        }),
    }
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo: what `parent.pin_sha256` holds.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], rustls::Error> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert)?;
    Ok(Sha256::digest(parsed.subject_public_key_info().as_ref()).into())
}

/// A pin as the documentation prints it (base64, as `openssl … | base64` does).
pub fn pin_text(pin: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(pin)
}

/// Parses `parent.pin_sha256`: 64 hex digits (colons and spaces allowed, as
/// `openssl dgst` and browsers print them) or 44 characters of base64, optionally
/// prefixed `sha256//` (curl's `--pinnedpubkey` form).
pub fn parse_pin(text: &str) -> Option<[u8; 32]> {
    let t = text.trim();
    let t = t.strip_prefix("sha256//").unwrap_or(t);
    let hexish: String = t.chars().filter(|c| *c != ':' && *c != ' ').collect();
    let mut out = [0u8; 32];
    if hexish.len() == 64 && hex::decode_to_slice(&hexish, &mut out).is_ok() {
        return Some(out);
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(t).ok()?;
    (bytes.len() == 32).then(|| {
        out.copy_from_slice(&bytes);
        out
    })
}

/// The hub's certificate and key, swappable while the listener runs.
pub struct ServerTls {
    files: Mutex<(PathBuf, PathBuf)>,
    current: Arc<RwLock<Arc<CertifiedKey>>>,
    config: Arc<ServerConfig>,
}

/// Hands every new handshake the certificate current at that moment.
#[derive(Debug)]
struct Current(Arc<RwLock<Arc<CertifiedKey>>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("ServerTls")
            .field("cert", &files.0)
            .field("key", &files.1)
            .finish()
    }
}

impl ServerTls {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerTls>, TlsError> {
        let current = Arc::new(RwLock::new(Arc::new(certified_key(cert, key)?)));
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Current(current.clone())));
        Ok(Arc::new(ServerTls {
            files: Mutex::new((cert.to_path_buf(), key.to_path_buf())),
            current,
            config: Arc::new(config),
        }))
    }

    /// Reads the same two files again (a renewed certificate).
    pub fn reload(&self) -> Result<(), TlsError> {
        let (cert, key) = self.files();
        self.reload_from(&cert, &key)
    }

    /// Loads a new pair; on success new connections get it, on failure nothing changes.
    pub fn reload_from(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        let fresh = Arc::new(certified_key(cert, key)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        *self.files.lock().unwrap_or_else(|p| p.into_inner()) =
            (cert.to_path_buf(), key.to_path_buf());
        Ok(())
    }

    pub fn files(&self) -> (PathBuf, PathBuf) {
        self.files.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }

    /// The pin of the certificate now served (base64), for logs and `doctor`.
    pub fn pin(&self) -> Option<String> {
        let key = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let cert = key.end_entity_cert().ok()?;
        spki_sha256(cert).ok().map(|p| pin_text(&p))
    }
}

/// The hub's key did not match `parent.pin_sha256`.
#[derive(Debug, thiserror::Error)]
#[error("the hub's key does not match parent.pin_sha256 (the hub presents {presented})")]
pub struct PinMismatch {
    /// The presented key's pin, base64.
    pub presented: String,
}

impl Classify for PinMismatch {
    fn class(&self) -> ErrorClass {
        ErrorClass::Permanent
    }
}

/// Chain and name checks by webpki against our roots, then the pin.
#[derive(Debug)]
struct HubVerifier {
    inner: Arc<WebPkiServerVerifier>,
    /// Empty: no pinning.
    pins: Vec<[u8; 32]>,
}

impl ServerCertVerifier for HubVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if !self.pins.is_empty() {
            let presented = spki_sha256(end_entity)?;
            // Not secret: a pin is a public key's hash; a plain comparison is fine.
            if !self.pins.contains(&presented) {
                return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(PinMismatch {
                        presented: pin_text(&presented),
                    })),
                )));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The child's TLS client config: roots from `ca_file` only (or the public web roots
/// without it), and the pins when any are given (the hub's key must match one).
pub fn client_config(
    ca_file: Option<&Path>,
    pins: &[[u8; 32]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in load_certs(path)? {
                roots.add(cert).map_err(|source| TlsError::Invalid {
                    path: path.to_path_buf(),
                    what: "not a usable CA certificate",
                    source,
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Setup(rustls::Error::General(e.to_string())))?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .dangerous()
        // Not a weakened check: HubVerifier runs webpki's full verification first.
        .with_custom_certificate_verifier(Arc::new(HubVerifier {
            inner,
            pins: pins.to_vec(),
        }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Why a TLS handshake with the hub failed, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsProblem {
    /// The chain does not lead to a trusted root (a private CA not in `ca_file`).
    UnknownIssuer,
    /// The certificate does not name the host in `parent.url`.
    NameMismatch,
    Expired,
    NotYetValid,
    /// The key is not the pinned one; `presented` is its pin (base64).
    PinMismatch {
        presented: String,
    },
    /// The far end does not speak TLS (a plain-HTTP hub behind an `https://` URL).
    NotTls,
    /// The hub presents a CA certificate as its own (what `openssl req -x509` makes).
    CaAsServer,
    /// Anything else rustls reported.
    Other(String),
}

impl std::fmt::Display for TlsProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsProblem::UnknownIssuer => {
                f.write_str("the hub's certificate is not signed by a CA this node trusts")
            }
            TlsProblem::NameMismatch => {
                f.write_str("the hub's certificate is not valid for the host name in parent.url")
            }
            TlsProblem::Expired => f.write_str("the hub's certificate has expired"),
            TlsProblem::NotYetValid => f.write_str("the hub's certificate is not valid yet"),
            TlsProblem::PinMismatch { presented } => write!(
                f,
                "the hub's key does not match parent.pin_sha256 (the hub presents {presented})"
            ),
            TlsProblem::NotTls => {
                f.write_str("the hub did not answer in TLS: it serves plain HTTP at that address")
            }
            TlsProblem::CaAsServer => f.write_str(
                "the hub's certificate is a CA certificate (basicConstraints CA:TRUE, as `openssl req -x509` makes), which cannot be a server's own certificate",
            ),
            TlsProblem::Other(m) => write!(f, "TLS handshake failed: {m}"),
        }
    }
}

/// A failed handshake needs a person (a certificate, a pin, a URL, a clock): trying
/// again meets the same certificate.
impl Classify for TlsProblem {
    fn class(&self) -> ErrorClass {
        match self {
            TlsProblem::UnknownIssuer
            | TlsProblem::NameMismatch
            | TlsProblem::Expired
            | TlsProblem::NotYetValid
            | TlsProblem::PinMismatch { .. }
            | TlsProblem::NotTls
            | TlsProblem::CaAsServer
            | TlsProblem::Other(_) => ErrorClass::Permanent,
        }
    }
}

impl TlsProblem {
    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            TlsProblem::UnknownIssuer => {
                "set parent.ca_file to the PEM certificate of the CA that signed the hub's certificate"
            }
            TlsProblem::NameMismatch => {
                "parent.url must use a host name the certificate lists (subjectAltName); reissue the certificate or fix the URL"
            }
            TlsProblem::Expired => {
                "renew the hub's certificate and reload the hub (systemctl reload clinicsync); check this node's clock too"
            }
            TlsProblem::NotYetValid => "check this node's clock (and the hub's)",
            TlsProblem::PinMismatch { .. } => {
                "if the hub's key was replaced on purpose, put its new pin in parent.pin_sha256; otherwise the link may be intercepted"
            }
            TlsProblem::NotTls => {
                "use an http:// parent.url, or give the hub hub.tls_cert_file and hub.tls_key_file"
            }
            TlsProblem::CaAsServer => {
                "give the hub a server certificate signed by that CA (README: certificates) and the CA's certificate to parent.ca_file"
            }
            TlsProblem::Other(_) => "check the hub's TLS setup and parent.url",
        }
    }

    /// Classifies a rustls error.
    pub fn from_rustls(e: &rustls::Error) -> TlsProblem {
        use rustls::Error as E;
        match e {
            E::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => TlsProblem::UnknownIssuer,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => TlsProblem::NameMismatch,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    TlsProblem::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    TlsProblem::NotYetValid
                }
                CertificateError::Other(OtherError(inner)) => {
                    match inner.downcast_ref::<PinMismatch>() {
                        Some(p) => TlsProblem::PinMismatch {
                            presented: p.presented.clone(),
                        },
                        // webpki's error, reported through rustls as an opaque one.
                        None if format!("{inner:?}").contains("CaUsedAsEndEntity") => {
                            TlsProblem::CaAsServer
                        }
                        None => TlsProblem::Other(e.to_string()),
                    }
                }
                _ => TlsProblem::Other(e.to_string()),
            },
            E::InvalidMessage(_) => TlsProblem::NotTls,
            _ => TlsProblem::Other(e.to_string()),
        }
    }

    /// Finds the rustls error in an error's chain (ureq wraps it in `io::Error`s).
    pub fn find(err: &(dyn std::error::Error + 'static)) -> Option<TlsProblem> {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(r) = e.downcast_ref::<rustls::Error>() {
                return Some(TlsProblem::from_rustls(r));
            }
            // io::Error's source() skips the error it wraps: look inside it too.
            if let Some(inner) = e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                if let Some(p) = TlsProblem::find(inner) {
                    return Some(p);
                }
            }
            cur = e.source();
        }
        None
    }
}

/// Why [`peer_certificate`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Tls(TlsProblem),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0:?} is not a host name or address a certificate can name")]
    Name(String),
}

impl Classify for ProbeError {
    fn class(&self) -> ErrorClass {
        match self {
            ProbeError::Tls(p) => p.class(),
            ProbeError::Io(e) => e.class(),
            ProbeError::Name(_) => ErrorClass::Permanent,
        }
    }
}

/// Connects to `host:port`, completes a TLS handshake with `config` and returns the
/// certificate the server presented (for `doctor`: its expiry and pin).
pub fn peer_certificate(
    host: &str,
    port: u16,
    config: Arc<ClientConfig>,
    timeout: std::time::Duration,
) -> Result<CertificateDer<'static>, ProbeError> {
    use std::net::ToSocketAddrs;
    let name =
        ServerName::try_from(host.to_string()).map_err(|_| ProbeError::Name(host.to_string()))?;
    let addr = (host, port).to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} does not resolve"),
        )
    })?;
    let mut sock = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let mut conn = rustls::ClientConnection::new(config, name)
        .map_err(|e| ProbeError::Tls(TlsProblem::from_rustls(&e)))?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            return Err(match TlsProblem::find(&e) {
                Some(p) => ProbeError::Tls(p),
                None => ProbeError::Io(e),
            });
        }
    }
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
        .ok_or_else(|| ProbeError::Tls(TlsProblem::Other("no certificate presented".into())))
}

/// `(host, port)` of an `https://host[:port]/…` URL.
pub fn https_host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => 443,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), 443)),
    }
}

/// Whether `ip` is a loopback address, IPv4-mapped IPv6 (`::ffff:127.0.0.1`) included.
pub fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Whether a connection to `ip` stays on this machine: loopback, and the unspecified
/// address (`0.0.0.0`, `::`), which Linux connects to locally.
pub fn stays_on_this_machine(ip: std::net::IpAddr) -> bool {
    let unspecified = match ip {
        std::net::IpAddr::V4(v4) => v4.is_unspecified(),
        std::net::IpAddr::V6(v6) => {
            v6.is_unspecified() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_unspecified())
        }
    };
    unspecified || is_loopback(ip)
}

/// The host of an `http://` URL whose traffic leaves this machine: anything but
/// `localhost` and the addresses of [`stays_on_this_machine`]. `None` for other
/// schemes, for those, and for text that is not a URL (nothing is sent to it). The
/// URL is read by the parser the HTTP client uses (WHATWG rules: `\` is `/`, `127.1`
/// and `0x7f000001` are 127.0.0.1, `%6cocalhost` is localhost), so the host named is
/// the one the client connects to. (For `doctor`: plain HTTP across a real link lets
/// anyone on the path read the records and forge the hub's answers.)
pub fn plain_http_remote_host(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    if parsed.scheme() != "http" {
        return None;
    }
    let local = match parsed.host()? {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => stays_on_this_machine(ip.into()),
        url::Host::Ipv6(ip) => stays_on_this_machine(ip.into()),
    };
    (!local).then(|| parsed.host_str().unwrap_or_default().to_string())
}

/// A certificate's notAfter, in seconds since the epoch (for `doctor`'s expiry
/// warning). `None` when the DER does not have the X.509 shape.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    //   serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter } … } … }
    let (_, cert, _) = der_item(cert.as_ref(), 0x30)?;
    let (_, tbs, _) = der_item(cert, 0x30)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = der_item(rest, 0xa0)?.2;
    }
    for tag in [0x02, 0x30, 0x30] {
        rest = der_item(rest, tag)?.2;
    }
    let (_, validity, _) = der_item(rest, 0x30)?;
    let (_, _, after) = der_any(validity)?;
    let (tag, time, _) = der_any(after)?;
    der_time(tag, time)
}

/// One DER element: (tag, content, rest).
fn der_any(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

fn der_item(input: &[u8], tag: u8) -> Option<(u8, &[u8], &[u8])> {
    der_any(input).filter(|(t, _, _)| *t == tag)
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) to epoch seconds.
fn der_time(tag: u8, text: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let yy: i64 = s[..2].parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &s[2..])
        }
        0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let n = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, h, m, sec) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    // Days from civil (Howard Hinnant).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_errors_need_a_person_and_a_probe_of_a_closed_port_is_retryable() {
        let cases: Vec<Box<dyn Fn() -> ErrorClass>> = vec![
            Box::new(|| TlsError::NoCertificate { path: "c".into() }.class()),
            Box::new(|| TlsError::NoKey { path: "k".into() }.class()),
            Box::new(|| {
                TlsError::KeyMismatch {
                    cert: "c".into(),
                    key: "k".into(),
                }
                .class()
            }),
            Box::new(|| TlsError::Setup(rustls::Error::General("x".into())).class()),
            Box::new(|| TlsProblem::UnknownIssuer.class()),
            Box::new(|| TlsProblem::Other("x".into()).class()),
            Box::new(|| {
                PinMismatch {
                    presented: "p".into(),
                }
                .class()
            }),
            Box::new(|| ProbeError::Name("?".into()).class()),
            Box::new(|| ProbeError::Tls(TlsProblem::Expired).class()),
        ];
        for class in cases {
            assert_eq!(class(), ErrorClass::Permanent);
        }
        let refused = ProbeError::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert_eq!(refused.class(), ErrorClass::Retryable);
        let read = load_certs(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert_eq!(read.class(), ErrorClass::Permanent, "{read}");
    }

    #[test]
    fn pins_parse_as_hex_or_base64() {
        let raw = [0xabu8; 32];
        let hex = hex::encode(raw);
        let b64 = pin_text(&raw);
        assert_eq!(parse_pin(&hex), Some(raw));
        assert_eq!(parse_pin(&hex.to_uppercase()), Some(raw));
        let colons: Vec<String> = raw.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_pin(&colons.join(":")), Some(raw));
        assert_eq!(parse_pin(&b64), Some(raw));
        assert_eq!(parse_pin(&format!("sha256//{b64}")), Some(raw));
        assert_eq!(parse_pin("abc"), None);
        assert_eq!(parse_pin(&hex[..62]), None);
    }

    #[test]
    fn https_urls_split_into_host_and_port() {
        let hp = |u| https_host_port(u);
        assert_eq!(
            hp("https://hub.example.org:7070/x"),
            Some(("hub.example.org".into(), 7070))
        );
        assert_eq!(
            hp("https://hub.example.org"),
            Some(("hub.example.org".into(), 443))
        );
        assert_eq!(hp("https://[::1]:8443"), Some(("::1".into(), 8443)));
        assert_eq!(hp("http://hub:80"), None);
    }

    #[test]
    fn plain_http_is_named_unless_it_stays_on_this_machine() {
        let h = plain_http_remote_host;
        for (url, host) in [
            ("http://hub.example.org:7070/x", "hub.example.org"),
            ("http://10.8.0.1", "10.8.0.1"),
            ("http://[2001:db8::1]:80/", "[2001:db8::1]"),
            ("http://user@hub.example.org", "hub.example.org"),
            ("http://127.0.0.1.nip.io", "127.0.0.1.nip.io"),
            ("http://localhost.evil.org", "localhost.evil.org"),
            ("http://127.0.0.1@hub.example.org", "hub.example.org"),
            // The client reads `\` as `/`: the host is the one before it.
            ("http://hub.example.org\\@127.0.0.1", "hub.example.org"),
            ("HTTP://hub.example.org", "hub.example.org"),
        ] {
            assert_eq!(h(url).as_deref(), Some(host), "{url}");
        }
        for local in [
            "http://127.0.0.1:7070",
            "http://127.8.9.10",
            "http://localhost:7070/",
            "http://LOCALHOST",
            "http://[::1]:7070",
            "http://127.1",
            "http://2130706433",
            "http://0x7f000001",
            "http://%6cocalhost",
            "http://localhost\\@hub.example.org",
            "http://[::ffff:127.0.0.1]",
            "http://0.0.0.0",
            "https://hub.example.org",
            "not a url",
        ] {
            assert_eq!(h(local), None, "{local}");
        }
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("0.0.0.0".parse().unwrap()));
    }

    #[test]
    fn der_times_read_both_forms() {
        assert_eq!(der_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(der_time(0x18, b"20260101000000Z"), Some(1_767_225_600));
        assert_eq!(der_time(0x17, b"garbage"), None);
    }
}
