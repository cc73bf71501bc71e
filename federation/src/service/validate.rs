//! Request fields checked before anything is proposed: every error names
//! the field and says what would be accepted.

use std::collections::BTreeMap;

use causeway_api::model::{check_dns_label, Protocol, ServiceKey};
use causeway_api::pb;
use tonic::Status;

use crate::state::{EndpointRecord, ExportRecord, PolicyRecord, PortRecord};

pub(super) fn invalid(field: &str, detail: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {detail}"))
}

pub(super) fn parse_labels(
    labels: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, Status> {
    if labels.len() > crate::state::MAX_LABELS {
        return Err(invalid(
            "labels",
            format!("at most {} labels", crate::state::MAX_LABELS),
        ));
    }
    let mut out = BTreeMap::new();
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'/'));
        if !key_ok {
            return Err(invalid(
                "labels",
                format!("key {k:?} must be 1-63 characters of letters, digits, '-', '_', '.', '/'"),
            ));
        }
        causeway_api::model::check_label_value("label value", v)
            .map_err(|e| invalid(&format!("labels[{k}]"), e))?;
        out.insert(k.clone(), v.clone());
    }
    Ok(out)
}

pub(super) fn parse_tunnel_addrs(addrs: &[String]) -> Result<Vec<String>, Status> {
    if addrs.len() > crate::state::MAX_TUNNEL_ADDRS {
        return Err(invalid(
            "tunnel_addrs",
            format!("at most {}", crate::state::MAX_TUNNEL_ADDRS),
        ));
    }
    let mut out = Vec::with_capacity(addrs.len());
    for a in addrs {
        let t: causeway_api::model::TunnelAddr =
            a.parse().map_err(|e| invalid("tunnel_addrs", e))?;
        // Stored in canonical form, so equal sets compare equal.
        out.push(t.to_string());
    }
    Ok(out)
}

pub(super) fn parse_bundle(pem: &str) -> Result<(), Status> {
    causeway_api::identity::check_trust_bundle("trust_bundle_pem", pem)
        .map(drop)
        .map_err(Status::invalid_argument)
}

/// Checks a site's published exports; the error names the field.
pub fn parse_exports(exports: &[pb::Export]) -> Result<Vec<ExportRecord>, Status> {
    let mut out = Vec::with_capacity(exports.len());
    for (i, e) in exports.iter().enumerate() {
        let service: ServiceKey = e
            .service
            .parse()
            .map_err(|err| invalid(&format!("exports[{i}].service"), err))?;
        let mut ports = Vec::with_capacity(e.ports.len());
        for (j, p) in e.ports.iter().enumerate() {
            let field = format!("exports[{i}].ports[{j}]");
            let port = u16::try_from(p.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(&field, format!("port {} is not in 1-65535", p.port)))?;
            let protocol: Protocol = p.protocol.parse().map_err(|err| invalid(&field, err))?;
            if !p.name.is_empty() {
                check_dns_label("port name", &p.name).map_err(|err| invalid(&field, err))?;
            }
            ports.push(PortRecord {
                port,
                protocol,
                name: p.name.clone(),
            });
        }
        let field = format!("exports[{i}].endpoints");
        if !e.headless && !e.endpoints.is_empty() {
            return Err(invalid(
                &field,
                "only headless exports publish endpoint addresses; set headless or send none",
            ));
        }
        if e.endpoints.len() > crate::state::MAX_ENDPOINTS_PER_EXPORT {
            return Err(invalid(
                &field,
                format!(
                    "{} endpoints; a headless export may publish at most {}",
                    e.endpoints.len(),
                    crate::state::MAX_ENDPOINTS_PER_EXPORT
                ),
            ));
        }
        let mut endpoints: Vec<EndpointRecord> = Vec::with_capacity(e.endpoints.len());
        for (j, ep) in e.endpoints.iter().enumerate() {
            let field = format!("exports[{i}].endpoints[{j}]");
            let address: std::net::IpAddr = ep.address.parse().map_err(|_| {
                invalid(
                    &format!("{field}.address"),
                    format!("{:?} is not an IPv4 or IPv6 address", ep.address),
                )
            })?;
            if !ep.hostname.is_empty() {
                check_dns_label("hostname", &ep.hostname)
                    .map_err(|err| invalid(&format!("{field}.hostname"), err))?;
            }
            let record = EndpointRecord {
                address,
                hostname: ep.hostname.clone(),
            };
            if endpoints.contains(&record) {
                return Err(invalid(&field, "listed twice"));
            }
            endpoints.push(record);
        }
        let zones = parse_groups(
            &format!("exports[{i}].zones"),
            ("zone", "zone"),
            e.zones
                .iter()
                .map(|z| (z.zone.as_str(), z.healthy, z.total)),
        )?;
        check_zone_sums(i, e, &zones)?;
        let subsets = parse_groups(
            &format!("exports[{i}].subsets"),
            ("subset", "name"),
            e.subsets
                .iter()
                .map(|z| (z.name.as_str(), z.healthy, z.total)),
        )?;
        if let Some((j, s)) = subsets.iter().enumerate().find(|(_, s)| {
            s.zone.is_empty() || s.total > e.total_endpoints.max(e.healthy_endpoints)
        }) {
            return Err(invalid(
                &format!("exports[{i}].subsets[{j}]"),
                format!(
                    "subset {:?} of {} endpoints: a subset is named and holds at most the export's {}",
                    s.zone, s.total, e.total_endpoints
                ),
            ));
        }
        out.push(ExportRecord {
            service,
            ports,
            healthy_endpoints: e.healthy_endpoints,
            vip_index: 0,
            headless: e.headless,
            endpoints,
            total_endpoints: e.total_endpoints.max(e.healthy_endpoints),
            zones,
            subsets,
            exported_at_ms: e.exported_at_unix_ms,
            client_ip_affinity: e.client_ip_affinity,
        });
    }
    Ok(out)
}

