//! Mutual TLS between agents: a test CA maker (`certs init`) and the rustls
//! configurations. An agent accepts only peers whose certificate the
//! configured CA signed, and checks that the host name a peer claims is one
//! its certificate was issued for.

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Making or loading TLS material failed.
#[derive(Debug, Error)]
pub enum TlsError {
    /// Reading, writing or parsing a PEM file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A PEM file without the certificate or private key expected in it.
    #[error("{0}: no certificate or key found")]
    Missing(PathBuf),
    /// Generating a key or signing a certificate failed (`certs init`).
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the material (a bad CA certificate, a key that does
    /// not match its certificate).
    #[error("tls configuration: {0}")]
    Config(String),
    /// A host name with characters other than ASCII letters, digits, `-` and `.`.
    #[error("host name {0:?} is not usable in a certificate")]
    BadHost(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_owned(), source }
}

/// Creates `ca.pem`, `ca.key` and `HOST.pem`/`HOST.key` for each host in `dir`.
pub fn init_certs(dir: &Path, hosts: &[String]) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "dcmigrate CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    write(dir, "ca.pem", &ca_cert.pem())?;
    write(dir, "ca.key", &ca_key.serialize_pem())?;
    for host in hosts {
        if host.is_empty() || !host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
            return Err(TlsError::BadHost(host.clone()));
        }
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![host.clone()])?;
        p.distinguished_name.push(DnType::CommonName, host.as_str());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
        write(dir, &format!("{host}.pem"), &cert.pem())?;
        write(dir, &format!("{host}.key"), &key.serialize_pem())?;
    }
    Ok(())
}

/// Writes `name` in `dir` through a new file moved into place: a key is
/// 0600 from its first byte, and an existing file (or a symlink planted in
/// its place) is replaced, not written through.
fn write(dir: &Path, name: &str, body: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
    let mut f = tempfile::Builder::new()
        .prefix(".new-")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(io(&p))?;
    f.write_all(body.as_bytes()).map_err(io(&p))?;
    f.persist(&p).map_err(|e| e.error).map_err(io(&p))?;
    Ok(())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(io(path))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice()).collect::<Result<_, _>>().map_err(io(path))?;
    if certs.is_empty() {
        return Err(TlsError::Missing(path.to_owned()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(io(path))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(io(path))?
        .ok_or_else(|| TlsError::Missing(path.to_owned()))
}

/// What identifies an agent's certificate, for its status and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// SHA-256 of the certificate (DER), lowercase hex.
    pub fingerprint: String,
    /// When it expires, seconds since the epoch.
    pub not_after: i64,
}

impl CertInfo {
    /// Of a certificate as `certs init` writes it (PEM).
    pub fn of_pem(path: &Path) -> Result<Self, TlsError> {
        Self::of(&load_certs(path)?[0], path)
    }

    fn of(cert: &CertificateDer<'_>, path: &Path) -> Result<Self, TlsError> {
        use x509_parser::prelude::*;
        let (_, c) = X509Certificate::from_der(cert.as_ref())
            .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
        let fingerprint = hex::encode(ring::digest::digest(&ring::digest::SHA256, cert.as_ref()));
        Ok(Self { fingerprint, not_after: c.validity().not_after.timestamp() })
    }
}

/// Both sides of an agent's mTLS: it serves peers and connects to them.
#[derive(Clone)]
pub struct TlsConfig {
    /// For accepting peers: presents this host's certificate and requires
    /// one the CA signed from the peer.
    pub server: Arc<ServerConfig>,
    /// For connecting to peers: trusts only the CA and presents this host's
    /// certificate.
    pub client: Arc<ClientConfig>,
    /// This host's certificate.
    pub cert: CertInfo,
}

/// An agent's TLS identity, shared by everything that makes or accepts its
/// connections, and replaced whole when SIGHUP loads the certificates
/// again: connections made after that use the new one, open ones keep theirs.
#[derive(Clone)]
pub struct SharedTls(Arc<arc_swap::ArcSwap<TlsConfig>>);

impl SharedTls {
    /// Shares `tls`.
    pub fn new(tls: TlsConfig) -> Self {
        Self(Arc::new(arc_swap::ArcSwap::from_pointee(tls)))
    }

    /// The identity for a new connection.
    pub fn current(&self) -> Arc<TlsConfig> {
        self.0.load_full()
    }

    /// From now on, new connections use `tls`.
    pub fn replace(&self, tls: TlsConfig) {
        self.0.store(Arc::new(tls));
    }
}

impl TlsConfig {
    /// Loads `ca.pem` plus this host's certificate and key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for c in load_certs(ca)? {
            roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let chain = load_certs(cert)?;
        let info = CertInfo::of(&chain[0], cert)?;
        let key = load_key(key)?;
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(cfg)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(cfg)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(cfg)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(cfg)?;
        Ok(Self { server: Arc::new(server), client: Arc::new(client), cert: info })
    }

    /// The conventional layout of `certs init`: DIR/ca.pem, DIR/HOST.pem, DIR/HOST.key.
    pub fn load_dir(dir: &Path, host: &str) -> Result<Self, TlsError> {
        Self::load(&dir.join("ca.pem"), &dir.join(format!("{host}.pem")), &dir.join(format!("{host}.key")))
    }
}

/// DNS names a (CA-verified) peer certificate was issued for.
pub fn cert_host_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, c)) = X509Certificate::from_der(cert.as_ref()) else {
        return vec![];
    };
    let mut names = vec![];
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_load() {
        let d = tempfile::tempdir().unwrap();
        init_certs(d.path(), &["hostA".into(), "hostB".into()]).unwrap();
        let a = TlsConfig::load_dir(d.path(), "hostA").unwrap();
        // The certificate it presents: SHA-256 of its DER, and its expiry.
        assert_eq!(a.cert, CertInfo::of_pem(&d.path().join("hostA.pem")).unwrap());
        assert_eq!(a.cert.fingerprint.len(), 64);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!(a.cert.not_after > now, "{:?}", a.cert);
        assert_ne!(a.cert, CertInfo::of_pem(&d.path().join("hostB.pem")).unwrap());
        let c = load_certs(&d.path().join("hostB.pem")).unwrap();
        assert_eq!(cert_host_names(&c[0]), vec!["hostB".to_string()]);
        assert!(init_certs(d.path(), &["bad host".into()]).is_err());
    }
}
