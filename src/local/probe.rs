//! Probes a user (or a test) runs against a local federation: DNS
//! queries, admin-port reads, banner calls through a tunnel.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::process::Proc;
use super::wait::until;

/// Waits until a just-started DNS server has bound its sockets and holds
/// the first catalog snapshot (its /ready says so); why not, with its log.
pub(super) async fn wait_dns_ready(dns: &mut Proc, admin: SocketAddr) -> Result<(), String> {
    let ready = until(
        Duration::from_secs(20),
        "the DNS server to be ready",
        async || match dns.exited() {
            Some(status) => Some(Err(status)),
            None => match admin_get(admin, "/ready").await {
                Ok(r) if r.starts_with("HTTP/1.1 200") => Some(Ok(())),
                _ => None,
            },
        },
    )
    .await;
    match ready {
        Ok(Ok(())) => Ok(()),
        Ok(Err(status)) => Err(format!("exited ({status}) at start:\n{}", dns.log_tail(20))),
        Err(e) => Err(format!("{e}:\n{}", dns.log_tail(20))),
    }
}

/// The raw response to `GET path` on an admin port.
async fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("no answer within 2 s"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// One A query over UDP; the addresses answered, or the response code.
pub async fn dns_a(server: SocketAddr, name: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut msg = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    msg.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    // From loopback to a loopback server; else from any address (a
    // server on another host, e.g. a network namespace).
    let local: SocketAddr = if server.ip().is_loopback() {
        ([127, 0, 0, 1], 0).into()
    } else {
        ([0, 0, 0, 0], 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(local).await?;
    sock.send_to(&msg.to_vec()?, server).await?;
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf))
        .await
        .context("no DNS answer within 1 s")??;
    let resp = Message::from_vec(&buf[..n]).map_err(|e| anyhow::anyhow!("bad DNS answer: {e}"))?;
    if resp.metadata.response_code != ResponseCode::NoError {
        bail!("DNS answered {:?}", resp.metadata.response_code);
    }
    Ok(resp
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect())
}

/// Connects to `addr`, reads the banner line, sends `msg` and reads it back.
pub async fn call_banner(addr: SocketAddr, msg: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let sock = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let (r, mut w) = sock.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut banner = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut banner))
        .await
        .context("no answer within 10 s")??;
    if banner.is_empty() {
        bail!("the connection closed without an answer");
    }
    w.write_all(msg.as_bytes()).await?;
    w.shutdown().await?;
    let mut echoed = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_string(&mut echoed))
        .await
        .context("echo timed out")??;
    if echoed != msg {
        bail!("echo mismatch: sent {msg:?}, got {echoed:?}");
    }
    Ok(banner.trim_end().to_string())
}
