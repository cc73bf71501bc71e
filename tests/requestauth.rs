//! Request authentication and authorization end to end: the exporting
//! gateway checks each request's JSON Web Token (RS256, ES256, EdDSA; from
//! a JWKS file or URL, with key rotation) and the AuthorizationPolicy's
//! request rules (path, method, header, claims), answering 401 and 403
//! with a reason — for HTTP/1.1 and HTTP/2 callers.

mod common;

use std::sync::{Arc, Mutex};

use common::jwt::{jwks, now, unsigned, Key};
use common::l7::*;
use common::*;
use serde_json::json;

const ISSUER: &str = "https://id.causeway.test";

fn claims(sub: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = json!({"iss": ISSUER, "aud": "web", "sub": sub, "exp": now() + 600, "iat": now()});
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    c
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// An HTTP server answering `GET /jwks.json` with whatever `doc` holds.
async fn jwks_server(doc: Arc<Mutex<String>>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let doc = doc.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = doc.lock().unwrap().clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_request_rules_are_checked_where_the_service_runs() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (web, seen) = backend("web", Mode::Answer).await;
    for site in ["east", "central"] {
        fed.add_site(site, &vip_range(), &[]).await.unwrap();
    }
    add_exports_and_restart(&mut fed, "east", &versioned_export(&[(web, "v1")])).await;
    let target = imported(&fed, "central", "web.shop.svc.clusterset.local", 8080).await;

    let (ec, ed, rsa) = (Key::es256("ec1"), Key::ed25519("ed1"), Key::rs256("rsa1"));
    let keyfile = tmp.path().join("jwks.json");
    std::fs::write(&keyfile, jwks(&[&ec, &ed, &rsa])).unwrap();
    apply_policies(
        &fed,
        tmp.path(),
        &format!(
            r#"apiVersion: causeway.dev/v1alpha1
kind: RequestAuthentication
metadata: {{name: web, namespace: shop}}
spec:
  service: web
  jwtRules: [{{issuer: "{ISSUER}", audiences: [web], jwksFile: "{}", clockSkewSeconds: 5}}]
---
apiVersion: causeway.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: web, namespace: shop}}
spec:
  service: web
  allow:
  - {{methods: [GET], paths: ["/public/*"]}}
  - {{paths: ["/admin/*"], claims: {{role: [admin]}}}}
  - {{sites: [central], paths: ["/api/*"], claims: {{sub: [alice, bob]}}}}
  - {{paths: ["/beta"], headers: {{x-beta: ["1"]}}}}
"#,
            keyfile.display()
        ),
    )
    .await;

    let alice = ec.sign(&claims("alice", json!({})));
    for h2 in [false, true] {
        tracing::info!(h2, "phase: tokens and rules");
        let mut c = Client::connect(target, h2).await;
        eventually(
            Duration::from_secs(30),
            "the policies to apply at east",
            async || {
                let a = c.get("/api/cart", &[]).await;
                equals(
                    (a.status, a.header("x-causeway-error").to_string()),
                    &(403, "forbidden".to_string()),
                )
            },
        )
        .await;
        let ok = |a: &Answer| (a.status, a.body.clone());
        // Anyone may GET /public/*, without a token.
        assert_eq!(
            ok(&c.get("/public/logo", &[]).await),
            (200, "web /public/logo".into())
        );
        // Good tokens of each algorithm.
        for key in [&ec, &ed, &rsa] {
            let t = key.sign(&claims("bob", json!({})));
            let a = c.get("/api/cart", &[("authorization", &bearer(&t))]).await;
            assert_eq!(
                ok(&a),
                (200, "web /api/cart".into()),
                "{}",
                a.header("x-causeway-reason")
            );
        }
        // Bad tokens: 401, with why.
        let (other, _) = (Key::es256("ec1"), ());
        for (what, token, why) in [
            (
                "expired",
                ec.sign(&claims("alice", json!({"exp": now() - 60}))),
                "expired",
            ),
            (
                "wrong audience",
                ec.sign(&claims("alice", json!({"aud": "billing"}))),
                "audience",
            ),
            (
                "wrong key",
                other.sign(&claims("alice", json!({}))),
                "bad signature",
            ),
            (
                "alg none",
                unsigned(&claims("alice", json!({}))),
                "algorithm \"none\"",
            ),
            (
                "wrong issuer",
                ec.sign(&claims("alice", json!({"iss": "https://evil"}))),
                "not trusted",
            ),
            ("garbage", "not.a.token".to_string(), "malformed"),
        ] {
            let a = c
                .get("/api/cart", &[("authorization", &bearer(&token))])
                .await;
            assert_eq!(a.status, 401, "{what}: {}", a.body);
            assert_eq!(a.header("x-causeway-error"), "unauthenticated", "{what}");
            assert!(
                a.header("x-causeway-reason").contains(why),
                "{what}: {}",
                a.header("x-causeway-reason")
            );
            assert!(a.header("www-authenticate").starts_with("Bearer"), "{what}");
        }
        // A valid token whose claims no rule accepts, no token at all, the
        // wrong method, a missing header: 403 naming the request.
        let carol = ed.sign(&claims("carol", json!({})));
        for (path, headers, method_note) in [
            (
                "/api/cart",
                vec![("authorization", bearer(&carol))],
                "carol",
            ),
            ("/api/cart", vec![], "no token"),
            (
                "/admin/users",
                vec![("authorization", bearer(&alice))],
                "no role",
            ),
            ("/beta", vec![], "no header"),
        ] {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let a = c.get(path, &h).await;
            assert_eq!(a.status, 403, "{path} ({method_note}): {}", a.body);
            assert!(
                a.header("x-causeway-reason")
                    .contains(&format!("GET {path}")),
                "{}",
                a.header("x-causeway-reason")
            );
        }
        let admin = rsa.sign(&claims("dana", json!({"role": ["dev", "admin"]})));
        let a = c
            .get("/admin/users", &[("authorization", &bearer(&admin))])
            .await;
        assert_eq!(ok(&a), (200, "web /admin/users".into()));
        let a = c.get("/beta", &[("x-beta", "1")]).await;
        assert_eq!(a.status, 200);
    }
    let before = seen.load(std::sync::atomic::Ordering::Relaxed);

    tracing::info!("phase: the key set rotates (file)");
    let ec2 = Key::es256("ec2");
    std::fs::write(&keyfile, jwks(&[&ec2, &ed, &rsa])).unwrap();
    let mut c = Client::connect(target, false).await;
    let new = ec2.sign(&claims("alice", json!({})));
    eventually(
        Duration::from_secs(20),
        "a token of the new key to pass",
        async || {
            let a = c
                .get("/api/cart", &[("authorization", &bearer(&new))])
                .await;
            equals(a.status, &200)
        },
    )
    .await;
    let a = c
        .get("/api/cart", &[("authorization", &bearer(&alice))])
        .await;
    assert_eq!(a.status, 401, "the retired key's tokens are refused");
    assert!(seen.load(std::sync::atomic::Ordering::Relaxed) > before);

    let m = http_get(fed.sites["east"].gateway_admin, "/metrics").await;
    for (name, at_least) in [
        (
            r#"causeway_authn_total{service="shop/web",result="ok"}"#,
            8.0,
        ),
        (
            r#"causeway_authn_total{service="shop/web",result="expired"}"#,
            2.0,
        ),
        (
            r#"causeway_authn_total{service="shop/web",result="algorithm"}"#,
            2.0,
        ),
        (r#"causeway_authz_denied_total{service="shop/web"}"#, 8.0),
    ] {
        assert!(metric(&m, name) >= at_least, "{name}: {}", metric(&m, name));
    }
    fed.shutdown().await;
}

