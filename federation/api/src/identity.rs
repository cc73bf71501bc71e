//! Certificates and keys: the controller CA, site CAs, SPIFFE leaf
//! certificates, CSRs, and reading the SPIFFE ID out of a certificate.
//!
//! Every leaf carries exactly one URI SAN, its SPIFFE ID. Controller node
//! certificates also carry the DNS name [`CONTROLLER_SERVER_NAME`], which is
//! what API clients verify; site credentials carry no DNS name, so a site can
//! never pose as a controller.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::model::{SpiffeId, TrustDomain};

/// The DNS name in every controller node certificate.
pub const CONTROLLER_SERVER_NAME: &str = "controller.causeway.internal";
/// The controller's own trust domain (nodes, admins, site API credentials).
pub const CONTROLLER_TRUST_DOMAIN: &str = "controller.causeway";
/// Suffix of every site's trust domain: `<site>.<suffix>`.
pub const SITE_TRUST_DOMAIN_SUFFIX: &str = "causeway";

/// Why a certificate, key or credential could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Key or certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A PEM text did not parse.
    #[error("{what}: not valid PEM ({detail})")]
    Pem {
        /// What was being read (a file or field name).
        what: String,
        /// What the parser said.
        detail: String,
    },
    /// A private key file others may read.
    #[error("{path} holds a private key and is readable or writable by others (mode {mode:o}): run `chmod 600 {path}` (or set CAUSEWAY_ALLOW_OPEN_KEYS=1 to accept it)")]
    OpenKey {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// A certificate does not carry exactly one URI SAN.
    #[error("certificate has {count} URI SANs; a SPIFFE certificate must have exactly one")]
    UriSanCount {
        /// How many it has.
        count: usize,
    },
    /// A certificate is not valid X.509.
    #[error("certificate is not valid X.509: {0}")]
    X509(String),
    /// A name in it is invalid.
    #[error(transparent)]
    Name(#[from] crate::model::InvalidName),
}

/// A CA: its certificate (DER + PEM) and signing key.
pub struct CertificateAuthority {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA certificate, DER.
    pub cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    key_pem: String,
}

/// A leaf certificate with its private key, ready for rustls.
#[derive(Clone)]
pub struct Credential {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The leaf (first) and any intermediates, DER.
    pub chain: Vec<CertificateDer<'static>>,
}

impl Credential {
    /// The private key, DER, for rustls.
    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, IdentityError> {
        parse_key_pem("private key", &self.key_pem)
    }

    /// Reads a CA from its certificate and key files (PEM); the key file
    /// must not be open to others ([`read_key`]).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, IdentityError> {
        Self::parse(
            &cert.display().to_string(),
            read(cert)?,
            &key.display().to_string(),
            read_key(key)?,
        )
    }

    /// From PEM texts (e.g. handed over as configuration, not files).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        Self::parse(
            "certificate",
            cert_pem.to_string(),
            "private key",
            key_pem.to_string(),
        )
    }

    fn parse(
        cert_what: &str,
        cert_pem: String,
        key_what: &str,
        key_pem: String,
    ) -> Result<Self, IdentityError> {
        let chain = parse_certs_pem(cert_what, &cert_pem)?;
        parse_key_pem(key_what, &key_pem)?;
        Ok(Self {
            cert_pem,
            key_pem,
            chain,
        })
    }

    /// Writes the certificate and key (the key readable by the owner
    /// only).
    pub fn save(&self, cert: &Path, key: &Path) -> Result<(), IdentityError> {
        // Key first: a process that notices the new certificate (renewal
        // followers watch it) finds the key that goes with it.
        write(key, &self.key_pem, true)?;
        write(cert, &self.cert_pem, false)
    }

    /// The SPIFFE ID of the leaf.
    pub fn spiffe_id(&self) -> Result<SpiffeId, IdentityError> {
        spiffe_id_of(&self.chain[0])
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = now();
    // Small backdate for clock skew between sites.
    params.not_before = now - time::Duration::minutes(10);
    params.not_after = now + time::Duration::seconds(lifetime.as_secs() as i64);
}

