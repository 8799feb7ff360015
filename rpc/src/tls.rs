//! TLS for quicx: server and client configuration, PEM loading, generated dev certificates and
//! client certificates (mTLS).
//!
//! Verification is on by default: a [`ClientTls`] trusts the Mozilla root set plus whatever you
//! add. The only way to turn verification off is [`ClientTls::insecure_skip_server_verification`].

use std::{fmt, path::Path, sync::Arc};

use rustls::{
    RootCertStore,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
};

use crate::{Error, Result};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl fmt::Display) -> Error {
    Error::Tls(e.to_string())
}

/// A self-signed certificate and key generated at run time (rcgen), for examples, tests and
/// development. Nothing is written to disk; a client trusts exactly this certificate with
/// [`ClientTls::trust`].
///
/// ```
/// let dev = quicx::DevCertificate::localhost().unwrap();
/// let server_tls = quicx::ServerTls::from_dev(&dev);
/// let client_tls = quicx::ClientTls::new().trust(dev.certificate());
/// # let _ = (server_tls, client_tls);
/// ```
pub struct DevCertificate {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl DevCertificate {
    /// Generates a self-signed certificate for the given DNS names or IP addresses.
    pub fn generate<I, S>(names: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        let certified = rcgen::generate_simple_self_signed(names).map_err(tls_err)?;
        Ok(Self::from_parts(certified.cert, &certified.signing_key))
    }

    /// Generates a certificate for `localhost`, `127.0.0.1` and `::1`.
    pub fn localhost() -> Result<Self> {
        Self::generate(["localhost", "127.0.0.1", "::1"])
    }

    fn from_parts(cert: rcgen::Certificate, key: &rcgen::KeyPair) -> Self {
        Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }

    /// The certificate (DER).
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// The private key (DER, PKCS#8).
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The certificate as PEM text.
    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key as PEM text.
    pub fn private_key_pem(&self) -> &str {
        &self.key_pem
    }
}

impl fmt::Debug for DevCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCertificate")
            .field("certificate_len", &self.cert.len())
            .finish_non_exhaustive()
    }
}

/// A certificate authority generated at run time, to issue server and client certificates for
/// mutual TLS in development and tests.
#[derive(Debug)]
pub struct DevCertificateAuthority {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl DevCertificateAuthority {
    /// Generates a new CA.
    pub fn generate(name: &str) -> Result<Self> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().map_err(tls_err)?;
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).map_err(tls_err)?;
        Ok(Self { issuer })
    }

    /// The CA certificate, to trust on the other side.
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Issues a certificate with `common_name` as subject CN and `names` as subject alternative
    /// names (DNS names or IPs). Under mTLS the server sees the common name as the client's
    /// identity.
    pub fn issue<I, S>(&self, common_name: &str, names: I) -> Result<DevCertificate>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        let mut params = rcgen::CertificateParams::new(names).map_err(tls_err)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let key = rcgen::KeyPair::generate().map_err(tls_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(tls_err)?;
        Ok(DevCertificate::from_parts(cert, &key))
    }
}

