//! `hilbench pki`: a throw-away test PKI for the BACnet/SC hub and nodes.
//!
//! Writes a CA, a hub (server) certificate and N node (client) certificates,
//! all ECDSA P-256, keys as PKCS#8 PEM with mode 0600, so TLS tests need no
//! `openssl`. The hub certificate always carries SAN `IP:127.0.0.1` and
//! `DNS:localhost` (clients check the hub's name); each node certificate
//! carries `URI:urn:uuid:<random v4>` so it can be bound to the node's
//! Device UUID. These are test credentials: never deploy them.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::lower_hex as hex;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};

/// Most node certificates one call makes.
pub const MAX_NODES: usize = 10_000;
/// Longest validity accepted, in days.
pub const MAX_DAYS: u32 = 36_500;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  hilbench pki                                   CA, hub and 2 nodes under ./pki
  hilbench pki --out target/pki --nodes 5 --days 30
  hilbench pki --hub-san 192.168.1.10 --hub-san hub.lab.example --force

Writes ca.pem/ca.key, hub.pem/hub.key (serverAuth; SAN IP:127.0.0.1,
DNS:localhost and every --hub-san) and node-N.pem/node-N.key (clientAuth;
CN node-N, SAN URI:urn:uuid:<random v4>). ECDSA P-256, keys PKCS#8 PEM, mode 0600.
A hub trusts only ca.pem for client certificates; nodes trust only ca.pem for the hub.
Test credentials only: never deploy them.")]
pub struct PkiArgs {
    /// Output directory (created if missing).
    #[arg(long, default_value = "pki")]
    pub out: PathBuf,
    /// Node certificates to make.
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Extra SANs for the hub, IP or DNS name (an `IP:` / `DNS:` prefix is accepted); repeatable.
    #[arg(long = "hub-san", value_name = "SAN")]
    pub hub_sans: Vec<String>,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

/// One node's certificate, key and the UUID in its `urn:uuid:` SAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    /// `node-N`, also the certificate's CN.
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Lower-case hyphenated v4 UUID, as in the certificate's URI SAN.
    pub uuid: String,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiFiles {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub hub_cert: PathBuf,
    pub hub_key: PathBuf,
    /// SANs in the hub certificate, `IP:…` / `DNS:…`.
    pub hub_sans: Vec<String>,
    pub nodes: Vec<NodeFiles>,
}

impl PkiFiles {
    /// Every file written, certificates and keys.
    pub fn all_paths(&self) -> Vec<&Path> {
        let mut v: Vec<&Path> = vec![&self.ca_cert, &self.ca_key, &self.hub_cert, &self.hub_key];
        for n in &self.nodes {
            v.push(&n.cert);
            v.push(&n.key);
        }
        v
    }
}

pub fn run(a: PkiArgs) -> i32 {
    match generate(&a.out, a.nodes, &a.hub_sans, a.days, a.force) {
        Ok(f) => {
            println!("wrote test PKI to {} (valid {} days, ECDSA P-256):", f.dir.display(), a.days);
            let w = f.nodes.last().map_or(3, |n| n.name.len().max(3));
            println!("  {:<w$}  {}  {}", "CA", f.ca_cert.display(), f.ca_key.display());
            println!("  {:<w$}  {}  {}  SAN {}", "hub", f.hub_cert.display(), f.hub_key.display(), f.hub_sans.join(", "));
            for n in &f.nodes {
                println!("  {:<w$}  {}  {}  urn:uuid:{}", n.name, n.cert.display(), n.key.display(), n.uuid);
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// One more leaf certificate from the CA `generate` wrote in `dir`, as
/// `name.pem` / `name.key`, with exactly the extended key usages in `eku`
/// (empty: no EKU extension) and `sans`: the certificates a vendor's
/// devices come with, for tests of what the hub accepts.
pub fn sign_leaf(dir: &Path, name: &str, eku: &[ExtendedKeyUsagePurpose], sans: Vec<SanType>) -> Result<(PathBuf, PathBuf), String> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(|e| format!("cannot read {}: {e}", dir.join(f).display()));
    let err = |what: &str, e: rcgen::Error| format!("cannot make {what}: {e}");
    let ca_key = KeyPair::from_pem(&read("ca.key")?).map_err(|e| err("CA key", e))?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, ca_key).map_err(|e| err("CA", e))?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(name, e))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(name);
    p.subject_alt_names = sans;
    p.extended_key_usages = eku.to_vec();
    p.serial_number = Some(serial());
    let cert = p.signed_by(&key, &issuer).map_err(|e| err(name, e))?;
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&c, cert.pem()).map_err(|e| format!("cannot write {}: {e}", c.display()))?;
    std::fs::write(&k, key.serialize_pem()).map_err(|e| format!("cannot write {}: {e}", k.display()))?;
    Ok((c, k))
}

/// Make a CA, a hub certificate and `nodes` node certificates under `dir`
/// (created if missing). Without `force`, fails before writing anything if any
/// target file exists. Arguments (SANs, days, node count) are all checked
/// before the file system is touched.
pub fn generate(
    dir: &Path,
    nodes: usize,
    hub_sans: &[String],
    days: u32,
    force: bool,
) -> Result<PkiFiles, String> {
    if days == 0 || days > MAX_DAYS {
        return Err(format!("--days must be 1..={MAX_DAYS}, got {days}"));
    }
    if nodes > MAX_NODES {
        return Err(format!("--nodes must be at most {MAX_NODES}, got {nodes}"));
    }
    let mut sans = vec![San::Ip(IpAddr::from([127, 0, 0, 1])), San::Dns("localhost".into())];
    for s in hub_sans {
        let san = parse_san(s)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }

    // Target files, checked up front so a refusal leaves nothing half-written.
    let names: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
    let mut targets = vec!["ca.pem".to_string(), "ca.key".into(), "hub.pem".into(), "hub.key".into()];
    for n in &names {
        targets.push(format!("{n}.pem"));
        targets.push(format!("{n}.key"));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create output directory {}: {e}", dir.display()))?;
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if !force {
        let existing: Vec<&str> =
            targets.iter().filter(|t| dir.join(t).symlink_metadata().is_ok()).map(String::as_str).collect();
        if !existing.is_empty() {
            return Err(format!(
                "refusing to overwrite existing file(s) in {}: {} (use --force)",
                dir.display(),
                existing.join(", ")
            ));
        }
    }

    // Everything in memory first, then written.
    let err = |what: &str, e: rcgen::Error| format!("cannot make {what}: {e}");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    // An hour back for clock skew between the machines under test.
    let not_before = epoch + Duration::from_secs(now.saturating_sub(3600));
    let not_after = epoch + Duration::from_secs(now + u64::from(days) * 86_400);

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err("CA key", e))?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = dn(&format!("hilbench test CA {}", hex(&random_bytes::<4>())));
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.not_before = not_before;
    ca.not_after = not_after;
    ca.serial_number = Some(serial());
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| err("CA certificate", e))?;
    let issuer = Issuer::from_params(&ca, &ca_key);