/// A key set served over HTTP on the site: a token naming a key the
/// gateway has not seen makes it fetch the set again (rotation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_is_fetched_again_when_a_token_names_a_new_key() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut fed = federation(&tmp).await;
    let (web, _) = backend("web", Mode::Answer).await;
    for site in ["east", "central"] {
        fed.add_site(site, &vip_range(), &[]).await.unwrap();
    }
    add_exports_and_restart(&mut fed, "east", &versioned_export(&[(web, "v1")])).await;
    let target = imported(&fed, "central", "web.shop.svc.clusterset.local", 8080).await;
    let old = Key::ed25519("k1");
    let doc = Arc::new(Mutex::new(jwks(&[&old])));
    let server = jwks_server(doc.clone()).await;
    apply_policies(
        &fed,
        tmp.path(),
        &format!(
            "apiVersion: causeway.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: web, namespace: shop}}\nspec:\n  service: web\n  requireToken: true\n  jwtRules: [{{issuer: \"{ISSUER}\", jwksUri: \"http://{server}/jwks.json\", jwksRefreshSeconds: 3600}}]\n"
        ),
    )
    .await;
    let mut c = Client::connect(target, true).await;
    eventually(
        Duration::from_secs(30),
        "a request without a token to be refused",
        async || {
            let a = c.get("/x", &[]).await;
            equals(
                (a.status, a.header("x-causeway-error").to_string()),
                &(401, "unauthenticated".to_string()),
            )
        },
    )
    .await;
    let t_old = old.sign(&claims("alice", json!({})));
    let a = c.get("/x", &[("authorization", &bearer(&t_old))]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // Rotate: the server now has only the new key. The refresh is an hour
    // away, but a token naming an unknown key makes the gateway look again.
    let new = Key::ed25519("k2");
    *doc.lock().unwrap() = jwks(&[&new]);
    let t_new = new.sign(&claims("alice", json!({})));
    eventually(
        Duration::from_secs(30),
        "a token of the rotated key to pass",
        async || {
            let a = c.get("/x", &[("authorization", &bearer(&t_new))]).await;
            equals(a.status, &200)
        },
    )
    .await;
    let a = c.get("/x", &[("authorization", &bearer(&t_old))]).await;
    assert_eq!(a.status, 401, "the old key is gone");
    fed.shutdown().await;
}
