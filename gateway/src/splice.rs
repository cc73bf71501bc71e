//! L4 forwarding between a TCP connection and a QUIC stream: both
//! directions at once, backpressure from each side's flow control, and
//! half-close carried across (TCP FIN <-> QUIC FIN). Each direction buffers
//! at most one 8 KiB copy buffer in this process.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Copies until both directions are done; returns (tcp→quic, quic→tcp) bytes.
pub async fn splice(
    tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> (u64, u64) {
    let _ = tcp.set_nodelay(true);
    let (mut tr, mut tw) = tcp.into_split();
    let up = async {
        let n = copy(&mut tr, &mut send).await;
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
        let n = copy(&mut recv, &mut tw).await;
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

async fn copy<R, W>(r: &mut R, w: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = tokio::io::BufReader::with_capacity(8 * 1024, r);
    tokio::io::copy_buf(&mut buf, w).await
}
