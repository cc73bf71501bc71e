//! Reading the tunnel stream's framing from a QUIC stream: the caller's
//! open request (at the exporting gateway) and the status answer (at the
//! caller). Both are length-bounded by the sans-IO codec before any body
//! is read.

use causeway_gateway_core::header::{HeaderError, OpenRequest, OpenResponse, PREFIX_LEN};

/// Why a stream's header or status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream ended or was reset before the whole frame arrived.
    #[error("reading the {what}: {source}")]
    Stream {
        /// "header" or "status".
        what: &'static str,
        /// What quinn said.
        source: quinn::ReadExactError,
    },
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Frame(#[from] HeaderError),
}

async fn read_exact(
    recv: &mut quinn::RecvStream,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), ReadError> {
    recv.read_exact(buf)
        .await
        .map_err(|source| ReadError::Stream { what, source })
}

/// The open request a calling gateway sends first on a stream.
pub async fn read_request(recv: &mut quinn::RecvStream) -> Result<OpenRequest, ReadError> {
    let mut prefix = [0u8; PREFIX_LEN];
    read_exact(recv, &mut prefix, "header").await?;
    let len = OpenRequest::decode_prefix(&prefix)?;
    let mut body = vec![0u8; len];
    read_exact(recv, &mut body, "header").await?;
    Ok(OpenRequest::decode_body(&body)?)
}

/// The status the exporting gateway answers with before any payload.
pub async fn read_response(recv: &mut quinn::RecvStream) -> Result<OpenResponse, ReadError> {
    let mut prefix = [0u8; PREFIX_LEN];
    read_exact(recv, &mut prefix, "status").await?;
    let (status, len) = OpenResponse::decode_prefix(&prefix)?;
    let mut msg = vec![0u8; len];
    read_exact(recv, &mut msg, "status").await?;
    Ok(OpenResponse {
        status,
        message: String::from_utf8_lossy(&msg).into_owned(),
    })
}
