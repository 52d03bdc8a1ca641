//! TLS for BACnet/SC (ASHRAE 135 Annex AB): TLS 1.3 only, mutual authentication, and
//! trust in exactly one configured CA, never the system store.
//!
//! Loads the PEM files `hilbench pki` writes (see [`TlsDir`]) and builds rustls configs
//! for the hub (server) and a node (client). Uses the `ring` provider explicitly, so no
//! process-wide default provider has to be installed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::UnixTime;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};

/// Why a TLS file or config could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: no PEM {what} found (expected a \"-----BEGIN {marker}\" block)", path.display())]
    NoPem { path: PathBuf, what: &'static str, marker: &'static str },
    #[error("{}: bad PEM: {reason}", path.display())]
    BadPem { path: PathBuf, reason: String },
    #[error("{}: CA certificate rejected: {reason}", path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("{} / {}: certificate and key rejected: {reason}", cert.display(), key.display())]
    BadCertKey { cert: PathBuf, key: PathBuf, reason: String },
    #[error("TLS directory {}: missing {}", dir.display(), missing.join(", "))]
    Incomplete { dir: PathBuf, missing: Vec<String> },
}

/// Where one party's PEM files live in a `hilbench pki` directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsDir {
    /// The CA every peer is checked against (`ca.pem`).
    pub ca: PathBuf,
    /// This party's certificate chain.
    pub cert: PathBuf,
    /// This party's private key (PKCS#8, SEC1 or PKCS#1 PEM).
    pub key: PathBuf,
}

impl TlsDir {
    /// `ca.pem`, `hub.pem`, `hub.key` under `dir`.
    pub fn hub(dir: impl AsRef<Path>) -> Self {
        Self::named(dir.as_ref(), "hub")
    }

    /// `ca.pem`, `<name>.pem`, `<name>.key` under `dir` (e.g. `node-1`).
    pub fn node(dir: impl AsRef<Path>, name: &str) -> Self {
        Self::named(dir.as_ref(), name)
    }

    fn named(dir: &Path, name: &str) -> Self {
        TlsDir {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }

    /// Fails naming every file that is not there (checked before any parsing, so a
    /// half-made directory gets one clear message).
    pub fn check(&self) -> Result<(), TlsError> {
        let missing: Vec<String> = [&self.ca, &self.cert, &self.key]
            .into_iter()
            .filter(|p| !p.is_file())
            .map(|p| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let dir = self.ca.parent().map(Path::to_path_buf).unwrap_or_default();
        Err(TlsError::Incomplete { dir, missing })
    }

    /// The hub's server config from these files (client certificates need clientAuth).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config_with(ClientCertPolicy::default())
    }

    /// The hub's server config from these files, asking `policy` of client certificates.
    pub fn server_config_with(&self, policy: ClientCertPolicy) -> Result<Arc<ServerConfig>, TlsError> {
        self.check()?;
        hub_server_config(&self.ca, &self.cert, &self.key, policy)
    }

    /// The Device UUID in this certificate's `urn:uuid:` SAN: the one a node
    /// presenting it must send in its Connect-Request to a hub that binds
    /// identities to certificates.
    pub fn device_uuid(&self) -> Option<[u8; 16]> {
        device_uuid_in_file(&self.cert)
    }

    /// A node's client config from these files (presenting its certificate).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.check()?;
        node_client_config(&self.ca, Some((&self.cert, &self.key)))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::BadPem { path: path.to_path_buf(), reason: e.to_string() }
}

/// Every `CERTIFICATE` block in `path`, in order; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoPem { path: path.to_path_buf(), what: "certificate", marker: "CERTIFICATE" });
    }
    Ok(certs)
}

/// The first private key in `path` (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            TlsError::NoPem { path: path.to_path_buf(), what: "private key", marker: "PRIVATE KEY" }
        }
        e => pem_error(path, e),
    })
}

/// A root store holding exactly the certificates in `ca` (no system roots).
pub fn load_roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| TlsError::BadCa { path: ca.to_path_buf(), reason: e.to_string() })?;
    }
    Ok(Arc::new(roots))
}

/// What the hub asks of a client certificate beyond a chain to the CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCertPolicy {
    /// Refuse a certificate whose extended key usage does not name
    /// clientAuth. webpki alone accepts a certificate with no EKU extension
    /// for any purpose, so a CA-signed server or code-signing certificate
    /// would pass as a node's; some vendors' node certificates lack the
    /// EKU, hence the switch.
    pub require_client_auth_eku: bool,
}

impl Default for ClientCertPolicy {
    fn default() -> Self {
        ClientCertPolicy { require_client_auth_eku: true }
    }
}

