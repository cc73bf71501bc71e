//! SPIFFE trust for the tunnels: one bundle per site trust domain, never
//! merged. A certificate is accepted only if it chains to the bundle of the
//! trust domain its own SPIFFE ID names, so a site's CA can only vouch for
//! that site's identities.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{is_ca_cert, serial_hex, spiffe_id_of};
use crate::model::{SiteName, SpiffeId, TrustDomain};

/// Why a peer certificate was refused. `kind()` is a bounded metrics label.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The leaf carries no valid SPIFFE ID.
    #[error("peer certificate has no valid SPIFFE ID: {0}")]
    NoSpiffeId(String),
    /// The leaf is a CA certificate.
    #[error("peer leaf certificate is a CA certificate")]
    LeafIsCa,
    /// No member site owns the claimed trust domain.
    #[error("trust domain {0} belongs to no member site")]
    UnknownTrustDomain(TrustDomain),
    /// The peer is from another trust domain than the one dialed.
    #[error("peer is {got}, but this connection expects trust domain {expected}")]
    WrongTrustDomain {
        /// Who the peer is.
        got: SpiffeId,
        /// The trust domain expected.
        expected: TrustDomain,
    },
    /// The leaf's serial was revoked by its site or an operator.
    #[error("peer certificate for {id} (serial {serial}) was revoked")]
    Revoked {
        /// The ID the leaf claims.
        id: SpiffeId,
        /// Its serial number, hex.
        serial: String,
    },
    /// The chain does not verify against the claimed site's bundle.
    #[error("peer certificate for {id} does not chain to the bundle of site {site}: {reason}")]
    BadChain {
        /// The ID the leaf claims.
        id: SpiffeId,
        /// The site that owns that trust domain.
        site: SiteName,
        /// What the verifier said.
        reason: String,
    },
}

impl TrustError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TrustError::NoSpiffeId(_) => "no_spiffe_id",
            TrustError::LeafIsCa => "leaf_is_ca",
            TrustError::UnknownTrustDomain(_) => "unknown_trust_domain",
            TrustError::WrongTrustDomain { .. } => "wrong_trust_domain",
            TrustError::BadChain { .. } => "bad_chain",
            TrustError::Revoked { .. } => "revoked",
        }
    }
}

#[derive(Clone, Debug)]
struct SiteBundle {
    site: SiteName,
    roots: Vec<CertificateDer<'static>>,
}

/// Trust bundles of every member site, keyed by trust domain.
#[derive(Default, Debug)]
pub struct TrustStore {
    bundles: RwLock<HashMap<TrustDomain, SiteBundle>>,
    /// Revoked leaf serials (hex, as [`serial_hex`] gives) per site.
    revoked: RwLock<HashMap<SiteName, HashSet<String>>>,
}

/// A verified peer: its site and SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The peer's site.
    pub site: SiteName,
    /// The peer's SPIFFE ID.
    pub id: SpiffeId,
}

