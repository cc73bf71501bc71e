//! A site's identity on disk, and joining the federation with a token.
//!
//! Layout of the state directory:
//!
//! | file | what |
//! |---|---|
//! | `site.json` | site name, trust domain, controller endpoints |
//! | `controller-ca.pem` | the controller CA pinned from the join token |
//! | `api.pem`, `api-key.pem` | the site's credential for the controller API |
//! | `site-ca.pem`, `site-ca-key.pem` | the site CA (its key never leaves the site) |

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use causeway_api::client::ControllerClient;
use causeway_api::identity::{self, CertificateAuthority, Credential};
use causeway_api::model::{SiteName, SpiffeId, TrustDomain};
use causeway_api::pb;
use causeway_api::token::JoinToken;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteFile {
    site: SiteName,
    trust_domain: TrustDomain,
    controllers: Vec<String>,
}

/// A joined site's state, kept in its state directory.
#[derive(Clone)]
pub struct SiteState {
    /// The state directory.
    pub dir: PathBuf,
    /// The site's name.
    pub site: SiteName,
    /// Its trust domain.
    pub trust_domain: TrustDomain,
    /// Controller endpoints (`host:port`).
    pub controllers: Vec<String>,
    /// The controller CA, PEM, pinned at join.
    pub controller_ca_pem: String,
    /// The site's credential for the controller API.
    pub api: Credential,
}

impl SiteState {
    /// Loads a joined site; `None` if the directory holds no site yet.
    pub fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        let site_json = dir.join("site.json");
        if !site_json.exists() {
            return Ok(None);
        }
        let f: SiteFile = serde_json::from_str(&identity::read(&site_json)?)
            .with_context(|| format!("{} is corrupt", site_json.display()))?;
        Ok(Some(Self {
            dir: dir.to_path_buf(),
            site: f.site,
            trust_domain: f.trust_domain,
            controllers: f.controllers,
            controller_ca_pem: identity::read(&dir.join("controller-ca.pem"))?,
            api: Credential::load(&dir.join("api.pem"), &dir.join("api-key.pem"))?,
        }))
    }

    /// Loads the site CA as it is now on disk (after a rotation, the new
    /// one); unlike [`Self::site_ca`] never creates one.
    pub fn reload_site_ca(
        dir: &Path,
        given: Option<&(PathBuf, PathBuf)>,
    ) -> anyhow::Result<CertificateAuthority> {
        let (c, k) = match given {
            Some((c, k)) => (c.clone(), k.clone()),
            None => (dir.join("site-ca.pem"), dir.join("site-ca-key.pem")),
        };
        CertificateAuthority::load(&c, &k)
            .with_context(|| format!("reloading the site CA from {}", c.display()))
    }

    /// Loads the site CA, creating and saving one if there is none.
    pub fn site_ca(
        dir: &Path,
        given: Option<&(PathBuf, PathBuf)>,
    ) -> anyhow::Result<CertificateAuthority> {
        if let Some((c, k)) = given {
            return CertificateAuthority::load(c, k).context("loading the configured site CA");
        }
        let (c, k) = (dir.join("site-ca.pem"), dir.join("site-ca-key.pem"));
        if c.exists() {
            return Ok(CertificateAuthority::load(&c, &k)?);
        }
        identity::private_dir(dir)?;
        let ca = CertificateAuthority::generate("causeway site CA")?;
        ca.save(&c, &k)?;
        Ok(ca)
    }

    /// Redeems a join token: pins the controller CA from it, registers the
    /// site CA and tunnel addresses, and stores the API credential it gets.
    pub async fn join(
        dir: &Path,
        token: &str,
        site_ca: &CertificateAuthority,
        tunnel_addrs: Vec<String>,
    ) -> anyhow::Result<Self> {
        let token = JoinToken::decode(token)?;
        identity::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (csr_pem, key_pem) = identity::generate_csr()?;
        let client = ControllerClient::new(token.controllers.clone(), &token.ca_pem, None);
        let mut fed = client.federation().await?;
        let resp = fed
            .join(pb::JoinRequest {
                token: token.encode(),
                trust_bundle_pem: site_ca.cert_pem.clone(),
                tunnel_addrs,
                csr_pem,
            })
            .await
            .map_err(|s| anyhow::anyhow!("join refused: {}", s.message()))?
            .into_inner();
        if resp.site != token.site.as_str() {
            bail!(
                "the controller registered site {:?}, but the token is for {:?}",
                resp.site,
                token.site
            );
        }
        let pinned = identity::parse_certs_pem("token CA", &token.ca_pem)?;
        let got = identity::parse_certs_pem("controller CA", &resp.controller_ca_pem)?;
        if pinned.first() != got.first() {
            bail!("the controller answered with a CA other than the one pinned in the token");
        }
        let chain = identity::parse_certs_pem("API certificate", &resp.api_cert_pem)?;
        let api = Credential {
            cert_pem: resp.api_cert_pem,
            key_pem,
            chain,
        };
        let trust_domain: TrustDomain = resp.trust_domain.parse()?;
        let controllers = if resp.controller_endpoints.is_empty() {
            token.controllers.clone()
        } else {
            resp.controller_endpoints
        };
        api.save(&dir.join("api.pem"), &dir.join("api-key.pem"))?;
        identity::write(&dir.join("controller-ca.pem"), &token.ca_pem, false)?;
        let f = SiteFile {
            site: token.site.clone(),
            trust_domain: trust_domain.clone(),
            controllers: controllers.clone(),
        };
        // site.json last: its presence means the join completed.
        identity::write(
            &dir.join("site.json"),
            &serde_json::to_string_pretty(&f)?,
            false,
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            site: token.site,
            trust_domain,
            controllers,
            controller_ca_pem: token.ca_pem,
            api,
        })
    }

    /// A controller client with the site's credential.
    pub fn controller_client(&self) -> Arc<ControllerClient> {
        Arc::new(ControllerClient::new(
            self.controllers.clone(),
            &self.controller_ca_pem,
            Some(&self.api),
        ))
    }

    /// A fresh tunnel certificate for this replica, from the site CA.
    pub fn gateway_credential(
        &self,
        ca: &CertificateAuthority,
        replica: &str,
        ttl: Duration,
    ) -> anyhow::Result<Credential> {
        gateway_credential(&self.trust_domain, ca, replica, ttl)
    }
}

