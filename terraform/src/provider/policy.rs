//! `causeway_policy`: one traffic policy document, validated at plan time
//! with the same checks as `causeway ctl policy apply`.

use std::collections::BTreeMap;

use causeway_api::pb as api;

use super::*;
use crate::schema::{Attr, Block, Mode, Ty};
use crate::value::Value;

/// The `causeway_policy` resource's schema.
pub fn policy_schema() -> Block {
    Block {
        description: "One traffic policy (FailoverPolicy, TrafficSplit, RetryPolicy, CircuitBreaker, AuthorizationPolicy, HTTPRoute, RateLimit, RequestAuthentication, ...), as `causeway ctl policy apply` takes it.",
        attrs: vec![
            Attr::new(
                "id",
                Ty::String,
                Mode::Computed,
                "`KIND/NAMESPACE/NAME`, also the import ID.",
            ),
            Attr::new(
                "document",
                Ty::String,
                Mode::Required,
                "The policy document, YAML or JSON (`apiVersion`, `kind`, `metadata`, `spec`); e.g. `yamlencode({...})` or `file(\"policy.yaml\")`. Changing its kind, namespace or name replaces the policy.",
            ),
            Attr::new("kind", Ty::String, Mode::Computed, "The policy's kind."),
            Attr::new(
                "namespace",
                Ty::String,
                Mode::Computed,
                "The policy's namespace.",
            ),
            Attr::new("name", Ty::String, Mode::Computed, "The policy's name."),
            Attr::new(
                "revision",
                Ty::Number,
                Mode::Computed,
                "The catalog revision that last changed the policy.",
            ),
        ],
    }
}

/// A policy document's identity and canonical JSON, or what is wrong with it.
pub(super) struct PolicyDoc {
    pub(super) kind: String,
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) json: serde_json::Value,
}

pub(super) fn parse_policy_id(id: &str) -> Option<(&str, &str, &str)> {
    let mut parts = id.splitn(3, '/');
    let (k, ns, n) = (parts.next()?, parts.next()?, parts.next()?);
    (!k.is_empty() && !ns.is_empty() && !n.is_empty() && !n.contains('/')).then_some((k, ns, n))
}