impl CertificateAuthority {
    /// A new self-signed CA, valid ten years.
    pub fn generate(common_name: &str) -> Result<Self, IdentityError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, Duration::from_secs(10 * 365 * 86400));
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            key_pem,
        })
    }

    /// A credential from its certificate chain and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = parse_certs_pem("CA certificate", cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| IdentityError::Pem {
                what: "CA certificate".into(),
                detail: "no certificate".into(),
            })?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            cert_der,
            issuer,
            key_pem: key_pem.to_string(),
        })
    }

    /// Reads a credential from its certificate and key files (PEM); the
    /// key file must not be open to others ([`read_key`]).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, IdentityError> {
        Self::from_pem(&read(cert)?, &read_key(key)?)
    }

    /// Writes the CA; the key file is created mode 0600.
    pub fn save(&self, cert: &Path, key: &Path) -> Result<(), IdentityError> {
        write(cert, &self.cert_pem, false)?;
        write(key, &self.key_pem, true)
    }

    /// Issues a leaf for `id`, valid for both TLS client and server use.
    pub fn issue(
        &self,
        id: &SpiffeId,
        dns_names: &[&str],
        lifetime: Duration,
    ) -> Result<Credential, IdentityError> {
        let key = KeyPair::generate()?;
        let params = leaf_params(id, dns_names, lifetime)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Credential {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain: vec![cert.der().clone()],
        })
    }

    /// Signs arbitrary leaf `params` (tests forge rogue certificates).
    #[cfg(test)]
    pub(crate) fn sign_params(&self, params: CertificateParams) -> CertificateDer<'static> {
        let key = KeyPair::generate().expect("a key");
        params
            .signed_by(&key, &self.issuer)
            .expect("signed")
            .der()
            .clone()
    }

    /// Issues a leaf for `id` after `forge` changed its parameters: how
    /// tests make rogue certificates (CA:TRUE leaves, wrong key usages,
    /// bad validity, other names) signed by a real CA.
    #[cfg(any(test, feature = "testing"))]
    pub fn issue_forged(
        &self,
        id: &SpiffeId,
        forge: impl FnOnce(&mut CertificateParams),
    ) -> Result<Credential, IdentityError> {
        let key = KeyPair::generate()?;
        let mut params = leaf_params(id, &[], Duration::from_secs(3600))?;
        forge(&mut params);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Credential {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain: vec![cert.der().clone()],
        })
    }

    /// Signs a CSR, replacing whatever names it asked for with `id`: the
    /// caller proves possession of the key, the CA decides the identity.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<String, IdentityError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let params = leaf_params(id, &[], lifetime)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }
}

pub(crate) fn leaf_params(
    id: &SpiffeId,
    dns_names: &[&str],
    lifetime: Duration,
) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, id.to_string());
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    for name in dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName((*name).try_into()?));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, lifetime);
    Ok(params)
}

/// A new key and a CSR for it (the CA fills in the identity).
pub fn generate_csr() -> Result<(String, String), IdentityError> {
    let key = KeyPair::generate()?;
    let params = CertificateParams::default();
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// Reads the one SPIFFE ID out of a leaf certificate.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    use x509_parser::prelude::*;
    let (_, x509) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| IdentityError::X509(e.to_string()))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push(*u);
            }
        }
    }
    if uris.len() != 1 {
        return Err(IdentityError::UriSanCount { count: uris.len() });
    }
    Ok(uris[0].parse()?)
}

/// The middle of a certificate's validity period, in seconds since the
/// Unix epoch: a time at which only its chain, not its age, decides.
pub fn validity_midpoint(cert: &CertificateDer<'_>) -> Option<u64> {
    use x509_parser::prelude::*;
    let (_, c) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let from = c.validity().not_before.timestamp();
    let to = c.validity().not_after.timestamp();
    u64::try_from(from + (to - from) / 2).ok()
}

/// A certificate's serial number as lowercase hex without leading zero
/// bytes: how revocations name a certificate its site's CA issued.
pub fn serial_hex(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, c) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(normalize_serial(&hex::encode(c.raw_serial())))
}

/// A serial number as written by a person (`0A:1b…`, `0x0a1b…`) in the
/// form [`serial_hex`] gives, or `None` when it is not hex or is longer
/// than the 20 octets RFC 5280 allows.
pub fn parse_serial(text: &str) -> Option<String> {
    let t = text.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    let digits: String = t.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || digits.len() > 40 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(normalize_serial(&digits.to_ascii_lowercase()))
}