/// How long to wait before renewing `cred`: two thirds of what is left of
/// it (certificates are backdated for clock skew, so their own start says
/// little about when they were issued). Nothing when it has expired.
fn renew_in(cred: &Credential) -> Duration {
    let to = cred
        .chain
        .first()
        .and_then(identity::validity_ms)
        .map_or(0, |(_, to)| to);
    Duration::from_millis(to.saturating_sub(causeway_api::clock::unix_ms()) * 2 / 3)
}

impl SiteState {
    /// Renews the site's API credential when two thirds of what was left
    /// of it have passed, for ever: a new key, signed by the controllers (who accept the old one
    /// until it expires), written over `api.pem`/`api-key.pem` and used
    /// for every new connection of `client`. A state directory that cannot
    /// be written (a read-only Secret) keeps the new one in memory only.
    pub async fn renew_api_credential(&self, client: Arc<ControllerClient>) {
        let mut current = self.api.clone();
        crate::export_expiry("site_api", &current);
        loop {
            tokio::time::sleep(renew_in(&current)).await;
            match self.renew_once(&client).await {
                Ok(cred) => {
                    metrics::counter!("causeway_site_credential_renewals_total", "result" => "ok")
                        .increment(1);
                    tracing::info!(site = %self.site, "site API credential renewed");
                    crate::export_expiry("site_api", &cred);
                    current = cred;
                }
                Err(e) => {
                    metrics::counter!("causeway_site_credential_renewals_total", "result" => "error")
                        .increment(1);
                    tracing::error!(site = %self.site, error = format!("{e:#}"), "could not renew the site API credential; retrying in 10 s");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            }
        }
    }

    async fn renew_once(&self, client: &ControllerClient) -> anyhow::Result<Credential> {
        let (csr_pem, key_pem) = identity::generate_csr()?;
        let r = client
            .call(false, |mut f| {
                let csr_pem = csr_pem.clone();
                async move {
                    f.renew_credential(pb::RenewCredentialRequest { csr_pem })
                        .await
                }
            })
            .await
            .map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))?;
        let cred = Credential {
            chain: identity::parse_certs_pem("renewed credential", &r.cert_pem)?,
            cert_pem: r.cert_pem,
            key_pem,
        };
        if let Err(e) = cred.save(&self.dir.join("api.pem"), &self.dir.join("api-key.pem")) {
            tracing::warn!(error = %e, "could not write the renewed credential; using it from memory (the state directory is read-only?)");
        }
        client.set_credential(&cred);
        Ok(cred)
    }

    /// Follows `api.pem` in the state directory (renewed by the site's
    /// gateway): when it changes, `client` uses the new credential for new
    /// connections. For the DNS server and the Kubernetes agent.
    pub async fn follow_api_credential(&self, client: Arc<ControllerClient>) {
        let mut seen = self.api.cert_pem.clone();
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let cert = self.dir.join("api.pem");
            let Ok(now) = identity::read(&cert) else {
                continue;
            };
            if now == seen {
                continue;
            }
            match Credential::load(&cert, &self.dir.join("api-key.pem")) {
                Ok(cred) if cred.cert_pem == now => {
                    client.set_credential(&cred);
                    tracing::info!(site = %self.site, "using the renewed site API credential");
                    seen = now;
                }
                // Mid-renewal (certificate and key are two files): next time.
                Ok(_) | Err(_) => {}
            }
        }
    }
}

/// A tunnel certificate for `replica` of the site with trust domain `td`.
pub fn gateway_credential(
    td: &causeway_api::model::TrustDomain,
    ca: &CertificateAuthority,
    replica: &str,
    ttl: Duration,
) -> anyhow::Result<Credential> {
    let id = SpiffeId::new(td.clone(), &format!("/gateway/{replica}"))?;
    Ok(ca.issue(&id, &[], ttl)?)
}
