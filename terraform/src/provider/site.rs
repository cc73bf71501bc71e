//! `causeway_site` (a member site: an invitation until its gateway joins
//! with the token, then the member) and the `causeway_sites` data source.

use std::collections::BTreeMap;

use causeway_api::pb as api;

use super::*;
use crate::schema::{Attr, Block, Mode, Ty};
use crate::value::Value;

/// Join tokens live an hour unless the configuration says otherwise.
pub(super) const DEFAULT_TOKEN_TTL: u64 = 3600;

/// The controller's limit (7 days).
pub(super) const MAX_TOKEN_TTL: u64 = 7 * 24 * 3600;

/// The `causeway_site` resource's schema.
pub fn site_schema() -> Block {
    Block {
        description: "A member site (cluster). Creating it reserves the name and mints a one-time join token for the site's gateway; destroying it removes the site, its trust bundle and its exports.",
        attrs: vec![
            Attr::new("id", Ty::String, Mode::Computed, "The site name."),
            Attr::new(
                "name",
                Ty::String,
                Mode::Required,
                "Site name: a DNS label, unique in the federation. Changing it replaces the site.",
            ),
            Attr::new(
                "labels",
                Ty::Map(Box::new(Ty::String)),
                Mode::Optional,
                "Labels of the site (e.g. `region`, `zone`: locality failover reads them). Changing them updates a joined site in place; a site not joined yet gets a new invitation, whose token carries them.",
            ),
            Attr::new(
                "token_ttl_seconds",
                Ty::Number,
                Mode::OptionalComputed,
                "How long the join token stays valid, 1 s to 7 days. Default 3600.",
            ),
            Attr::new(
                "join_token",
                Ty::String,
                Mode::Computed,
                "One-time token the site's gateway joins with (`CAUSEWAY_JOIN_TOKEN`).",
            )
            .sensitive(),
            Attr::new(
                "join_token_expires_at",
                Ty::String,
                Mode::Computed,
                "When the join token expires (RFC 3339). An invitation that expires unused is planned anew.",
            ),
            Attr::new(
                "joined",
                Ty::Bool,
                Mode::Computed,
                "Whether the site's gateway has joined (as of the last refresh).",
            ),
            Attr::new(
                "trust_domain",
                Ty::String,
                Mode::Computed,
                "The site's SPIFFE trust domain, once joined.",
            ),
            Attr::new(
                "available",
                Ty::Bool,
                Mode::Computed,
                "Whether the site's gateways are heartbeating, once joined.",
            ),
            Attr::new(
                "tunnel_addrs",
                Ty::List(Box::new(Ty::String)),
                Mode::Computed,
                "The addresses the site's gateways take tunnels on, once joined.",
            ),
        ],
    }
}

pub(super) fn site_entry_ty() -> Ty {
    Ty::Object(vec![
        ("name", Ty::String),
        ("trust_domain", Ty::String),
        ("available", Ty::Bool),
        ("tunnel_addrs", Ty::List(Box::new(Ty::String))),
        ("labels", Ty::Map(Box::new(Ty::String))),
        ("exports", Ty::Number),
    ])
}

/// The `causeway_sites` data source's schema.
pub fn sites_schema() -> Block {
    Block {
        description: "The federation's member sites.",
        attrs: vec![
            Attr::new(
                "id",
                Ty::String,
                Mode::Computed,
                "The catalog revision read.",
            ),
            Attr::new(
                "sites",
                Ty::List(Box::new(site_entry_ty())),
                Mode::Computed,
                "Each member: name, trust domain, availability, tunnel addresses, labels and how many services it exports.",
            ),
            Attr::new(
                "revision",
                Ty::Number,
                Mode::Computed,
                "The catalog revision read.",
            ),
        ],
    }
}

