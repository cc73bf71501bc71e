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

/// The plugin socket's TLS: this provider's certificate, and Terraform's
/// client certificate pinned.
pub struct PluginTls {
    /// The rustls server config.
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
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
    verify_p521_key(
        message,
        &x509.public_key().subject_public_key.data,
        signature,
    )
}

/// The same, by a SEC1-encoded public key.
fn verify_p521_key(
    message: &[u8],
    public_key: &[u8],
    signature: &[u8],
) -> Result<HandshakeSignatureValid, rustls::Error> {
    use p521::ecdsa::signature::Verifier;
    let bad = |_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature);
    let key = p521::ecdsa::VerifyingKey::from_sec1_bytes(public_key).map_err(bad)?;
    let sig = p521::ecdsa::Signature::from_der(signature).map_err(bad)?;
    key.verify(message, &sig).map_err(bad)?;
    Ok(HandshakeSignatureValid::assertion())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS handshake against the plugin's server configuration, as a
    /// client with `cert` (or none); whether the server let it in.
    async fn server_accepts(
        tls: &PluginTls,
        cert: Option<&rcgen::CertifiedKey<rcgen::KeyPair>>,
    ) -> bool {
        let server_der = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(&tls.cert_line)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(server_der)).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = match cert {
            Some(c) => builder
                .with_client_auth_cert(
                    vec![c.cert.der().clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.signing_key.serialize_der())),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let (a, b) = tokio::io::duplex(64 << 10);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
        let server = tokio::spawn(async move { acceptor.accept(b).await.is_ok() });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        // The client may finish its side before the server has judged its
        // certificate: the server's verdict is what counts.
        let _client = connector.connect("localhost".try_into().unwrap(), a).await;
        server.await.unwrap()
    }

    #[tokio::test]
    async fn only_the_certificate_terraform_named_gets_in() {
        let pinned = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let tls = server(&pinned.cert.pem()).unwrap();
        assert!(server_accepts(&tls, Some(&pinned)).await);
        assert!(!server_accepts(&tls, Some(&other)).await);
        assert!(!server_accepts(&tls, None).await);
    }

    #[test]
    fn a_p521_signature_is_checked_against_the_key() {
        use p521::ecdsa::signature::Signer;
        let mut scalar = [7u8; 66];
        scalar[0] = 1; // below the group order (a 521-bit number)
        let secret = p521::ecdsa::SigningKey::from_slice(&scalar).unwrap();
        let public = p521::ecdsa::VerifyingKey::from(&secret).to_encoded_point(false);
        let message = b"the handshake transcript";
        let sig: p521::ecdsa::Signature = secret.sign(message);
        let der = sig.to_der();
        assert!(verify_p521_key(message, public.as_bytes(), der.as_bytes()).is_ok());
        assert!(verify_p521_key(b"another transcript", public.as_bytes(), der.as_bytes()).is_err());
        assert!(verify_p521_key(message, public.as_bytes(), b"not DER").is_err());
        // A certificate that is not one is refused, not a panic.
        assert!(verify_p521(
            message,
            &CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]),
            der.as_bytes()
        )
        .is_err());
    }
}