/// Per-group health (zones or subsets) under `field`, each group's name in
/// its field `key`: valid label values,
/// each once, healthy within total.
fn parse_groups<'a>(
    field: &str,
    (what, key): (&str, &str),
    groups: impl ExactSizeIterator<Item = (&'a str, u32, u32)>,
) -> Result<Vec<crate::state::ZoneRecord>, Status> {
    if groups.len() > crate::state::MAX_ZONES_PER_EXPORT {
        return Err(invalid(
            field,
            format!(
                "{} {what}s; an export may report at most {}",
                groups.len(),
                crate::state::MAX_ZONES_PER_EXPORT
            ),
        ));
    }
    let mut out: Vec<crate::state::ZoneRecord> = Vec::with_capacity(groups.len());
    for (j, (name, healthy, total)) in groups.enumerate() {
        let f = format!("{field}[{j}]");
        causeway_api::model::check_label_value("name", name)
            .map_err(|err| invalid(&format!("{f}.{key}"), err))?;
        if out.iter().any(|o| o.zone == name) {
            return Err(invalid(&f, format!("{what} {name:?} listed twice")));
        }
        if healthy > total {
            return Err(invalid(
                &f,
                format!("{healthy} healthy of {total} endpoints"),
            ));
        }
        out.push(crate::state::ZoneRecord {
            zone: name.to_string(),
            healthy,
            total,
        });
    }
    Ok(out)
}

/// Zones of export `i`, when reported, add up to the export's own counts.
fn check_zone_sums(
    i: usize,
    e: &pb::Export,
    zones: &[crate::state::ZoneRecord],
) -> Result<(), Status> {
    let healthy: u64 = zones.iter().map(|z| u64::from(z.healthy)).sum();
    let total: u64 = zones.iter().map(|z| u64::from(z.total)).sum();
    if !zones.is_empty()
        && (healthy != u64::from(e.healthy_endpoints)
            || total != u64::from(e.total_endpoints.max(e.healthy_endpoints)))
    {
        return Err(invalid(
            &format!("exports[{i}].zones"),
            format!(
                "zones add up to {healthy} healthy of {total}, but the export says {} of {}",
                e.healthy_endpoints, e.total_endpoints
            ),
        ));
    }
    Ok(())
}