    let leaf = |cn: &str, sans: Vec<SanType>, eku: ExtendedKeyUsagePurpose| -> Result<(String, String), String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(cn, e))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(cn);
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        p.not_after = not_after;
        p.serial_number = Some(serial());
        let cert = p.signed_by(&key, &issuer).map_err(|e| err(cn, e))?;
        Ok((cert.pem(), key.serialize_pem()))
    };

    let hub_san_types =
        sans.iter().map(San::to_rcgen).collect::<Result<Vec<_>, _>>().map_err(|e| err("hub SAN", e))?;
    let hub = leaf("hub", hub_san_types, ExtendedKeyUsagePurpose::ServerAuth)?;
    let mut node_pems = Vec::with_capacity(nodes);
    for name in &names {
        let uuid = uuid_v4();
        let uri = format!("urn:uuid:{uuid}");
        let san = SanType::URI(uri.as_str().try_into().map_err(|e| err(name, e))?);
        node_pems.push((uuid, leaf(name, vec![san], ExtendedKeyUsagePurpose::ClientAuth)?));
    }

    let w = |name: &str, text: &str, secret: bool| write_file(dir, name, text, secret, force);
    let files = PkiFiles {
        dir: dir.to_path_buf(),
        ca_cert: w("ca.pem", &ca_cert.pem(), false)?,
        ca_key: w("ca.key", &ca_key.serialize_pem(), true)?,
        hub_cert: w("hub.pem", &hub.0, false)?,
        hub_key: w("hub.key", &hub.1, true)?,
        hub_sans: sans.iter().map(ToString::to_string).collect(),
        nodes: names
            .iter()
            .zip(node_pems)
            .map(|(name, (uuid, (cert, key)))| {
                Ok(NodeFiles {
                    name: name.clone(),
                    cert: w(&format!("{name}.pem"), &cert, false)?,
                    key: w(&format!("{name}.key"), &key, true)?,
                    uuid,
                })
            })
            .collect::<Result<_, String>>()?,
    };
    Ok(files)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum San {
    Ip(IpAddr),
    Dns(String),
}

