//! TLS to Redis (`rediss://`). The command path (redis-rs) and the
//! subscriber links (our own RESP) both check the server's certificate
//! against the same roots and offer the same client certificate, built
//! from [`RedisTls`] when the broker connects and again whenever the files
//! change (see `RedisConfig::tls_reload`).

use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{ConfigError, RedisConfig, RedisTls};

/// What both connection paths need for `rediss://`.
pub(crate) struct TlsMaterial {
    /// For redis-rs (it parses the same PEM itself).
    pub(crate) certs: redis::TlsCertificates,
    /// For the subscriber links.
    pub(crate) client: TlsClient,
    /// The files' contents this was built from, to see a rotation.
    pub(crate) files: TlsFiles,
}

/// The contents of the configured TLS files.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    ca: Option<Vec<u8>>,
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
}

impl TlsFiles {
    /// Reads the files `tls` names.
    pub(crate) fn read(tls: &RedisTls) -> Result<TlsFiles, ConfigError> {
        Ok(TlsFiles {
            ca: tls.ca_file.as_deref().map(read).transpose()?,
            cert: tls.cert_file.as_deref().map(read).transpose()?,
            key: tls.key_file.as_deref().map(read).transpose()?,
        })
    }
}

/// A rustls client for the subscriber links; every link of one broker
/// shares one, and a reload replaces it for the connections made after.
#[derive(Clone)]
pub(crate) struct TlsClient(Arc<RwLock<Arc<TlsConnector>>>);

impl TlsClient {
    /// The TLS handshake over `stream`, checking the certificate against
    /// `host` (a DNS name or an IP address, as in the URL).
    pub(crate) async fn connect(
        &self,
        host: &str,
        stream: TcpStream,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_owned()).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}"))
        })?;
        let connector = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        connector.connect(name, stream).await
    }

    /// From now on, connect as `other` does.
    pub(crate) fn replace_with(&self, other: &TlsClient) {
        let connector = other.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = connector;
    }
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClient")
    }
}

/// The TLS material `config` asks for: `None` for `redis://` URLs.
pub(crate) fn material(config: &RedisConfig) -> Result<Option<TlsMaterial>, ConfigError> {
    if !config.uses_tls()? {
        return Ok(None);
    }
    build(&config.tls, TlsFiles::read(&config.tls)?).map(Some)
}

/// New material when the files no longer hold what `current` was built
/// from; `None` while they are unchanged.
pub(crate) fn reloaded(
    tls: &RedisTls,
    current: &TlsFiles,
) -> Result<Option<TlsMaterial>, ConfigError> {
    let files = TlsFiles::read(tls)?;
    if files == *current {
        return Ok(None);
    }
    build(tls, files).map(Some)
}

fn build(tls: &RedisTls, files: TlsFiles) -> Result<TlsMaterial, ConfigError> {
    install_provider();
    let ca_pem = files.ca.clone();
    let roots = match (&ca_pem, &tls.ca_file) {
        (Some(pem), Some(path)) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| bad(path, &e))?;
                roots.add(cert).map_err(|e| bad(path, &e))?;
            }
            if roots.is_empty() {
                return Err(ConfigError::Tls(format!(
                    "{}: no PEM certificate in it",
                    path.display()
                )));
            }
            roots
        }
        _ => system_roots()?,
    };
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let (config, client_tls) = match (&tls.cert_file, &tls.key_file) {
        (Some(cert_path), Some(key_path)) => {
            let cert_pem = files.cert.clone().unwrap_or_default();
            let key_pem = files.key.clone().unwrap_or_default();
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(cert_path, &e))?;
            if chain.is_empty() {
                return Err(ConfigError::Tls(format!(
                    "{}: no PEM certificate in it",
                    cert_path.display()
                )));
            }
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad(key_path, &e))?;
            let config = builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad(key_path, &e))?;
            let client = redis::ClientTlsConfig {
                client_cert: cert_pem,
                client_key: key_pem,
            };
            (config, Some(client))
        }
        _ => (builder.with_no_client_auth(), None),
    };
    Ok(TlsMaterial {
        certs: redis::TlsCertificates {
            client_tls,
            root_cert: ca_pem,
        },
        client: TlsClient(Arc::new(RwLock::new(Arc::new(TlsConnector::from(
            Arc::new(config),
        ))))),
        files,
    })
}

/// The system's CA certificates (as redis-rs reads them without a CA file).
fn system_roots() -> Result<RootCertStore, ConfigError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(ConfigError::Tls(
            "no CA certificates found on this system: set broker.tls_ca_file".into(),
        ));
    }
    Ok(roots)
}

/// rustls needs one process-wide crypto provider; ring is the one built in.
/// Another part of the process may have installed its own first, which is
/// as good.
fn install_provider() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::TlsFile {
        path: path.to_owned(),
        source,
    })
}

fn bad(path: &Path, e: &dyn std::fmt::Display) -> ConfigError {
    ConfigError::Tls(format!("{}: {e}", path.display()))
}
