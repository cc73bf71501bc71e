//! The DNS fast path's query parser and answer writer, over any bytes a
//! client can send: never a panic, and whatever it answers parses as DNS.
#![no_main]
use std::sync::OnceLock;

use causeway_api::catalog::CatalogView;
use causeway_api::pb;
use causeway_dns::zone::{Zone, ZoneOptions};
use libfuzzer_sys::fuzz_target;

fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let exports = (1..20)
            .map(|i| pb::Export {
                service: format!("shop/svc{i}"),
                ports: vec![pb::ServicePort {
                    port: 80,
                    protocol: "tcp".into(),
                    name: "http".into(),
                }],
                healthy_endpoints: 1,
                vip_index: i,
                ..Default::default()
            })
            .collect();
        let view = CatalogView::from_snapshot(pb::CatalogSnapshot {
            revision: 1,
            sites: vec![pb::Site {
                name: "east".into(),
                available: true,
                ..Default::default()
            }],
            exports: vec![pb::SiteExports {
                site: "east".into(),
                exports,
            }],
            ..Default::default()
        });
        let opts = ZoneOptions {
            origin: "clusterset.local".into(),
            ttl: 5,
            negative_ttl: 5,
            vip_base: "127.10.0.0".parse().unwrap(),
            vip_prefix: 16,
        };
        Zone::build(&opts, &view).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    if let Some(len) = zone().wire.answer(data, &mut out, 1232) {
        assert!(len <= out.len());
        hickory_proto::op::Message::from_vec(&out[..len]).expect("a fast-path answer parses");
    }
});