impl Provider {
    pub(super) fn validate_site(config: &Value) -> Vec<pb::Diagnostic> {
        let mut diags = Vec::new();
        if let Some(name) = config.get("name").as_str() {
            if let Err(e) = name.parse::<causeway_api::model::SiteName>() {
                diags.push(attr_error(
                    "name",
                    format!("{name:?} is not a site name: {e}"),
                    "Use a DNS label: lower-case letters, digits and '-', at most 63 characters.",
                ));
            }
        }
        if let Some(ttl) = config.get("token_ttl_seconds").as_f64() {
            if ttl.fract() != 0.0 || ttl < 1.0 || ttl > MAX_TOKEN_TTL as f64 {
                diags.push(attr_error(
                    "token_ttl_seconds",
                    format!("{ttl} is not a whole number of seconds from 1 to {MAX_TOKEN_TTL}"),
                    "Join tokens live at most 7 days.",
                ));
            }
        }
        diags
    }

    pub(super) fn plan_site(prior: &Value, proposed: &Value) -> (Value, Vec<pb::AttributePath>) {
        let mut f = fields(proposed);
        if f.get("token_ttl_seconds").is_none_or(Value::is_null) {
            f.insert(
                "token_ttl_seconds".into(),
                Value::Number(DEFAULT_TOKEN_TTL as f64),
            );
        }
        let mut replace = Vec::new();
        if prior.is_null() {
            let id = f.get("name").cloned().unwrap_or(Value::Unknown);
            f.insert("id".into(), id);
            for a in [
                "join_token",
                "join_token_expires_at",
                "trust_domain",
                "available",
                "tunnel_addrs",
            ] {
                f.insert(a.into(), Value::Unknown);
            }
            f.insert("joined".into(), Value::Bool(false));
        } else {
            if proposed.get("name") != prior.get("name") {
                replace.push(path("name"));
            }
            // A joined site's labels change in place; an invitation's are
            // in its token, so a new one is minted.
            let joined = prior.get("joined").as_bool() == Some(true);
            if proposed.get("labels") != prior.get("labels") && !joined {
                replace.push(path("labels"));
            }
        }
        (site_schema().object(f), replace)
    }

    pub(super) async fn apply_site(
        &self,
        prior: &Value,
        planned: &Value,
    ) -> Result<Value, pb::Diagnostic> {
        let name = planned
            .get("name")
            .as_str()
            .or(prior.get("name").as_str())
            .unwrap_or_default()
            .to_string();
        if planned.is_null() {
            let r = self
                .call(false, |mut f| {
                    let req = api::RemoveSiteRequest { site: name.clone() };
                    async move { f.remove_site(req).await }
                })
                .await;
            return match r {
                // Not joined yet (the token just expires), or already gone.
                Ok(_) => Ok(Value::Null),
                Err(s) if s.code() == tonic::Code::NotFound => Ok(Value::Null),
                Err(s) => Err(api_error(&format!("removing site {name}"), &s)),
            };
        }
        let mut f = fields(planned);
        if !prior.is_null() {
            // In place: the labels of a joined site (the plan replaces an
            // invitation whose labels change), and token_ttl_seconds, which
            // only a new invitation would use.
            if planned.get("labels") != prior.get("labels") {
                let labels = planned.get("labels").to_string_map().unwrap_or_default();
                self.call(false, |mut f| {
                    let req = api::SetSiteLabelsRequest {
                        site: name.clone(),
                        labels: labels.clone().into_iter().collect(),
                    };
                    async move { f.set_site_labels(req).await }
                })
                .await
                .map_err(|s| api_error(&format!("setting the labels of site {name}"), &s))?;
            }
            return Ok(site_schema().object(f));
        }
        let labels = planned.get("labels").to_string_map().unwrap_or_default();
        let ttl = planned
            .get("token_ttl_seconds")
            .as_f64()
            .unwrap_or(DEFAULT_TOKEN_TTL as f64) as u64;
        let req = api::CreateJoinTokenRequest {
            site: name.clone(),
            labels: labels.into_iter().collect(),
            ttl_seconds: ttl,
        };
        let r = self
            .call(false, |mut f| {
                let req = req.clone();
                async move { f.create_join_token(req).await }
            })
            .await
            .map_err(|s| {
                let mut d = api_error(&format!("inviting site {name}"), &s);
                if s.code() == tonic::Code::AlreadyExists {
                    d.detail = format!(
                        "Site {name} is already a member. To manage it with Terraform, import it: terraform import <address> {name}"
                    );
                }
                d
            })?;
        f.insert("id".into(), Value::string(&name));
        f.insert("join_token".into(), Value::string(r.token));
        f.insert(
            "join_token_expires_at".into(),
            Value::string(crate::time::rfc3339(r.expires_at_unix_ms)),
        );
        f.insert("joined".into(), Value::Bool(false));
        for a in ["trust_domain", "available", "tunnel_addrs"] {
            f.insert(a.into(), Value::Null);
        }
        Ok(site_schema().object(f))
    }

