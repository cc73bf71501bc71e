//! L4 forwarding between a TCP connection and a QUIC stream: both
//! directions at once, backpressure from each side's flow control, and
//! half-close carried across (TCP FIN <-> QUIC FIN).
//!
//! Buffers: an idle stream holds none here. TCP→QUIC reads into a fresh
//! chunk of at most 16 KiB only once the socket is readable and hands it to
//! quinn without copying (quinn keeps it until the peer acknowledges it,
//! within the stream's send window). QUIC→TCP takes quinn's received chunks
//! (at most 16 KiB each) and writes them straight to the socket. So per
//! stream this process holds at most one chunk per direction in flight,
//! plus what QUIC flow control admits (`[quic]` windows).

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Largest chunk read or written in one step.
const CHUNK: usize = 16 * 1024;

/// Copies until both directions are done; returns (tcp→quic, quic→tcp) bytes.
pub async fn splice(
    tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> (u64, u64) {
    let _ = tcp.set_nodelay(true);
    let (tr, mut tw) = tcp.into_split();
    let up = async {
        let n = tcp_to_quic(&tr, &mut send).await;
        match n {
            Ok(_) => {
                let _ = send.finish();
                // Wait until the peer has everything, so closing the
                // connection afterwards (drain, shutdown) loses nothing.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(10), send.stopped()).await;
            }
            Err(_) => {
                let _ = send.reset(quinn::VarInt::from_u32(1));
            }
        }
        n.unwrap_or(0)
    };
    let down = async {
        let n = quic_to_tcp(&mut recv, &mut tw).await;
        if n.is_err() {
            let _ = recv.stop(quinn::VarInt::from_u32(1));
        }
        let _ = tw.shutdown().await;
        n.unwrap_or(0)
    };
    let (a, b) = tokio::join!(up, down);
    metrics::counter!("causeway_tunnel_bytes_total", "direction" => "tcp_to_quic").increment(a);
    metrics::counter!("causeway_tunnel_bytes_total", "direction" => "quic_to_tcp").increment(b);
    (a, b)
}

async fn tcp_to_quic(tr: &OwnedReadHalf, send: &mut quinn::SendStream) -> std::io::Result<u64> {
    let mut total = 0u64;
    loop {
        tr.readable().await?;
        match read_chunk(tr.as_ref()) {
            Ok(None) => return Ok(total),
            Ok(Some(chunk)) => {
                total += chunk.len() as u64;
                send.write_chunk(chunk).await?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads what the socket holds, up to one chunk; `None` at end of stream.
///
/// A short read means the socket was drained at that moment, so the
/// readiness is cleared with it (tokio clears it only on `WouldBlock`):
/// otherwise every message would cost a second `recv` that finds nothing.
/// Clearing is safe against a race: tokio keeps readiness that arrived
/// after it was sampled, before the read.
fn read_chunk(tcp: &TcpStream) -> std::io::Result<Option<bytes::Bytes>> {
    use std::io::Read;
    let mut buf = BytesMut::zeroed(CHUNK);
    let mut short = 0;
    let read = tcp.try_io(tokio::io::Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(tcp)).read(&mut buf)?;
        if n > 0 && n < CHUNK {
            short = n;
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    let n = match read {
        Ok(0) => return Ok(None),
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && short > 0 => short,
        Err(e) => return Err(e),
    };
    buf.truncate(n);
    Ok(Some(buf.freeze()))
}

async fn quic_to_tcp(
    recv: &mut quinn::RecvStream,
    tw: &mut OwnedWriteHalf,
) -> std::io::Result<u64> {
    let mut total = 0u64;
    while let Some(chunk) = recv
        .read_chunk(CHUNK, true)
        .await
        .map_err(std::io::Error::from)?
    {
        total += chunk.bytes.len() as u64;
        tw.write_all(&chunk.bytes).await?;
    }
    Ok(total)
}