/// Validates every document; the error lists every invalid field of every
/// document, each prefixed with the document's position and name.
pub fn parse_policy_documents(docs: &[String]) -> Result<Vec<PolicyRecord>, Status> {
    use causeway_api::policy::{parse_document, MAX_DOCUMENTS, MAX_SPEC_BYTES};
    if docs.is_empty() {
        return Err(invalid(
            "documents_json",
            "send at least one policy document",
        ));
    }
    if docs.len() > MAX_DOCUMENTS {
        return Err(invalid(
            "documents_json",
            format!("at most {MAX_DOCUMENTS} documents per apply"),
        ));
    }
    let mut errors = Vec::new();
    let mut out: Vec<PolicyRecord> = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        if d.len() > 4 * MAX_SPEC_BYTES {
            errors.push(format!(
                "documents[{i}]: larger than {} bytes",
                4 * MAX_SPEC_BYTES
            ));
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(d) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("documents[{i}]: not JSON: {e}"));
                continue;
            }
        };
        match parse_document(&value) {
            Ok(p) => {
                let rec = PolicyRecord {
                    kind: p.kind().as_str().to_string(),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    document_json: p.to_json(),
                    revision: 0,
                    owner: None,
                };
                if out.iter().any(|o| o.key() == rec.key()) {
                    errors.push(format!(
                        "documents[{i}] ({} {}/{}): listed twice in one apply",
                        rec.kind, rec.namespace, rec.name
                    ));
                }
                out.push(rec);
            }
            Err(errs) => {
                let who = causeway_api::policy::document_label(&value);
                errors.extend(
                    errs.into_iter()
                        .map(|e| format!("documents[{i}]{who}: {e}")),
                );
            }
        }
    }
    if !errors.is_empty() {
        return Err(Status::invalid_argument(errors.join("\n")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(healthy: u32, total: u32, zones: &[(&str, u32, u32)]) -> pb::Export {
        pb::Export {
            service: "shop/web".into(),
            ports: vec![pb::ServicePort {
                port: 80,
                protocol: "http2".into(),
                name: String::new(),
            }],
            healthy_endpoints: healthy,
            total_endpoints: total,
            zones: zones
                .iter()
                .map(|(z, h, t)| pb::ZoneHealth {
                    zone: z.to_string(),
                    healthy: *h,
                    total: *t,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn zone_health_is_checked_and_kept() {
        let ok = parse_exports(&[export(3, 4, &[("", 1, 1), ("us-east-1a", 2, 3)])]).unwrap();
        assert_eq!(ok[0].zones.len(), 2);
        assert_eq!(ok[0].zones[1].zone, "us-east-1a");
        assert_eq!(ok[0].ports[0].protocol, Protocol::Http2);
        assert!(parse_exports(&[export(1, 1, &[])]).unwrap()[0]
            .zones
            .is_empty());

        let err = |e: pb::Export| parse_exports(&[e]).unwrap_err().message().to_string();
        let m = err(export(3, 4, &[("a", 1, 1), ("b", 1, 3)]));
        assert!(
            m.contains("exports[0].zones") && m.contains("add up to 2 healthy of 4"),
            "{m}"
        );
        let m = err(export(1, 1, &[("a", 1, 1), ("a", 0, 0)]));
        assert!(
            m.contains("exports[0].zones[1]") && m.contains("twice"),
            "{m}"
        );
        let m = err(export(2, 1, &[("a", 2, 1)]));
        assert!(
            m.contains("exports[0].zones[0]") && m.contains("2 healthy of 1"),
            "{m}"
        );
        let m = err(export(1, 1, &[("-bad", 1, 1)]));
        assert!(
            m.contains("exports[0].zones[0].zone") && m.contains("label value"),
            "{m}"
        );
        let many: Vec<(String, u32, u32)> = (0..=crate::state::MAX_ZONES_PER_EXPORT)
            .map(|i| (format!("z{i}"), 0, 0))
            .collect();
        let many: Vec<(&str, u32, u32)> =
            many.iter().map(|(z, h, t)| (z.as_str(), *h, *t)).collect();
        let m = err(export(0, 0, &many));
        assert!(m.contains("at most 64"), "{m}");
    }
}