/// Whether `cert` (DER) names clientAuth in its extended key usage.
pub fn has_client_auth_eku(cert: &[u8]) -> Result<bool, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    let eku = parsed.extended_key_usage().map_err(|e| e.to_string())?;
    Ok(eku.is_some_and(|e| e.value.client_auth))
}

/// The Device UUID in `cert`'s `urn:uuid:` SAN (what `hilbench pki` writes
/// for a node), if it has one. A certificate that cannot be parsed has none.
pub fn device_uuid_in_cert(cert: &[u8]) -> Option<[u8; 16]> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => {
            let rest = uri.get(..9).filter(|p| p.eq_ignore_ascii_case("urn:uuid:")).map(|_| &uri[9..])?;
            uuid::Uuid::parse_str(rest).ok().map(|u| *u.as_bytes())
        }
        _ => None,
    })
}

/// The Device UUID of the first certificate in the PEM file `path`.
pub fn device_uuid_in_file(path: &Path) -> Option<[u8; 16]> {
    load_certs(path).ok()?.first().and_then(|c| device_uuid_in_cert(c))
}

/// webpki's chain check, then the EKU check of [`ClientCertPolicy`].
#[derive(Debug)]
struct ClientAuthEkuVerifier(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for ClientAuthEkuVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        match has_client_auth_eku(end_entity) {
            Ok(true) => Ok(verified),
            // webpki already refused an EKU without clientAuth; what is left is no EKU at all.
            Ok(false) => Err(rustls::Error::InvalidCertificate(CertificateError::InvalidPurposeContext {
                required: rustls::ExtendedKeyPurpose::ClientAuth,
                presented: Vec::new(),
            })),
            Err(e) => Err(rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unreadable client certificate: {e}")),
            ))))),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The hub's TLS config: TLS 1.3 only, a client certificate chaining to `ca` is required
/// (with clientAuth in its EKU unless `policy` relaxes it), no ALPN (BACnet/SC
/// negotiates its subprotocol in the WebSocket handshake).
pub fn hub_server_config(ca: &Path, cert: &Path, key: &Path, policy: ClientCertPolicy) -> Result<Arc<ServerConfig>, TlsError> {
    let webpki = WebPkiClientVerifier::builder_with_provider(load_roots(ca)?, provider())
        .build()
        .map_err(|e| TlsError::BadCa { path: ca.to_path_buf(), reason: e.to_string() })?;
    let verifier: Arc<dyn ClientCertVerifier> =
        if policy.require_client_auth_eku { Arc::new(ClientAuthEkuVerifier(webpki)) } else { webpki };
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let bad = |e: rustls::Error| TlsError::BadCertKey {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason: e.to_string(),
    };
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(bad)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)
        .map_err(bad)?;
    Ok(Arc::new(cfg))
}

