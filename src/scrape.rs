//! Reading a gateway's `/metrics` (Prometheus text) from `ctl` and the
//! web view.

use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The body of `GET /metrics` from an admin port (bounded in time).
pub async fn fetch(addr: &str) -> anyhow::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to the gateway admin port {addr}: timed out"))?
        .with_context(|| format!("connecting to the gateway admin port {addr}"))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: causeway\r\nconnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
        .await
        .map_err(|_| anyhow::anyhow!("reading {addr}/metrics: timed out"))??;
    Ok(text)
}

/// `--gateway SITE=HOST:PORT` flags as addresses by site.
pub fn gateway_flags(
    flags: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, std::net::SocketAddr>> {
    flags
        .iter()
        .map(|g| {
            let (site, addr) = g
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--gateway {g:?}: expected SITE=HOST:PORT"))?;
            let addr = addr
                .parse()
                .map_err(|e| anyhow::anyhow!("--gateway {g:?}: {e} (expected SITE=HOST:PORT)"))?;
            Ok((site.to_string(), addr))
        })
        .collect()
}

/// The value of label `key` on a sample line, e.g. `site` in
/// `causeway_peer_rtt_seconds{site="east"} 0.001`.
pub fn label<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("{key}=\""))? + key.len() + 2;
    let end = line[start..].find('"')? + start;
    Some(&line[start..end])
}

/// The sample value at the end of a line.
pub fn value(line: &str) -> Option<f64> {
    line.rsplit(' ').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_values_come_off_a_sample_line() {
        let l = "causeway_http_requests_total{service=\"shop/web\",code=\"200\"} 12";
        assert_eq!(label(l, "service"), Some("shop/web"));
        assert_eq!(label(l, "code"), Some("200"));
        assert_eq!(label(l, "site"), None);
        assert_eq!(value(l), Some(12.0));
        assert_eq!(value("# TYPE x counter"), None);
    }
}
