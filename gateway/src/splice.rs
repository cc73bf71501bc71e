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

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Largest chunk read or written in one step.
const CHUNK: usize = 16 * 1024;

/// Copies until both directions are done; returns (tcp→quic, quic→tcp) bytes.
///
/// A clean end travels as a clean end (TCP FIN <-> QUIC FIN). An error in
/// either direction aborts both, so the far side never mistakes a cut for
/// a complete transfer: a TCP read error resets the QUIC stream, and a
/// QUIC stream reset (or lost connection) resets the TCP connection
/// (RST, not FIN) and stops the other direction.
pub async fn splice(
    tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    idle: Duration,
) -> (u64, u64) {
    let _ = tcp.set_nodelay(true);
    let (tr, mut tw) = tcp.into_split();
    let (mut up_bytes, mut down_bytes) = (0u64, 0u64);
    // When a byte last moved either way, in ms since the start: a stream
    // idle for `idle` is cut (as an error: both sides see it reset).
    let start = tokio::time::Instant::now();
    let active = AtomicU64::new(0);
    let touch = || active.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let aborted = {
        let up = async {
            let r = tcp_to_quic(&tr, &mut send, &mut up_bytes, &touch).await;
            match &r {
                Ok(()) => {
                    let _ = send.finish();
                    // Wait until the peer has everything, so closing the
                    // connection afterwards (drain, shutdown) loses nothing.
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_secs(10), send.stopped())
                            .await;
                }
                Err(_) => {
                    let _ = send.reset(quinn::VarInt::from_u32(1));
                }
            }
            r
        };
        let down = async {
            let r = quic_to_tcp(&mut recv, &mut tw, &mut down_bytes, &touch).await;
            match &r {
                Ok(()) => {
                    let _ = tw.shutdown().await;
                }
                Err(_) => {
                    let _ = recv.stop(quinn::VarInt::from_u32(1));
                }
            }
            r
        };
        let (mut up, mut down) = (std::pin::pin!(up), std::pin::pin!(down));
        let (mut up_done, mut down_done) = (false, false);
        let mut deadline = start + idle;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    let last = start + Duration::from_millis(active.load(Ordering::Relaxed));
                    if last + idle <= tokio::time::Instant::now() {
                        metrics::counter!("causeway_idle_timeouts_total").increment(1);
                        break true;
                    }
                    deadline = last + idle;
                }
                r = &mut up, if !up_done => {
                    up_done = true;
                    if r.is_err() {
                        break true;
                    }
                }
                r = &mut down, if !down_done => {
                    down_done = true;
                    if r.is_err() {
                        break true;
                    }
                }
            }
            if up_done && down_done {
                break false;
            }
        }
    };
    if aborted {
        // Whatever is still running was dropped. A dropped SendStream would
        // finish (clean FIN), so reset both QUIC halves explicitly (no-ops
        // for a half already done); closing with a zero linger sends RST
        // to the TCP peer.
        let _ = send.reset(quinn::VarInt::from_u32(1));
        let _ = recv.stop(quinn::VarInt::from_u32(1));
        let _ = socket2::SockRef::from(tw.as_ref()).set_linger(Some(std::time::Duration::ZERO));
        metrics::counter!("causeway_tunnel_streams_aborted_total").increment(1);
    }
    // Reunited, so that dropping does not shut the write half down first
    // (an OwnedWriteHalf sends FIN on drop, ahead of the RST).
    match tr.reunite(tw) {
        Ok(tcp) => drop(tcp),
        Err(e) => drop(e),
    }
    metrics::counter!("causeway_tunnel_bytes_total", "direction" => "tcp_to_quic")
        .increment(up_bytes);
    metrics::counter!("causeway_tunnel_bytes_total", "direction" => "quic_to_tcp")
        .increment(down_bytes);
    (up_bytes, down_bytes)
}

async fn tcp_to_quic(
    tr: &OwnedReadHalf,
    send: &mut quinn::SendStream,
    total: &mut u64,
    touch: &impl Fn(),
) -> std::io::Result<()> {
    loop {
        tr.readable().await?;
        match read_chunk(tr.as_ref()) {
            Ok(None) => return Ok(()),
            Ok(Some(chunk)) => {
                touch();
                *total += chunk.len() as u64;
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
    // Not zeroed: tokio reads into the spare capacity.
    let mut buf = BytesMut::with_capacity(CHUNK);
    let mut short = 0;
    let read = tcp.try_io(tokio::io::Interest::READABLE, || {
        let n = tcp.try_read_buf(&mut buf)?;
        if n > 0 && n < CHUNK {
            short = n;
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match read {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(buf.freeze())),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && short > 0 => Ok(Some(buf.freeze())),
        Err(e) => Err(e),
    }
}

async fn quic_to_tcp(
    recv: &mut quinn::RecvStream,
    tw: &mut OwnedWriteHalf,
    total: &mut u64,
    touch: &impl Fn(),
) -> std::io::Result<()> {
    while let Some(chunk) = recv
        .read_chunk(CHUNK, true)
        .await
        .map_err(std::io::Error::from)?
    {
        touch();
        tw.write_all(&chunk.bytes).await?;
        *total += chunk.bytes.len() as u64;
    }
    Ok(())
}