    pub(super) fn site_from_catalog(mut f: BTreeMap<String, Value>, s: &api::Site) -> Value {
        f.insert("id".into(), Value::string(&s.name));
        f.insert("name".into(), Value::string(&s.name));
        let labels: BTreeMap<&String, &String> = s.labels.iter().collect();
        f.insert(
            "labels".into(),
            if labels.is_empty() {
                Value::Null
            } else {
                Value::string_map(labels)
            },
        );
        f.insert("joined".into(), Value::Bool(true));
        f.insert("trust_domain".into(), Value::string(&s.trust_domain));
        f.insert("available".into(), Value::Bool(s.available));
        f.insert("tunnel_addrs".into(), Value::string_list(&s.tunnel_addrs));
        site_schema().object(f)
    }

    pub(super) async fn read_site(&self, state: &Value) -> Result<Value, pb::Diagnostic> {
        let name = state.get("name").as_str().unwrap_or_default();
        let cat = self.catalog().await?;
        if let Some(s) = cat.sites.iter().find(|s| s.name == name) {
            // The catalog's labels replace the state's (Null when none).
            return Ok(Self::site_from_catalog(fields(state), s));
        }
        if state.get("joined").as_bool() == Some(true) {
            // Removed outside Terraform.
            return Ok(Value::Null);
        }
        let expired = state
            .get("join_token_expires_at")
            .as_str()
            .and_then(crate::time::parse_rfc3339)
            .is_some_and(|at| at <= causeway_api::clock::unix_ms());
        if expired {
            // The invitation lapsed unused: plan a new one.
            return Ok(Value::Null);
        }
        Ok(state.clone())
    }

    pub(super) async fn read_sites(&self) -> Result<Value, pb::Diagnostic> {
        let cat = self.catalog().await?;
        // Each entry has exactly the attributes of `site_entry_ty`.
        let sites = cat
            .sites
            .iter()
            .map(|s| {
                let exports = cat
                    .exports
                    .iter()
                    .find(|e| e.site == s.name)
                    .map_or(0, |e| e.exports.len());
                let mut m = BTreeMap::new();
                m.insert("name".to_string(), Value::string(&s.name));
                m.insert("trust_domain".into(), Value::string(&s.trust_domain));
                m.insert("available".into(), Value::Bool(s.available));
                m.insert("tunnel_addrs".into(), Value::string_list(&s.tunnel_addrs));
                m.insert("labels".into(), Value::string_map(s.labels.iter()));
                m.insert("exports".into(), Value::Number(exports as f64));
                Value::Map(m)
            })
            .collect();
        let mut f = BTreeMap::new();
        f.insert("id".into(), Value::string(cat.revision.to_string()));
        f.insert("sites".into(), Value::List(sites));
        f.insert("revision".into(), Value::Number(cat.revision as f64));
        Ok(sites_schema().object(f))
    }

    pub(super) async fn import_site(&self, id: &str) -> Result<Value, pb::Diagnostic> {
        let cat = self.catalog().await?;
        let s = cat.sites.iter().find(|s| s.name == id).ok_or_else(|| {
            error(
                format!("site {id:?} is not a member"),
                "Only a site that has joined can be imported; to invite a new one, declare it and apply.",
            )
        })?;
        let mut f = BTreeMap::new();
        f.insert(
            "token_ttl_seconds".into(),
            Value::Number(DEFAULT_TOKEN_TTL as f64),
        );
        Ok(Self::site_from_catalog(f, s))
    }
}
