//! Key sets for request authentication: a JWKS from a file on this host
//! (re-read when its modification time or size changes, looked at no more
//! than once a second) or from an `http://` URL on the site (fetched every
//! refresh interval, and again — at most every 10 s — when a token names a
//! key the set lacks, which is how a rotation reaches the gateway early).
//! A source that cannot be read keeps its last good keys and logs why.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use causeway_api::policy::JwtRule;
use causeway_api::sync::LockExt;
use causeway_gateway_core::jwt::{parse_jwks, Jwk, MAX_JWKS};
use http_body_util::{BodyExt, Empty, Limited};

const FILE_CHECK: Duration = Duration::from_secs(1);
const REFETCH_ON_MISS: Duration = Duration::from_secs(10);
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Entry {
    keys: Arc<Vec<Jwk>>,
    /// File: (mtime, size) last read; URL: unused.
    stamp: Option<(SystemTime, u64)>,
    checked: Option<Instant>,
    fetched: Option<Instant>,
}

/// The key sets of every issuer this gateway checks tokens for.
#[derive(Default)]
pub struct KeySets {
    entries: Mutex<HashMap<String, Entry>>,
}

impl KeySets {
    /// The keys of `rule`'s set, refreshed if due (`missed`: a token named a
    /// key the set did not have).
    pub async fn keys(&self, rule: &JwtRule, missed: bool) -> Arc<Vec<Jwk>> {
        match (&rule.jwks_file, &rule.jwks_uri) {
            (Some(path), _) => self.file_keys(path),
            (None, Some(url)) => {
                self.url_keys(
                    url,
                    Duration::from_secs(u64::from(rule.jwks_refresh_seconds)),
                    missed,
                )
                .await
            }
            (None, None) => Arc::default(),
        }
    }

    fn file_keys(&self, path: &str) -> Arc<Vec<Jwk>> {
        let mut all = self.entries.locked();
        let e = all.entry(format!("file:{path}")).or_default();
        let due = e.checked.is_none_or(|t| t.elapsed() >= FILE_CHECK);
        if !due {
            return e.keys.clone();
        }
        e.checked = Some(Instant::now());
        let stamp = std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if stamp.is_some() && stamp == e.stamp {
            return e.keys.clone();
        }
        match read_file(path) {
            Ok(keys) => {
                tracing::info!(path, keys = keys.len(), "read a JWKS file");
                metrics::counter!("causeway_jwks_loads_total", "source" => "file", "result" => "ok")
                    .increment(1);
                e.keys = Arc::new(keys);
                e.stamp = stamp;
            }
            Err(why) => {
                metrics::counter!("causeway_jwks_loads_total", "source" => "file", "result" => "error")
                    .increment(1);
                tracing::warn!(path, error = %why, "cannot read the JWKS file; keeping the keys read before");
            }
        }
        e.keys.clone()
    }

    async fn url_keys(&self, url: &str, every: Duration, missed: bool) -> Arc<Vec<Jwk>> {
        let key = format!("url:{url}");
        {
            let all = self.entries.locked();
            if let Some(e) = all.get(&key) {
                let fresh = e.fetched.is_some_and(|t| t.elapsed() < every);
                let miss_due = missed && e.checked.is_none_or(|t| t.elapsed() >= REFETCH_ON_MISS);
                if fresh && !miss_due {
                    return e.keys.clone();
                }
            }
        }
        // Concurrent requests may fetch together; the answers are the same.
        let result = tokio::time::timeout(FETCH_TIMEOUT, fetch(url))
            .await
            .unwrap_or_else(|_| Err("no answer within 2 s".into()));
        let mut all = self.entries.locked();
        let e = all.entry(key).or_default();
        e.checked = Some(Instant::now());
        match result {
            Ok(keys) => {
                metrics::counter!("causeway_jwks_loads_total", "source" => "url", "result" => "ok")
                    .increment(1);
                e.keys = Arc::new(keys);
                e.fetched = Some(Instant::now());
            }
            Err(why) => {
                metrics::counter!("causeway_jwks_loads_total", "source" => "url", "result" => "error")
                    .increment(1);
                tracing::warn!(url, error = %why, "cannot fetch the JWKS; keeping the keys fetched before");
            }
        }
        e.keys.clone()
    }
}

fn read_file(path: &str) -> Result<Vec<Jwk>, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_JWKS as u64 {
        return Err(format!("larger than {MAX_JWKS} bytes"));
    }
    let text = std::fs::read(path).map_err(|e| e.to_string())?;
    parse_jwks(&text)
}

/// `GET url` over HTTP/1.1 (no TLS): the key set in a 2xx answer.
async fn fetch(url: &str) -> Result<Vec<Jwk>, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            hyper::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_JWKS)
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    parse_jwks(&body)
}
