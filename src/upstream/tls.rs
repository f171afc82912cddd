//! rustls for `https` upstreams: the built-in web roots plus the
//! certificates of `[upstream] ca_file`, and ALPN offering `h2` before
//! `http/1.1`.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

use super::BuildError;

/// The connector and server name for `host`, trusting `extra_roots`
/// besides the web roots.
pub(super) fn connector(
    host: &str,
    extra_roots: &[CertificateDer<'static>],
) -> Result<(TlsConnector, ServerName<'static>), BuildError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots
            .add(cert.clone())
            .map_err(|e| BuildError::Tls(format!("a CA certificate was not accepted: {e}")))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| BuildError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| BuildError::BadHost("TLS server name"))?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}
