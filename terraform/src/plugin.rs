//! Starting as a Terraform plugin: the handshake with the process that
//! launched us, then gRPC on a Unix socket until Terraform is done.
//!
//! Terraform starts the provider with a magic cookie in its environment and
//! reads one line from its standard output:
//! `CORE-VERSION|PROTOCOL-VERSION|unix|SOCKET|grpc|SERVER-CERT`. The socket
//! lives in a fresh directory only this user can enter (mode 0700), and
//! every connection on it is mutual TLS (see [`crate::tls`]): only the
//! Terraform process that started the provider can call it. Everything the
//! provider sends to the controller goes over mutual TLS as well.

use std::io::Write;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::net::UnixListener;

/// A fresh directory for the plugin socket, only its owner may enter
/// (0700, set explicitly): another local user cannot reach the socket
/// before the TLS handshake even starts.
fn socket_dir(base: Option<&std::path::Path>) -> anyhow::Result<tempfile::TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("causeway-provider-");
    let dir = match base {
        Some(base) => builder.tempdir_in(base),
        None => builder.tempdir(),
    }
    .context("creating the plugin socket's directory")?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .context("making the plugin socket's directory private")?;
    }
    Ok(dir)
}
use tokio_stream::wrappers::ReceiverStream;

use crate::host::grpc_controller_server::{GrpcController, GrpcControllerServer};
use crate::host::Empty;
use crate::pb::provider_server::ProviderServer;
use crate::provider::Provider;

const MAGIC_COOKIE_KEY: &str = "TF_PLUGIN_MAGIC_COOKIE";
const MAGIC_COOKIE_VALUE: &str = "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2";
const PROTOCOL_VERSION: u32 = 6;

/// What a person who runs the binary by hand is told.
pub const NOT_BY_HAND: &str = "terraform-provider-causeway is a Terraform provider: Terraform starts it. \
Install it where Terraform finds providers (see terraform/README.md), then run `terraform init` and `terraform apply`.";

/// Runs the provider until Terraform shuts it down.
pub async fn serve() -> anyhow::Result<()> {
    if std::env::var(MAGIC_COOKIE_KEY).as_deref() != Ok(MAGIC_COOKIE_VALUE) {
        bail!("{NOT_BY_HAND}");
    }
    if let Ok(offered) = std::env::var("PLUGIN_PROTOCOL_VERSIONS") {
        if !offered
            .split(',')
            .any(|v| v.trim() == PROTOCOL_VERSION.to_string())
        {
            bail!(
                "this provider speaks plugin protocol {PROTOCOL_VERSION}, Terraform offered {offered}: use Terraform 1.0 or later"
            );
        }
    }
    let client_cert = std::env::var("PLUGIN_CLIENT_CERT").map_err(|_| {
        anyhow::anyhow!(
            "Terraform did not offer mutual TLS (PLUGIN_CLIENT_CERT is unset); this provider needs Terraform 0.13 or later"
        )
    })?;
    let tls = crate::tls::server(&client_cert)?;
    let base = std::env::var_os("PLUGIN_UNIX_SOCKET_DIR").map(std::path::PathBuf::from);
    let dir = socket_dir(base.as_deref())?;
    let path = dir.path().join("plugin.sock");
    let listener =
        UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;

    let shutdown = Arc::new(tokio::sync::Notify::new());
    let provider = Provider::new();
    let host = HostController {
        shutdown: shutdown.clone(),
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "1|{PROTOCOL_VERSION}|unix|{}|grpc|{}",
            path.display(),
            tls.cert_line
        )?;
        out.flush()?;
    }
    tracing::info!(socket = %path.display(), "serving Terraform");
    tonic::transport::Server::builder()
        .add_service(ProviderServer::new(provider).max_decoding_message_size(64 << 20))
        .add_service(GrpcControllerServer::new(host))
        .serve_with_incoming_shutdown(tls_incoming(listener, tls.config), async move {
            shutdown.notified().await
        })
        .await
        .context("serving Terraform")?;
    drop(dir);
    Ok(())
}

/// Accepted connections after their TLS handshake; one that fails its
/// handshake is logged and dropped, the others go on.
fn tls_incoming(
    listener: UnixListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<tokio::net::UnixStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                match acceptor.accept(stream).await {
                    Ok(tls) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "refused a connection on the plugin socket")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

struct HostController {
    shutdown: Arc<tokio::sync::Notify>,
}

#[tonic::async_trait]
impl GrpcController for HostController {
    async fn shutdown(
        &self,
        _: tonic::Request<Empty>,
    ) -> Result<tonic::Response<Empty>, tonic::Status> {
        self.shutdown.notify_one();
        Ok(tonic::Response::new(Empty {}))
    }
}

#[cfg(test)]
mod socket_dir_tests {
    #[cfg(unix)]
    #[test]
    fn the_socket_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let dir = super::socket_dir(Some(base.path())).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