impl San {
    fn to_rcgen(&self) -> Result<SanType, rcgen::Error> {
        Ok(match self {
            San::Ip(ip) => SanType::IpAddress(*ip),
            San::Dns(d) => SanType::DnsName(d.as_str().try_into()?),
        })
    }
}

impl std::fmt::Display for San {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            San::Ip(ip) => write!(f, "IP:{ip}"),
            San::Dns(d) => write!(f, "DNS:{d}"),
        }
    }
}

/// `1.2.3.4`, `::1`, `IP:…`, `hub.example`, `DNS:…`, `*.example` (lower-cased).
fn parse_san(raw: &str) -> Result<San, String> {
    let bad = |why: &str| format!("bad --hub-san {raw:?}: {why}");
    let s = raw.trim();
    let (kind, v) = match s.split_once(':') {
        Some((k, v)) if k.eq_ignore_ascii_case("ip") => (Some("ip"), v),
        Some((k, v)) if k.eq_ignore_ascii_case("dns") => (Some("dns"), v),
        _ => (None, s),
    };
    if let Ok(ip) = v.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        if kind == Some("dns") {
            return Err(bad("an IP address is not a DNS name (use IP: or no prefix)"));
        }
        return Ok(San::Ip(ip));
    }
    if kind == Some("ip") {
        return Err(bad("not an IP address"));
    }
    let d = v.to_ascii_lowercase();
    if d.is_empty() || d.len() > 253 {
        return Err(bad("a DNS name is 1-253 characters"));
    }
    for (i, label) in d.split('.').enumerate() {
        if i == 0 && label == "*" && d.len() > 2 {
            continue;
        }
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each DNS label is 1-63 characters (no empty labels, no trailing dot)"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(bad("a DNS name has only letters, digits, '-' and '.'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a DNS label cannot start or end with '-'"));
        }
    }
    if d.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err(bad("looks like an IP address but does not parse as one"));
    }
    Ok(San::Dns(d))
}

/// Write atomically (temp file + rename in `dir`); keys 0600, certificates 0644.
/// Without `force` the rename refuses to replace a file that appeared meanwhile.
fn write_file(dir: &Path, name: &str, text: &str, secret: bool, force: bool) -> Result<PathBuf, String> {
    let path = dir.join(name);
    let fail = |e: &dyn std::fmt::Display| format!("cannot write {}: {e}", path.display());
    let mut tmp = tempfile::Builder::new().prefix(".hilbench-pki-").tempfile_in(dir).map_err(|e| fail(&e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = if secret { 0o600 } else { 0o644 };
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| fail(&e))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    tmp.write_all(text.as_bytes()).map_err(|e| fail(&e))?;
    tmp.as_file().sync_all().map_err(|e| fail(&e))?;
    if force {
        tmp.persist(&path).map_err(|e| fail(&e.error))?;
    } else {
        tmp.persist_noclobber(&path).map_err(|e| fail(&e.error))?;
    }
    Ok(path)
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "hilbench test PKI");
    d.push(DnType::CommonName, cn);
    d
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::Rng::fill(&mut rand::thread_rng(), &mut b[..]);
    b
}