fn normalize_serial(hex: &str) -> String {
    let trimmed = hex.trim_start_matches('0');
    let mut out = if trimmed.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    };
    if out.len() % 2 == 1 {
        out.insert(0, '0');
    }
    out
}

/// A certificate's validity (not before, not after) in ms since the epoch.
pub fn validity_ms(cert: &CertificateDer<'_>) -> Option<(u64, u64)> {
    use x509_parser::prelude::*;
    let (_, c) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let ms = |t: i64| u64::try_from(t).ok().map(|s| s * 1000);
    Some((
        ms(c.validity().not_before.timestamp())?,
        ms(c.validity().not_after.timestamp())?,
    ))
}

/// Whether the certificate says it is a CA (basicConstraints cA=true).
pub fn is_ca_cert(cert: &CertificateDer<'_>) -> bool {
    use x509_parser::prelude::*;
    X509Certificate::from_der(cert.as_ref())
        .ok()
        .and_then(|(_, c)| c.basic_constraints().ok().flatten().map(|b| b.value.ca))
        .unwrap_or(false)
}

/// The most PEM text a site trust bundle may hold.
pub const MAX_TRUST_BUNDLE_BYTES: usize = 64 * 1024;

/// Checks a site trust bundle (`what` names the field in messages): at most
/// [`MAX_TRUST_BUNDLE_BYTES`] of PEM, at least one certificate, each a CA.
pub fn check_trust_bundle(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    if pem.len() > MAX_TRUST_BUNDLE_BYTES {
        return Err(format!("{what}: larger than 64 KiB"));
    }
    // The parser's message already starts with the field name.
    let certs = parse_certs_pem(what, pem).map_err(|e| e.to_string())?;
    if !certs.iter().all(is_ca_cert) {
        return Err(format!(
            "{what}: every certificate in a trust bundle must be a CA certificate"
        ));
    }
    Ok(certs)
}

/// Every certificate in a PEM text; `what` names it in errors.
pub fn parse_certs_pem(
    what: &str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_bytes()).collect();
    let certs = certs.map_err(|e| IdentityError::Pem {
        what: what.to_string(),
        detail: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(IdentityError::Pem {
            what: what.to_string(),
            detail: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// The one private key in a PEM text; `what` names it in errors.
pub fn parse_key_pem(what: &str, pem: &str) -> Result<PrivateKeyDer<'static>, IdentityError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| IdentityError::Pem {
            what: what.to_string(),
            detail: e.to_string(),
        })?
        .ok_or_else(|| IdentityError::Pem {
            what: what.to_string(),
            detail: "no PRIVATE KEY block".into(),
        })
}

/// A PEM file's text.
pub fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// A private key file's text. Refused when the file is readable or
/// writable by others, or writable by its group (a group-readable key, as
/// a Kubernetes Secret volume mounts it for the pod's fsGroup, is
/// accepted), unless `CAUSEWAY_ALLOW_OPEN_KEYS=1`.
pub fn read_key(path: &Path) -> Result<String, IdentityError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        let allowed = std::env::var_os("CAUSEWAY_ALLOW_OPEN_KEYS").is_some_and(|v| v == "1");
        if mode & 0o027 != 0 && !allowed {
            return Err(IdentityError::OpenKey {
                path: path.display().to_string(),
                mode,
            });
        }
    }
    read(path)
}

/// Writes a file atomically: a fresh temporary file beside it (created
/// exclusively, never through a symlink), its mode set explicitly (0600
/// for secrets, 0644 otherwise, whatever the umask), synced, then renamed
/// over `path` (a rename replaces a symlink at `path`, never follows it).
pub fn write(path: &Path, contents: &str, secret: bool) -> Result<(), IdentityError> {
    use std::io::Write;
    let io = |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
        opts.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    let mut f = opts.open(&tmp).map_err(io)?;
    let written = (|| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(if secret {
                0o600
            } else {
                0o644
            }))?;
        }
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// Creates `dir` (and its parents) if missing and makes it 0700: it holds
/// keys.
pub fn private_dir(dir: &Path) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// The controller's trust domain as a newtype.
pub fn controller_trust_domain() -> TrustDomain {
    controller_trust_domain_inner()
}