/// A node's TLS config: TLS 1.3 only, only `ca` trusted for the hub (whose name is
/// checked against its SANs), presenting `client` = (cert, key) if given.
pub fn node_client_config(ca: &Path, client: Option<(&Path, &Path)>) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::BadCa { path: ca.to_path_buf(), reason: e.to_string() })?
        .with_root_certificates(load_roots(ca)?);
    let cfg = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| TlsError::BadCertKey { cert: cert.to_path_buf(), key: key.to_path_buf(), reason: e.to_string() })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::pki::generate;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> (Result<(), String>, Result<Vec<u8>, String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(server).accept(tcp).await.map_err(|e| e.to_string())?;
            assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
            assert_eq!(tls.get_ref().1.alpn_protocol(), None);
            tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.ok();
            Ok(())
        });
        let cli = async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = TlsConnector::from(client).connect(name, tcp).await.map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
            Ok(buf)
        };
        let t = std::time::Duration::from_secs(20);
        let c = tokio::time::timeout(t, cli).await.expect("client timed out");
        let s = tokio::time::timeout(t, srv).await.expect("server timed out").unwrap();
        (s, c)
    }

    #[tokio::test]
    async fn dir_layout_and_mutual_tls13() {
        let t = tempfile::tempdir().unwrap();
        let f = generate(t.path(), 1, &[], 30, false).unwrap();
        let hub = TlsDir::hub(t.path());
        assert_eq!((hub.ca.clone(), hub.cert.clone(), hub.key.clone()), (f.ca_cert.clone(), f.hub_cert.clone(), f.hub_key.clone()));
        let node = TlsDir::node(t.path(), "node-1");
        assert_eq!((node.cert.clone(), node.key.clone()), (f.nodes[0].cert.clone(), f.nodes[0].key.clone()));

        let (s, c) = handshake(hub.server_config().unwrap(), node.client_config().unwrap()).await;
        s.unwrap();
        assert_eq!(c.unwrap(), b"ok");

        // No client certificate: the hub refuses.
        let anon = node_client_config(&f.ca_cert, None).unwrap();
        let (s, _) = handshake(hub.server_config().unwrap(), anon).await;
        assert!(s.unwrap_err().contains("peer sent no certificates"), "hub requires a client cert");
    }

    #[tokio::test]
    async fn client_certificates_need_client_auth_unless_relaxed() {
        use rcgen::ExtendedKeyUsagePurpose as Eku;
        let t = tempfile::tempdir().unwrap();
        let f = generate(t.path(), 1, &[], 30, false).unwrap();
        let hub = TlsDir::hub(t.path());
        let relaxed = ClientCertPolicy { require_client_auth_eku: false };
        for (name, eku, refused) in [
            ("no-eku", vec![], true),
            ("server-only", vec![Eku::ServerAuth], true),
            ("code-signing", vec![Eku::CodeSigning], true),
            ("client", vec![Eku::ClientAuth], false),
            ("client-and-server", vec![Eku::ServerAuth, Eku::ClientAuth], false),
        ] {
            let (c, k) = crate::cli::pki::sign_leaf(t.path(), name, &eku, Vec::new()).unwrap();
            let client = || node_client_config(&f.ca_cert, Some((&c, &k))).unwrap();
            let (s, _) = handshake(hub.server_config().unwrap(), client()).await;
            if refused {
                let e = s.unwrap_err();
                assert!(e.contains("does not allow extended key usage for client authentication"), "{name}: {e}");
            } else {
                s.unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            // Relaxed, only the chain counts; except a server-only or code-signing
            // EKU, which webpki refuses for a client on its own.
            let (s, _) = handshake(hub.server_config_with(relaxed).unwrap(), client()).await;
            assert_eq!(s.is_ok(), name != "server-only" && name != "code-signing", "{name} relaxed: {s:?}");
        }
        // A certificate with no urn:uuid SAN names no device.
        let (c, _) = crate::cli::pki::sign_leaf(t.path(), "plain", &[Eku::ClientAuth], Vec::new()).unwrap();
        assert_eq!(device_uuid_in_cert(&load_certs(&c).unwrap()[0]), None);
        assert_eq!(device_uuid_in_cert(b"not a certificate"), None);
        // The nodes `hilbench pki` writes carry their UUID.
        let node = &load_certs(&f.nodes[0].cert).unwrap()[0];
        assert_eq!(device_uuid_in_cert(node).map(|u| uuid::Uuid::from_bytes(u).to_string()), Some(f.nodes[0].uuid.to_string()));
        // The nodes `hilbench pki` writes carry clientAuth.
        assert!(has_client_auth_eku(&load_certs(&f.nodes[0].cert).unwrap()[0]).unwrap());
    }

    #[test]
    fn missing_and_bad_files_are_named() {
        let t = tempfile::tempdir().unwrap();
        let e = TlsDir::hub(t.path()).server_config().unwrap_err().to_string();
        assert!(e.contains("missing ca.pem, hub.pem, hub.key"), "{e}");
        generate(t.path(), 1, &[], 30, false).unwrap();
        let n2 = TlsDir::node(t.path(), "node-2").check().unwrap_err().to_string();
        assert!(n2.contains("missing node-2.pem, node-2.key") && !n2.contains("ca.pem"), "{n2}");

        // A key file where a certificate belongs, garbage, a truncated block.
        let hub = TlsDir::hub(t.path());
        let e = load_certs(&hub.key).unwrap_err().to_string();
        assert!(e.contains("hub.key") && e.contains("no PEM certificate"), "{e}");
        let e = load_key(&hub.cert).unwrap_err().to_string();
        assert!(e.contains("hub.pem") && e.contains("no PEM private key"), "{e}");
        let junk = t.path().join("junk.pem");
        let pem = std::fs::read_to_string(&hub.cert).unwrap();
        std::fs::write(&junk, &pem[..pem.len() / 2]).unwrap();
        let e = load_certs(&junk).unwrap_err().to_string();
        assert!(e.contains("junk.pem") && e.contains("bad PEM"), "{e}");
        let e = load_certs(&t.path().join("nope.pem")).unwrap_err().to_string();
        assert!(e.contains("cannot read") && e.contains("nope.pem"), "{e}");
        // A certificate with someone else's key.
        let e = hub_server_config(&hub.ca, &hub.cert, &t.path().join("node-1.key"), ClientCertPolicy::default()).unwrap_err().to_string();
        assert!(e.contains("hub.pem") && e.contains("node-1.key") && e.contains("rejected"), "{e}");
    }
}