impl PolicyDoc {
    pub(super) fn parse(text: &str) -> Result<Self, Vec<String>> {
        let docs = causeway_api::policy::read_documents(text)?;
        if docs.len() != 1 {
            return Err(vec![format!(
                "holds {} documents; a causeway_policy manages exactly one (use one resource per document, e.g. with for_each)",
                docs.len()
            )]);
        }
        let json: serde_json::Value =
            serde_json::from_str(&docs[0]).map_err(|e| vec![e.to_string()])?;
        let s = |p: &str| {
            json.pointer(p)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        Ok(Self {
            kind: s("/kind"),
            namespace: s("/metadata/namespace"),
            name: s("/metadata/name"),
            json,
        })
    }

    pub(super) fn id(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

impl Provider {
    pub(super) async fn find_policy(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<api::Policy>, pb::Diagnostic> {
        // Linearizable: the policy just applied (through any node) is seen.
        let r = self
            .call(true, |mut f| {
                let req = api::ListPoliciesRequest {
                    kind: kind.into(),
                    linearizable: true,
                };
                async move { f.list_policies(req).await }
            })
            .await
            .map_err(|s| api_error("listing policies", &s))?;
        Ok(r.policies
            .into_iter()
            .find(|p| p.kind == kind && p.namespace == namespace && p.name == name))
    }

    pub(super) fn validate_policy(config: &Value) -> Vec<pb::Diagnostic> {
        match config.get("document").as_str() {
            Some(text) => match PolicyDoc::parse(text) {
                Ok(_) => Vec::new(),
                Err(errs) => vec![attr_error(
                    "document",
                    "the policy document is invalid",
                    errs.join("\n"),
                )],
            },
            None => Vec::new(),
        }
    }

    pub(super) fn plan_policy(prior: &Value, proposed: &Value) -> (Value, Vec<pb::AttributePath>) {
        let mut f = fields(proposed);
        let mut replace = Vec::new();
        let doc = proposed.get("document").as_str().map(PolicyDoc::parse);
        match doc {
            Some(Ok(doc)) => {
                f.insert("id".into(), Value::string(doc.id()));
                f.insert("kind".into(), Value::string(&doc.kind));
                f.insert("namespace".into(), Value::string(&doc.namespace));
                f.insert("name".into(), Value::string(&doc.name));
                let before = prior.get("document").as_str().map(PolicyDoc::parse);
                let revision = match before {
                    Some(Ok(b)) if b.json == doc.json => prior.get("revision").clone(),
                    Some(Ok(b)) => {
                        if b.id() != doc.id() {
                            replace.push(path("document"));
                        }
                        Value::Unknown
                    }
                    _ => Value::Unknown,
                };
                f.insert("revision".into(), revision);
            }
            // Not known yet (or invalid: validation has said so).
            _ => {
                for a in ["id", "kind", "namespace", "name", "revision"] {
                    f.insert(a.into(), Value::Unknown);
                }
            }
        }
        (policy_schema().object(f), replace)
    }

    pub(super) async fn apply_policy(
        &self,
        prior: &Value,
        planned: &Value,
    ) -> Result<Value, pb::Diagnostic> {
        if planned.is_null() {
            let (k, ns, n) = (
                prior.get("kind").as_str().unwrap_or_default(),
                prior.get("namespace").as_str().unwrap_or_default(),
                prior.get("name").as_str().unwrap_or_default(),
            );
            let r = self
                .call(false, |mut f| {
                    let req = api::DeletePolicyRequest {
                        kind: k.into(),
                        namespace: ns.into(),
                        name: n.into(),
                    };
                    async move { f.delete_policy(req).await }
                })
                .await;
            return match r {
                Ok(_) => Ok(Value::Null),
                Err(s) if s.code() == tonic::Code::NotFound => Ok(Value::Null),
                Err(s) => Err(api_error(&format!("deleting policy {k}/{ns}/{n}"), &s)),
            };
        }
        let text = planned.get("document").as_str().unwrap_or_default();
        let doc = PolicyDoc::parse(text).map_err(|errs| {
            attr_error(
                "document",
                "the policy document is invalid",
                errs.join("\n"),
            )
        })?;
        self.call(false, |mut f| {
            let req = api::ApplyPoliciesRequest {
                documents_json: vec![doc.json.to_string()],
                ..Default::default()
            };
            async move { f.apply_policies(req).await }
        })
        .await
        .map_err(|s| api_error(&format!("applying policy {}", doc.id()), &s))?;
        let stored = self
            .find_policy(&doc.kind, &doc.namespace, &doc.name)
            .await?
            .ok_or_else(|| {
                error(
                    format!("policy {} was applied but is not listed", doc.id()),
                    "Another client deleted it at once; run terraform apply again.",
                )
            })?;
        let mut f = fields(planned);
        f.insert("id".into(), Value::string(doc.id()));
        f.insert("kind".into(), Value::string(&doc.kind));
        f.insert("namespace".into(), Value::string(&doc.namespace));
        f.insert("name".into(), Value::string(&doc.name));
        f.insert("revision".into(), Value::Number(stored.revision as f64));
        Ok(policy_schema().object(f))
    }

    pub(super) async fn read_policy(&self, state: &Value) -> Result<Value, pb::Diagnostic> {
        let (k, ns, n) = (
            state.get("kind").as_str().unwrap_or_default(),
            state.get("namespace").as_str().unwrap_or_default(),
            state.get("name").as_str().unwrap_or_default(),
        );
        let Some(stored) = self.find_policy(k, ns, n).await? else {
            return Ok(Value::Null);
        };
        let mut f = fields(state);
        let stored_json: serde_json::Value =
            serde_json::from_str(&stored.document_json).unwrap_or_default();
        let same = state
            .get("document")
            .as_str()
            .and_then(|t| PolicyDoc::parse(t).ok())
            .is_some_and(|d| d.json == stored_json);
        if !same {
            // Changed outside Terraform: show what is there now.
            f.insert(
                "document".into(),
                Value::string(serde_json::to_string_pretty(&stored_json).unwrap_or_default()),
            );
        }
        f.insert("revision".into(), Value::Number(stored.revision as f64));
        Ok(policy_schema().object(f))
    }

    pub(super) async fn import_policy(&self, id: &str) -> Result<Value, pb::Diagnostic> {
        let (k, ns, n) = parse_policy_id(id).ok_or_else(|| {
            error(
                format!("{id:?} is not a policy ID"),
                "Import a policy as KIND/NAMESPACE/NAME, e.g. FailoverPolicy/shop/payments.",
            )
        })?;
        let stored = self.find_policy(k, ns, n).await?.ok_or_else(|| {
            error(
                format!("policy {id} does not exist"),
                "List the stored policies with `causeway ctl policy list`.",
            )
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&stored.document_json).unwrap_or_default();
        let mut f = BTreeMap::new();
        f.insert("id".into(), Value::string(id));
        f.insert("kind".into(), Value::string(k));
        f.insert("namespace".into(), Value::string(ns));
        f.insert("name".into(), Value::string(n));
        f.insert(
            "document".into(),
            Value::string(serde_json::to_string_pretty(&json).unwrap_or_default()),
        );
        f.insert("revision".into(), Value::Number(stored.revision as f64));
        Ok(policy_schema().object(f))
    }
}