/// Why `site` may not be a site's name: its trust domain would be the
/// controllers' own (a site CA could then mint controller identities).
pub fn reserved_site_name(site: &crate::model::SiteName) -> Option<String> {
    (site.trust_domain(SITE_TRUST_DOMAIN_SUFFIX) == controller_trust_domain()).then(|| {
        format!(
            "site name {:?} is reserved: its trust domain would be the controllers' own ({CONTROLLER_TRUST_DOMAIN}); choose another name",
            site.as_str()
        )
    })
}

fn controller_trust_domain_inner() -> TrustDomain {
    CONTROLLER_TRUST_DOMAIN
        .parse()
        .expect("constant is a valid trust domain")
}

/// SHA-256 of a DER certificate, hex: how tokens pin the controller CA.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(cert.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_read_from_a_person_match_the_certificate() {
        let ca = CertificateAuthority::generate("a").unwrap();
        let leaf = ca
            .issue(
                &"spiffe://a.causeway/gateway/0".parse().unwrap(),
                &[],
                Duration::from_secs(60),
            )
            .unwrap();
        let serial = serial_hex(&leaf.chain[0]).unwrap();
        assert_eq!(parse_serial(&serial).as_deref(), Some(serial.as_str()));
        let colons: Vec<String> = serial
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        assert_eq!(
            parse_serial(&colons.join(":")).as_deref(),
            Some(serial.as_str())
        );
        assert_eq!(parse_serial("0x00ff").as_deref(), Some("ff"));
        assert_eq!(parse_serial("abc").as_deref(), Some("0abc"));
        assert_eq!(parse_serial("xyz"), None);
        assert_eq!(parse_serial(""), None);
        assert_eq!(parse_serial(&"a".repeat(41)), None);
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_written_0600_through_no_symlink_and_open_keys_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        private_dir(&keys).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&keys), 0o700);
        // A planted symlink where the key goes is replaced, not followed.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let key = keys.join("k.pem");
        std::os::unix::fs::symlink(&victim, &key).unwrap();
        let ca = CertificateAuthority::generate("t").unwrap();
        ca.save(&keys.join("c.pem"), &key).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!std::fs::symlink_metadata(&key)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&keys.join("c.pem")), 0o644);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&keys).unwrap().count(), 2);
        assert!(CertificateAuthority::load(&keys.join("c.pem"), &key).is_ok());
        // Group-readable (a Kubernetes Secret volume) is fine; world is not.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o440)).unwrap();
        assert!(read_key(&key).is_ok());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = match CertificateAuthority::load(&keys.join("c.pem"), &key) {
            Ok(_) => panic!("a world-readable key was loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("readable or writable by others (mode 644)") && e.contains("chmod 600"),
            "{e}"
        );
    }

    #[test]
    fn issued_leaf_carries_exactly_its_spiffe_id() {
        let ca = CertificateAuthority::generate("test ca").unwrap();
        let id: SpiffeId = "spiffe://east.causeway/gateway/0".parse().unwrap();
        let leaf = ca.issue(&id, &[], Duration::from_secs(3600)).unwrap();
        assert_eq!(leaf.spiffe_id().unwrap(), id);
        assert!(!is_ca_cert(&leaf.chain[0]));
        assert!(is_ca_cert(&ca.cert_der));
    }

    #[test]
    fn csr_gets_the_identity_the_ca_chooses() {
        let ca = CertificateAuthority::generate("test ca").unwrap();
        let (csr, _key) = generate_csr().unwrap();
        let id: SpiffeId = "spiffe://controller.causeway/site/east".parse().unwrap();
        let pem = ca.sign_csr(&csr, &id, Duration::from_secs(60)).unwrap();
        let der = parse_certs_pem("cert", &pem).unwrap();
        assert_eq!(spiffe_id_of(&der[0]).unwrap(), id);
        assert!(ca
            .sign_csr("garbage", &id, Duration::from_secs(60))
            .is_err());
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = CertificateAuthority::generate("test ca").unwrap();
        let again = CertificateAuthority::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        let id: SpiffeId = "spiffe://a.causeway/gateway/x".parse().unwrap();
        again.issue(&id, &[], Duration::from_secs(60)).unwrap();
    }
}