/// Reads every certificate of a PEM file.
pub fn load_certificates_pem(path: impl AsRef<Path>) -> Result<Vec<CertificateDer<'static>>> {
    let path = path.as_ref();
    let data =
        std::fs::read(path).map_err(|e| Error::Tls(format!("reading {}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("parsing {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!("no certificate in {}", path.display())));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_private_key_pem(path: impl AsRef<Path>) -> Result<PrivateKeyDer<'static>> {
    let path = path.as_ref();
    let data =
        std::fs::read(path).map_err(|e| Error::Tls(format!("reading {}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| Error::Tls(format!("parsing {}: {e}", path.display())))?
        .ok_or_else(|| Error::Tls(format!("no private key in {}", path.display())))
}

fn root_store(certs: &[CertificateDer<'static>]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert.clone()).map_err(tls_err)?;
    }
    Ok(roots)
}

#[derive(Debug, Clone)]
enum ClientAuth {
    None,
    Optional(Vec<CertificateDer<'static>>),
    Required(Vec<CertificateDer<'static>>),
}

/// Server-side TLS: the certificate chain and key the server presents, and whether it asks
/// clients for certificates (mTLS).
pub struct ServerTls {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_auth: ClientAuth,
}

impl ServerTls {
    /// A certificate chain (leaf first) and its private key.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        Self {
            chain,
            key,
            client_auth: ClientAuth::None,
        }
    }

    /// Loads the chain and key from PEM files, as issued for a real deployment.
    pub fn from_pem_files(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self> {
        Ok(Self::new(
            load_certificates_pem(cert)?,
            load_private_key_pem(key)?,
        ))
    }

    /// Uses a generated development certificate.
    pub fn from_dev(dev: &DevCertificate) -> Self {
        Self::new(vec![dev.certificate()], dev.private_key())
    }

    /// Requires every client to present a certificate issued by one of `roots`. The client's
    /// certificate common name becomes its identity (see `Connection::client_id`).
    #[must_use]
    pub fn require_client_certificates(mut self, roots: Vec<CertificateDer<'static>>) -> Self {
        self.client_auth = ClientAuth::Required(roots);
        self
    }

    /// Verifies client certificates issued by one of `roots` when a client offers one, and lets
    /// clients without a certificate in.
    #[must_use]
    pub fn optional_client_certificates(mut self, roots: Vec<CertificateDer<'static>>) -> Self {
        self.client_auth = ClientAuth::Optional(roots);
        self
    }

    /// The key server endpoints derive their stateless-reset key from.
    pub(crate) fn private_key_der(&self) -> &[u8] {
        self.key.secret_der()
    }

    pub(crate) fn quinn_config(&self) -> Result<quinn::crypto::rustls::QuicServerConfig> {
        let provider = provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?;
        let builder = match &self.client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Optional(roots) | ClientAuth::Required(roots) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(root_store(roots)?),
                    provider,
                );
                let verifier = if matches!(self.client_auth, ClientAuth::Optional(_)) {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(verifier.build().map_err(tls_err)?)
            }
        };
        let mut config = builder
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_err)?;
        config.alpn_protocols = crate::wire::alpn_protocols();
        config.max_early_data_size = 0;
        quinn::crypto::rustls::QuicServerConfig::try_from(config).map_err(tls_err)
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("chain_len", &self.chain.len())
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

/// Client-side TLS: which servers to trust, and an optional client certificate.
///
/// [`ClientTls::new`] trusts the Mozilla root set ([webpki-roots]); add your own CA or a dev
/// certificate with [`trust`](Self::trust) / [`trust_pem_file`](Self::trust_pem_file), or start
/// from nothing with [`ClientTls::empty`].
///
/// [webpki-roots]: https://docs.rs/webpki-roots
pub struct ClientTls {
    roots: RootCertStore,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    skip_verification: bool,
    alpn: Vec<Vec<u8>>,
}

impl Default for ClientTls {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for ClientTls {
    fn clone(&self) -> Self {
        Self {
            roots: self.roots.clone(),
            client_cert: self
                .client_cert
                .as_ref()
                .map(|(chain, key)| (chain.clone(), key.clone_key())),
            skip_verification: self.skip_verification,
            alpn: self.alpn.clone(),
        }
    }
}

impl ClientTls {
    /// Trusts the Mozilla root set.
    pub fn new() -> Self {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        Self {
            roots,
            ..Self::empty()
        }
    }

    /// Trusts nothing until you add certificates.
    pub fn empty() -> Self {
        Self {
            roots: RootCertStore::empty(),
            client_cert: None,
            skip_verification: false,
            alpn: crate::wire::alpn_protocols(),
        }
    }

    /// Also trusts `cert` (a CA, or a self-signed server certificate such as a
    /// [`DevCertificate`]).
    #[must_use]
    pub fn trust(mut self, cert: CertificateDer<'static>) -> Self {
        if let Err(e) = self.roots.add(cert) {
            tracing::warn!("ignoring a trusted certificate that cannot be parsed: {e}");
        }
        self
    }

    /// Also trusts every certificate of a PEM file.
    pub fn trust_pem_file(mut self, path: impl AsRef<Path>) -> Result<Self> {
        for cert in load_certificates_pem(path)? {
            self.roots.add(cert).map_err(tls_err)?;
        }
        Ok(self)
    }

    /// Presents this certificate chain and key when the server asks (mTLS).
    #[must_use]
    pub fn client_certificate(
        mut self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Self {
        self.client_cert = Some((chain, key));
        self
    }

    /// Presents a generated development certificate (see [`DevCertificateAuthority::issue`]).
    #[must_use]
    pub fn client_dev_certificate(self, dev: &DevCertificate) -> Self {
        self.client_certificate(vec![dev.certificate()], dev.private_key())
    }

    /// **Insecure**: accepts any server certificate, so anyone on the path can impersonate the
    /// server. For throwaway experiments only.
    pub fn insecure_skip_server_verification() -> Self {
        Self {
            skip_verification: true,
            ..Self::empty()
        }
    }

    /// Offers other ALPN protocols instead of `quicx/2` and `quicx/1` (for protocol tests, and
    /// to pin a client to `quicx/1`: a quicx server refuses anything else).
    #[doc(hidden)]
    #[must_use]
    pub fn with_alpn(mut self, alpn: Vec<Vec<u8>>) -> Self {
        self.alpn = alpn;
        self
    }

    pub(crate) fn quinn_config(&self) -> Result<quinn::crypto::rustls::QuicClientConfig> {
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?;
        let builder = if self.skip_verification {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SkipServerVerification(provider)))
        } else {
            builder.with_root_certificates(self.roots.clone())
        };
        let mut config = match &self.client_cert {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(tls_err)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        quinn::crypto::rustls::QuicClientConfig::try_from(config).map_err(tls_err)
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("roots", &self.roots.len())
            .field("client_certificate", &self.client_cert.is_some())
            .field("skip_verification", &self.skip_verification)
            .finish()
    }
}

#[derive(Debug)]
struct SkipServerVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What the server learned of a client from its certificate (mTLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject common name (CN) of the client certificate, if it has one.
    pub common_name: Option<String>,
    /// The DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// The leaf certificate (DER).
    pub certificate: CertificateDer<'static>,
}

impl PeerIdentity {
    pub(crate) fn from_connection(conn: &quinn::Connection) -> Option<Self> {
        let any = conn.peer_identity()?;
        let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
        let leaf = chain.first()?.clone();
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).ok()?;
        let common_name = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let dns_names = parsed
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Self {
            common_name,
            dns_names,
            certificate: leaf,
        })
    }
}
