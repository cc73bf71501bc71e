//! Mutual TLS on the plugin socket, as Terraform's plugin client asks.
//!
//! Terraform puts a fresh self-signed client certificate (ECDSA P-521) in
//! `PLUGIN_CLIENT_CERT` and expects the provider to print its own
//! certificate in the handshake line. The provider makes a P-256
//! certificate for `localhost`, accepts exactly the client certificate it
//! was given (pinned, byte for byte), and checks the client's handshake
//! signature: P-521 with this module's verifier (ring has no P-521), any
//! other scheme with ring.

use std::sync::Arc;

use anyhow::Context;
use base64::Engine;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

pub struct PluginTls {
    pub config: Arc<rustls::ServerConfig>,
    /// The server certificate as the handshake line carries it: base64 of
    /// the DER, without padding.
    pub cert_line: String,
}

/// A server configuration that accepts only `client_cert_pem`.
pub fn server(client_cert_pem: &str) -> anyhow::Result<PluginTls> {
    let client = causeway_api::identity::parse_certs_pem("PLUGIN_CLIENT_CERT", client_cert_pem)?
        .into_iter()
        .next()
        .context("PLUGIN_CLIENT_CERT holds no certificate")?;
    let key = rcgen::KeyPair::generate().context("generating the plugin's key")?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .context("plugin certificate parameters")?;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let cert = params
        .self_signed(&key)
        .context("signing the plugin's certificate")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedClient {
        expected: client,
        provider: provider.clone(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .context("the plugin's TLS identity")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(PluginTls {
        config: Arc::new(config),
        cert_line: base64::engine::general_purpose::STANDARD_NO_PAD.encode(cert.der()),
    })
}

#[derive(Debug)]
struct PinnedClient {
    expected: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for PinnedClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.expected.as_ref() {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify(message, cert, dss, rustls::crypto::verify_tls12_signature)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify(message, cert, dss, rustls::crypto::verify_tls13_signature)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        let mut schemes = self
            .provider
            .signature_verification_algorithms
            .supported_schemes();
        schemes.push(SignatureScheme::ECDSA_NISTP521_SHA512);
        schemes
    }
}

type RingVerify = fn(
    &[u8],
    &CertificateDer<'_>,
    &DigitallySignedStruct,
    &rustls::crypto::WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error>;

impl PinnedClient {
    /// P-521 here, any other scheme with ring (`ring_verify`, per TLS version).
    fn verify(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
        ring_verify: RingVerify,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme == SignatureScheme::ECDSA_NISTP521_SHA512 {
            return verify_p521(message, cert, dss.signature());
        }
        ring_verify(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

/// ECDSA P-521 with SHA-512 over `message`, by the key in `cert`.
fn verify_p521(
    message: &[u8],
    cert: &CertificateDer<'_>,
    signature: &[u8],
) -> Result<HandshakeSignatureValid, rustls::Error> {
    use p521::ecdsa::signature::Verifier;
    let bad = |_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature);
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
    let key =
        p521::ecdsa::VerifyingKey::from_sec1_bytes(&x509.public_key().subject_public_key.data)
            .map_err(bad)?;
    let sig = p521::ecdsa::Signature::from_der(signature).map_err(bad)?;
    key.verify(message, &sig).map_err(bad)?;
    Ok(HandshakeSignatureValid::assertion())
}