/// 16 random bytes, first bit clear (positive) and non-zero leading byte.
fn serial() -> SerialNumber {
    let mut b = random_bytes::<16>();
    b[0] = (b[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&b)
}


/// RFC 9562 version 4 UUID, lower-case hyphenated.
fn uuid_v4() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConfig, RootCertStore, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const T: std::time::Duration = std::time::Duration::from_secs(10);

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn certs(p: &Path) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(p).unwrap().collect::<Result<_, _>>().unwrap()
    }

    fn key(p: &Path) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_file(p).unwrap()
    }

    fn roots(ca: &Path) -> Arc<RootCertStore> {
        let mut r = RootCertStore::empty();
        for c in certs(ca) {
            r.add(c).unwrap();
        }
        Arc::new(r)
    }

    /// The BACnet/SC hub: TLS 1.3 only, client certificate required, only `ca` trusted.
    fn hub_config(f: &PkiFiles) -> Arc<ServerConfig> {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&f.ca_cert), provider()).build().unwrap();
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&f.hub_cert), key(&f.hub_key))
            .unwrap();
        Arc::new(cfg)
    }

    /// A node trusting only `ca`, presenting (cert, key) if given. Offers 1.2 and 1.3
    /// so the test shows the hub picks 1.3.
    fn node_config(ca: &Path, client: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
        let b = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots(ca));
        Arc::new(match client {
            Some((c, k)) => b.with_client_auth_cert(certs(c), key(k)).unwrap(),
            None => b.with_no_client_auth(),
        })
    }

    struct Outcome {
        server: Result<(rustls::ProtocolVersion, Vec<CertificateDer<'static>>), std::io::Error>,
        client: Result<(rustls::ProtocolVersion, Vec<u8>), std::io::Error>,
    }

    /// One handshake on loopback plus a ping/pong, both sides' results.
    async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>, name: &str) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(b"pong").await?;
            tls.shutdown().await.ok();
            let (_, conn) = tls.get_ref();
            let peer = conn.peer_certificates().unwrap_or_default().to_vec();
            Ok::<_, std::io::Error>((conn.protocol_version().unwrap(), peer))
        });
        let name = ServerName::try_from(name.to_string()).unwrap();
        let cli = async move {
            let tcp = TcpStream::connect(addr).await?;
            let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
            let v = tls.get_ref().1.protocol_version().unwrap();
            tls.write_all(b"ping").await?;
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>((v, buf))
        };
        let client = tokio::time::timeout(T, cli).await.expect("client timed out");
        let server = tokio::time::timeout(T, srv).await.expect("server timed out").unwrap();
        Outcome { server, client }
    }

    fn rustls_err(e: &std::io::Error) -> Option<&rustls::Error> {
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    }

    fn make(dir: &Path) -> PkiFiles {
        generate(dir, 2, &[], 30, false).unwrap()
    }

    #[test]
    fn writes_expected_files_and_modes() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("out/pki");
        let f = generate(&dir, 3, &["IP:10.1.2.3".into(), "Hub.Test".into(), "localhost".into()], 30, false).unwrap();
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(
            names,
            ["ca.key", "ca.pem", "hub.key", "hub.pem", "node-1.key", "node-1.pem", "node-2.key", "node-2.pem", "node-3.key", "node-3.pem"]
        );
        assert_eq!(f.hub_sans, ["IP:127.0.0.1", "DNS:localhost", "IP:10.1.2.3", "DNS:hub.test"]);
        assert_eq!(f.nodes.len(), 3);
        for p in [&f.ca_key, &f.hub_key, &f.nodes[0].key] {
            let s = std::fs::read_to_string(p).unwrap();
            assert!(s.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8: {s}");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                assert_eq!(std::fs::metadata(p).unwrap().permissions().mode() & 0o777, 0o600, "{}", p.display());
            }
        }
        for p in [&f.ca_cert, &f.hub_cert, &f.nodes[2].cert] {
            assert!(std::fs::read_to_string(p).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        }
        // UUIDs: v4, distinct, and in the node certificate as urn:uuid: URIs.
        let u = &f.nodes[0].uuid;
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!("89ab".contains(&u[19..20]));
        assert_ne!(f.nodes[0].uuid, f.nodes[1].uuid);
        for n in &f.nodes {
            let der = &certs(&n.cert)[0];
            let uri = format!("urn:uuid:{}", n.uuid);
            assert!(der.windows(uri.len()).any(|w| w == uri.as_bytes()), "{} lacks {uri}", n.name);
            assert!(der.windows(n.name.len()).any(|w| w == n.name.as_bytes()));
        }
        // No temp files left behind.
        assert!(!names.iter().any(|n| n.starts_with('.')));
    }

    #[test]
    fn refuses_existing_files_without_force() {
        let t = tempfile::tempdir().unwrap();
        let first = make(t.path());
        let ca_before = std::fs::read(&first.ca_cert).unwrap();
        let e = generate(t.path(), 2, &[], 30, false).unwrap_err();
        assert!(e.contains("refusing to overwrite") && e.contains("ca.pem") && e.contains("--force"), "{e}");
        assert_eq!(std::fs::read(&first.ca_cert).unwrap(), ca_before, "nothing rewritten");

        // One stray file is enough to refuse, and nothing else gets written.
        let t2 = tempfile::tempdir().unwrap();
        std::fs::write(t2.path().join("node-2.key"), "mine").unwrap();
        let e = generate(t2.path(), 2, &[], 30, false).unwrap_err();
        assert!(e.contains("node-2.key") && !e.contains("ca.pem"), "{e}");
        assert!(!t2.path().join("ca.pem").exists());

        // --force replaces everything, keys stay 0600.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(t2.path().join("node-2.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let f = generate(t2.path(), 2, &[], 30, true).unwrap();
        assert!(std::fs::read_to_string(&f.nodes[1].key).unwrap().starts_with("-----BEGIN PRIVATE KEY-----"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&f.nodes[1].key).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let again = generate(t.path(), 2, &[], 30, true).unwrap();
        assert_ne!(std::fs::read(&again.ca_cert).unwrap(), ca_before, "new CA written");
    }

    #[test]
    fn rejects_bad_arguments_before_writing() {
        let t = tempfile::tempdir().unwrap();
        for bad in ["", "bad_name", "IP:hub.example", "DNS:10.0.0.1", "a..b", "-a.example", "trailing.", "300.1.1.1", "ünï.example"] {
            let e = generate(t.path(), 1, &[bad.to_string()], 30, false).unwrap_err();
            assert!(e.contains("bad --hub-san"), "{bad}: {e}");
        }
        assert!(generate(t.path(), 1, &[], 0, false).unwrap_err().contains("--days"));
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0, "nothing written");
        for good in ["10.0.0.1", "IP:::1", "[fe80::1]", "dns:hub.example", "*.lab.example", "hub"] {
            parse_san(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[test]
    fn unwritable_directory_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("plain-file");
        std::fs::write(&file, "x").unwrap();
        let e = generate(&file.join("pki"), 1, &[], 30, false).unwrap_err();
        assert!(e.contains("cannot create output directory"), "{e}");
        let e = generate(&file, 1, &[], 30, false).unwrap_err();
        assert!(e.contains("cannot create output directory") || e.contains("not a directory"), "{e}");
    }

    #[test]
    fn run_exit_codes() {
        let t = tempfile::tempdir().unwrap();
        let args = |force| PkiArgs { out: t.path().join("p"), nodes: 1, hub_sans: vec![], force, days: 1 };
        assert_eq!(run(args(false)), 0);
        assert_eq!(run(args(false)), 1);
        assert_eq!(run(args(true)), 0);
        let bad = PkiArgs { hub_sans: vec!["no_way".into()], ..args(true) };
        assert_eq!(run(bad), 1);
    }

    #[test]
    fn cli_parses_defaults_and_flags() {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            a: PkiArgs,
        }
        let c = Cli::parse_from(["pki"]);
        assert_eq!((c.a.out.as_path(), c.a.nodes, c.a.days, c.a.force), (Path::new("pki"), 2, 365, false));
        let c = Cli::parse_from(["pki", "--out", "x", "--nodes", "5", "--hub-san", "1.2.3.4", "--hub-san", "h.example", "--force", "--days", "7"]);
        assert_eq!(c.a.hub_sans, ["1.2.3.4", "h.example"]);
        assert_eq!((c.a.nodes, c.a.days, c.a.force), (5, 7, true));
    }

    #[tokio::test]
    async fn hub_accepts_node_over_tls13() {
        let t = tempfile::tempdir().unwrap();
        let f = make(t.path());
        let node = &f.nodes[0];
        let o = handshake(hub_config(&f), node_config(&f.ca_cert, Some((&node.cert, &node.key))), "127.0.0.1").await;
        let (sv, peer) = o.server.expect("hub accepts node-1");
        let (cv, reply) = o.client.expect("node-1 accepts hub");
        assert_eq!(sv, rustls::ProtocolVersion::TLSv1_3);
        assert_eq!(cv, rustls::ProtocolVersion::TLSv1_3);
        assert_eq!(reply, b"pong");
        assert_eq!(peer.first(), certs(&node.cert).first(), "hub sees node-1's certificate");
    }

    #[tokio::test]
    async fn hub_rejects_client_without_certificate() {
        let t = tempfile::tempdir().unwrap();
        let f = make(t.path());
        let o = handshake(hub_config(&f), node_config(&f.ca_cert, None), "127.0.0.1").await;
        let e = o.server.expect_err("hub must require a client certificate");
        assert!(matches!(rustls_err(&e), Some(rustls::Error::NoCertificatesPresented)), "{e:?}");
        assert!(o.client.is_err(), "client sees the alert");
    }

    #[tokio::test]
    async fn hub_rejects_node_from_other_ca() {
        let t = tempfile::tempdir().unwrap();
        let f = make(&t.path().join("a"));
        let other = make(&t.path().join("b"));
        let n = &other.nodes[0];
        // The client trusts the hub's CA, but its own certificate is from another CA.
        let o = handshake(hub_config(&f), node_config(&f.ca_cert, Some((&n.cert, &n.key))), "localhost").await;
        let e = o.server.expect_err("hub must reject a foreign node certificate");
        assert!(
            matches!(
                rustls_err(&e),
                Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature))
            ),
            "{e:?}"
        );
        assert!(o.client.is_err());
    }

    #[tokio::test]
    async fn node_checks_hub_name_and_ca() {
        let t = tempfile::tempdir().unwrap();
        let f = generate(&t.path().join("a"), 1, &["10.9.8.7".into(), "hub.test".into()], 30, false).unwrap();
        let n = &f.nodes[0];
        let ok = node_config(&f.ca_cert, Some((&n.cert, &n.key)));
        // Only name checking: the TCP connection always goes to 127.0.0.1.
        for name in ["127.0.0.1", "localhost", "10.9.8.7", "hub.test"] {
            let o = handshake(hub_config(&f), ok.clone(), name).await;
            assert_eq!(o.client.unwrap_or_else(|e| panic!("{name}: {e}")).1, b"pong");
            o.server.unwrap();
        }
        // A name not in the SANs fails.
        let o = handshake(hub_config(&f), ok.clone(), "other.test").await;
        let e = o.client.expect_err("name not in SAN");
        assert!(
            matches!(rustls_err(&e), Some(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. }))),
            "{e:?}"
        );
        // A node trusting only another CA rejects this hub.
        let other = make(&t.path().join("b"));
        let o = handshake(hub_config(&f), node_config(&other.ca_cert, Some((&n.cert, &n.key))), "127.0.0.1").await;
        let e = o.client.expect_err("hub from an untrusted CA");
        assert!(matches!(rustls_err(&e), Some(rustls::Error::InvalidCertificate(_))), "{e:?}");
    }
}