impl TrustStore {
    /// An empty store: no site is trusted yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets (or replaces) one site's bundle.
    pub fn set_site(
        &self,
        site: SiteName,
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) {
        let mut map = self.bundles.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, b| b.site != site);
        map.insert(trust_domain, SiteBundle { site, roots });
    }

    /// Forgets a site's bundle: its certificates are refused from now on.
    pub fn remove_site(&self, site: &SiteName) {
        let mut map = self.bundles.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, b| &b.site != site);
        self.revoked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(site);
    }

    /// Sets the serials of `site`'s certificates that are revoked: a leaf
    /// with one of them is refused even though it chains to the bundle.
    pub fn set_revoked(&self, site: &SiteName, serials: impl IntoIterator<Item = String>) {
        let serials: HashSet<String> = serials.into_iter().collect();
        let mut map = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        if serials.is_empty() {
            map.remove(site);
        } else {
            map.insert(site.clone(), serials);
        }
    }

    fn is_revoked(&self, site: &SiteName, serial: &str) -> bool {
        let map = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        map.get(site).is_some_and(|s| s.contains(serial))
    }

    /// The sites with a bundle.
    pub fn sites(&self) -> Vec<SiteName> {
        let map = self.bundles.read().unwrap_or_else(|e| e.into_inner());
        map.values().map(|b| b.site.clone()).collect()
    }

    /// Verifies a peer chain for `usage`, optionally insisting on a trust domain.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        client: bool,
        expected: Option<&TrustDomain>,
    ) -> Result<Peer, TrustError> {
        let id = spiffe_id_of(end_entity).map_err(|e| TrustError::NoSpiffeId(e.to_string()))?;
        if is_ca_cert(end_entity) {
            return Err(TrustError::LeafIsCa);
        }
        if let Some(expected) = expected {
            if id.trust_domain() != expected {
                return Err(TrustError::WrongTrustDomain {
                    got: id,
                    expected: expected.clone(),
                });
            }
        }
        let bundle = {
            let map = self.bundles.read().unwrap_or_else(|e| e.into_inner());
            map.get(id.trust_domain())
                .cloned()
                .ok_or_else(|| TrustError::UnknownTrustDomain(id.trust_domain().clone()))?
        };
        let anchors: Vec<_> = bundle
            .roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect();
        let bad = |reason: String| TrustError::BadChain {
            id: id.clone(),
            site: bundle.site.clone(),
            reason,
        };
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| bad(e.to_string()))?;
        let inter: Vec<CertificateDer<'_>> = intermediates.to_vec();
        let algs = algorithms();
        let usage = if client {
            webpki::KeyUsage::client_auth()
        } else {
            webpki::KeyUsage::server_auth()
        };
        ee.verify_for_usage(algs.all, &anchors, &inter, now, usage, None, None)
            .map_err(|e| bad(format!("{e:?}")))?;
        let serial = serial_hex(end_entity).unwrap_or_default();
        if self.is_revoked(&bundle.site, &serial) {
            return Err(TrustError::Revoked { id, serial });
        }
        Ok(Peer {
            site: bundle.site,
            id,
        })
    }
}

impl TrustStore {
    /// Whether a chain a live connection was authenticated with still
    /// chains to its site's current bundle — after a CA was pruned from it,
    /// connections made with that CA's certificates must close. Judged at
    /// the middle of the leaf's validity: expiry was checked when the
    /// connection was made, and a tunnel is not cut for aging since.
    pub fn still_trusted(&self, chain: &[CertificateDer<'_>], client: bool) -> bool {
        let Some((ee, inter)) = chain.split_first() else {
            return false;
        };
        let Some(at) = crate::identity::validity_midpoint(ee) else {
            return false;
        };
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(at));
        self.verify(ee, inter, at, client, None).is_ok()
    }
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn to_rustls(e: TrustError) -> rustls::Error {
    tracing::info!(error = %e, kind = e.kind(), "refused peer certificate");
    rustls::Error::General(e.to_string())
}

/// Server side of a tunnel: requires a client certificate from any member site.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    store: Arc<TrustStore>,
}

