//! `causeway_site_trust_bundle`: the CA certificates a joined site's
//! gateways are trusted through.

use std::collections::BTreeMap;

use causeway_api::pb as api;

use super::*;
use crate::schema::{Attr, Block, Mode, Ty};
use crate::value::Value;

/// The `causeway_site_trust_bundle` resource's schema.
pub fn bundle_schema() -> Block {
    Block {
        description: "The trust bundle of a site that has joined: the CA certificates its gateways' certificates chain to. For a site CA kept outside the gateway (cert-manager, Vault, ...). Destroying this resource leaves the site's last bundle in place (a site always has one; it goes with the site).",
        attrs: vec![
            Attr::new("id", Ty::String, Mode::Computed, "The site name."),
            Attr::new(
                "site",
                Ty::String,
                Mode::Required,
                "The site, which must have joined. Changing it manages another site's bundle.",
            ),
            Attr::new(
                "ca_pem",
                Ty::String,
                Mode::Required,
                "One or more CA certificates (PEM), at most 64 KiB. To rotate: list the old and the new CA, move the site's gateways to the new one, then list the new one alone; peers close tunnels a dropped CA authenticated.",
            ),
            Attr::new(
                "fingerprints",
                Ty::List(Box::new(Ty::String)),
                Mode::Computed,
                "SHA-256 of each CA certificate (hex), in order.",
            ),
        ],
    }
}

/// SHA-256 fingerprints of the certificates in a PEM bundle.
pub(super) fn fingerprints(pem: &str) -> Option<Vec<String>> {
    let certs = identity::parse_certs_pem("ca_pem", pem).ok()?;
    Some(certs.iter().map(identity::fingerprint).collect())
}

impl Provider {
    pub(super) fn validate_bundle(config: &Value) -> Vec<pb::Diagnostic> {
        let mut diags = Vec::new();
        if let Some(site) = config.get("site").as_str() {
            if let Err(e) = site.parse::<causeway_api::model::SiteName>() {
                diags.push(attr_error(
                    "site",
                    format!("{site:?} is not a site name: {e}"),
                    "Name a member site (e.g. causeway_site.x.name).",
                ));
            }
        }
        if let Some(pem) = config.get("ca_pem").as_str() {
            if let Err(e) = identity::check_trust_bundle("ca_pem", pem) {
                diags.push(attr_error(
                    "ca_pem",
                    "the trust bundle is invalid",
                    format!("{e}. Give the site CA's certificate (PEM), or the old and the new one during a rotation."),
                ));
            }
        }
        diags
    }

    pub(super) fn plan_bundle(prior: &Value, proposed: &Value) -> (Value, Vec<pb::AttributePath>) {
        let mut f = fields(proposed);
        f.insert("id".into(), proposed.get("site").clone());
        let prints = match proposed.get("ca_pem") {
            Value::String(pem) => fingerprints(pem)
                .map(|p| Value::string_list(&p))
                .unwrap_or(Value::Unknown),
            _ => Value::Unknown,
        };
        f.insert("fingerprints".into(), prints);
        let mut replace = Vec::new();
        if !prior.is_null() && prior.get("site") != proposed.get("site") {
            replace.push(path("site"));
        }
        (bundle_schema().object(f), replace)
    }

    pub(super) async fn apply_bundle(&self, planned: &Value) -> Result<Value, pb::Diagnostic> {
        if planned.is_null() {
            // A site always has a bundle: it keeps its last one.
            return Ok(Value::Null);
        }
        let site = planned.get("site").as_str().unwrap_or_default();
        let pem = planned.get("ca_pem").as_str().unwrap_or_default();
        self.call(false, |mut f| {
            let req = api::UpdateTrustBundleRequest {
                site: site.into(),
                trust_bundle_pem: pem.into(),
            };
            async move { f.update_trust_bundle(req).await }
        })
        .await
        .map_err(|s| {
                let mut d = api_error(&format!("setting the trust bundle of site {site}"), &s);
                if s.code() == tonic::Code::NotFound {
                    d.detail = format!(
                        "Site {site} has not joined (or was removed). A bundle can be set once the site's gateway has joined with its token: apply again after it has."
                    );
                }
                d
            })?;
        let mut f = fields(planned);
        f.insert("id".into(), Value::string(site));
        f.insert(
            "fingerprints".into(),
            Value::string_list(&fingerprints(pem).unwrap_or_default()),
        );
        Ok(bundle_schema().object(f))
    }

    pub(super) async fn read_bundle(&self, state: &Value) -> Result<Value, pb::Diagnostic> {
        let site = state.get("site").as_str().unwrap_or_default();
        let cat = self.catalog().await?;
        let Some(s) = cat.sites.iter().find(|s| s.name == site) else {
            return Ok(Value::Null);
        };
        Ok(Self::bundle_state(fields(state), s))
    }

    /// A bundle state from the catalog's site: the configured PEM text is
    /// kept while it holds the same certificates.
    pub(super) fn bundle_state(mut f: BTreeMap<String, Value>, s: &api::Site) -> Value {
        let stored = fingerprints(&s.trust_bundle_pem).unwrap_or_default();
        let ours = f
            .get("ca_pem")
            .and_then(Value::as_str)
            .and_then(fingerprints);
        if ours.as_ref() != Some(&stored) {
            f.insert("ca_pem".into(), Value::string(&s.trust_bundle_pem));
        }
        f.insert("id".into(), Value::string(&s.name));
        f.insert("site".into(), Value::string(&s.name));
        f.insert("fingerprints".into(), Value::string_list(&stored));
        bundle_schema().object(f)
    }

    pub(super) async fn import_bundle(&self, id: &str) -> Result<Value, pb::Diagnostic> {
        let cat = self.catalog().await?;
        let s = cat.sites.iter().find(|s| s.name == id).ok_or_else(|| {
            error(
                format!("site {id:?} is not a member"),
                "Import a trust bundle by the name of a site that has joined.",
            )
        })?;
        Ok(Self::bundle_state(BTreeMap::new(), s))
    }
}