impl SpiffeClientVerifier {
    /// A verifier over `store`'s bundles.
    pub fn new(store: Arc<TrustStore>) -> Arc<Self> {
        Arc::new(Self { store })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.store
            .verify(end_entity, intermediates, now, true, None)
            .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Client side of a tunnel to one site: the server must be that site.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    store: Arc<TrustStore>,
    expected: TrustDomain,
}

impl SpiffeServerVerifier {
    /// A verifier that accepts only a server of trust domain `expected`.
    pub fn new(store: Arc<TrustStore>, expected: TrustDomain) -> Arc<Self> {
        Arc::new(Self { store, expected })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.store
            .verify(end_entity, intermediates, now, false, Some(&self.expected))
            .map_err(to_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::identity::CertificateAuthority;

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn a_live_chain_stops_being_trusted_when_its_ca_is_pruned() {
        let old = CertificateAuthority::generate("old").unwrap();
        let new = CertificateAuthority::generate("new").unwrap();
        let store = TrustStore::new();
        let site: SiteName = "a".parse().unwrap();
        let td: TrustDomain = "a.causeway".parse().unwrap();
        let id = "spiffe://a.causeway/gateway/0".parse().unwrap();
        let from_old = old.issue(&id, &[], Duration::from_secs(60)).unwrap();
        let from_new = new.issue(&id, &[], Duration::from_secs(60)).unwrap();

        store.set_site(
            site.clone(),
            td.clone(),
            vec![old.cert_der.clone(), new.cert_der.clone()],
        );
        assert!(store.still_trusted(&from_old.chain, true));
        assert!(store.still_trusted(&from_new.chain, true));

        store.set_site(site.clone(), td.clone(), vec![new.cert_der.clone()]);
        assert!(!store.still_trusted(&from_old.chain, true));
        assert!(store.still_trusted(&from_new.chain, true));
        assert!(!store.still_trusted(&[], true));

        // Aging is not a reason: a chain already past its end still passes.
        let short = new.issue(&id, &[], Duration::from_secs(0)).unwrap();
        let later = UnixTime::since_unix_epoch(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                + Duration::from_secs(60),
        );
        assert!(store
            .verify(&short.chain[0], &[], later, true, None)
            .is_err());
        assert!(store.still_trusted(&short.chain, true));

        store.remove_site(&site);
        assert!(!store.still_trusted(&from_new.chain, true));
    }

    #[test]
    fn a_revoked_serial_is_refused_and_only_that_one() {
        let ca = CertificateAuthority::generate("a").unwrap();
        let store = TrustStore::new();
        let site: SiteName = "a".parse().unwrap();
        store.set_site(
            site.clone(),
            "a.causeway".parse().unwrap(),
            vec![ca.cert_der.clone()],
        );
        let id = "spiffe://a.causeway/gateway/0".parse().unwrap();
        let bad = ca.issue(&id, &[], Duration::from_secs(60)).unwrap();
        let good = ca.issue(&id, &[], Duration::from_secs(60)).unwrap();
        let serial = crate::identity::serial_hex(&bad.chain[0]).unwrap();
        assert_ne!(
            Some(&serial),
            crate::identity::serial_hex(&good.chain[0]).as_ref()
        );
        store.set_revoked(&site, [serial.clone()]);
        let err = store
            .verify(&bad.chain[0], &[], now(), true, None)
            .unwrap_err();
        assert!(matches!(err, TrustError::Revoked { .. }), "{err:?}");
        assert!(err.to_string().contains(&serial), "{err}");
        assert!(!store.still_trusted(&bad.chain, false));
        assert!(store.still_trusted(&good.chain, false));
        // A bundle update keeps the revocations; leaving the federation drops both.
        store.set_site(
            site.clone(),
            "a.causeway".parse().unwrap(),
            vec![ca.cert_der.clone()],
        );
        assert!(!store.still_trusted(&bad.chain, false));
        store.set_revoked(&site, []);
        assert!(store.still_trusted(&bad.chain, false));
    }

    /// The negative suite for certificates, through the verifier both
    /// ends of every tunnel use: each rogue leaf is refused, for its own
    /// reason.
    #[test]
    fn rogue_certificates_are_refused_each_for_its_reason() {
        use crate::identity::leaf_params;
        use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose, IsCa, SanType};
        let ca = CertificateAuthority::generate("a").unwrap();
        let store = TrustStore::new();
        store.set_site(
            "a".parse().unwrap(),
            "a.causeway".parse().unwrap(),
            vec![ca.cert_der.clone()],
        );
        let id: SpiffeId = "spiffe://a.causeway/gateway/0".parse().unwrap();
        let base = || leaf_params(&id, &[], Duration::from_secs(3600)).unwrap();
        let uri = |s: &str| SanType::URI(s.to_string().try_into().unwrap());
        let hour = time::Duration::hours(1);
        let now_t = time::OffsetDateTime::now_utc();
        let good = ca.sign_params(base());
        assert!(store.verify(&good, &[], now(), true, None).is_ok());
        type Forge = Box<dyn Fn(&mut rcgen::CertificateParams)>;
        let cases: Vec<(&str, Forge, &str)> = vec![
            (
                "a leaf with CA:TRUE",
                Box::new(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
                "LeafIsCa",
            ),
            (
                "a server-only leaf used as a client",
                Box::new(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]),
                "BadChain",
            ),
            (
                "not yet valid",
                Box::new(move |p| {
                    p.not_before = now_t + hour;
                    p.not_after = now_t + hour * 2;
                }),
                "BadChain",
            ),
            (
                "expired",
                Box::new(move |p| {
                    p.not_before = now_t - hour * 2;
                    p.not_after = now_t - hour;
                }),
                "BadChain",
            ),
            (
                "no URI SAN",
                Box::new(|p| p.subject_alt_names.clear()),
                "NoSpiffeId",
            ),
            (
                "two URI SANs",
                Box::new(move |p| {
                    p.subject_alt_names
                        .push(uri("spiffe://a.causeway/gateway/1"))
                }),
                "NoSpiffeId",
            ),
            (
                "another site's ID from this site's CA",
                Box::new(move |p| p.subject_alt_names = vec![uri("spiffe://b.causeway/gateway/0")]),
                "UnknownTrustDomain",
            ),
            (
                "a controller ID from a site CA",
                Box::new(move |p| {
                    p.subject_alt_names = vec![uri("spiffe://controller.causeway/admin/root")]
                }),
                "UnknownTrustDomain",
            ),
        ];
        for (what, forge, want) in cases {
            let mut p = base();
            forge(&mut p);
            let cert = ca.sign_params(p);
            let err = store.verify(&cert, &[], now(), true, None).unwrap_err();
            let got = format!("{err:?}");
            assert!(got.starts_with(want), "{what}: {got}");
        }
    }

    #[test]
    fn a_site_ca_vouches_only_for_its_own_trust_domain() {
        let a = CertificateAuthority::generate("a").unwrap();
        let b = CertificateAuthority::generate("b").unwrap();
        let store = TrustStore::new();
        let td_a: TrustDomain = "a.causeway".parse().unwrap();
        let td_b: TrustDomain = "b.causeway".parse().unwrap();
        store.set_site("a".parse().unwrap(), td_a.clone(), vec![a.cert_der.clone()]);
        store.set_site("b".parse().unwrap(), td_b.clone(), vec![b.cert_der.clone()]);

        let good = a
            .issue(
                &"spiffe://a.causeway/gateway/0".parse().unwrap(),
                &[],
                Duration::from_secs(60),
            )
            .unwrap();
        let peer = store
            .verify(&good.chain[0], &[], now(), true, None)
            .unwrap();
        assert_eq!(peer.site.as_str(), "a");

        // Signed by A's CA, claims B's identity: refused.
        let forged = a
            .issue(
                &"spiffe://b.causeway/gateway/0".parse().unwrap(),
                &[],
                Duration::from_secs(60),
            )
            .unwrap();
        let err = store
            .verify(&forged.chain[0], &[], now(), true, None)
            .unwrap_err();
        assert_eq!(err.kind(), "bad_chain");

        // Right CA, but the dialer expected site B.
        let err = store
            .verify(&good.chain[0], &[], now(), false, Some(&td_b))
            .unwrap_err();
        assert_eq!(err.kind(), "wrong_trust_domain");

        // A CA nobody trusts.
        let stranger = CertificateAuthority::generate("x").unwrap();
        let unknown = stranger
            .issue(
                &"spiffe://x.causeway/gateway/0".parse().unwrap(),
                &[],
                Duration::from_secs(60),
            )
            .unwrap();
        let err = store
            .verify(&unknown.chain[0], &[], now(), true, None)
            .unwrap_err();
        assert_eq!(err.kind(), "unknown_trust_domain");

        // Removing the site removes trust.
        store.remove_site(&"a".parse().unwrap());
        assert!(store
            .verify(&good.chain[0], &[], now(), true, None)
            .is_err());
    }
}
