//! HTTP test helpers for layer-7 features: a backend that reports what it
//! saw, and HTTP/1.1 and HTTP/2 clients that send headers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};

/// How a test backend behaves.
#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    /// Answers at once.
    Answer,
    /// Never answers (holds the request).
    Hang,
}

/// An HTTP/1.1 and HTTP/2 backend: answers `<name> <path?query>` with the
/// request's `x-route` and `host` echoed as `x-saw-route`/`x-saw-host`,
/// and counts the requests it got.
pub async fn backend(name: &'static str, mode: Mode) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        seen.fetch_add(1, Ordering::Relaxed);
                        let pq = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.as_str().to_string())
                            .unwrap_or_default();
                        let echo = |h: &str| {
                            req.headers()
                                .get(h)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string()
                        };
                        let host = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .unwrap_or_else(|| echo("host"));
                        let route = echo("x-route");
                        async move {
                            if mode == Mode::Hang {
                                std::future::pending::<()>().await;
                            }
                            let resp = hyper::Response::builder()
                                .header("x-saw-route", route)
                                .header("x-saw-host", host)
                                .body(Full::new(bytes::Bytes::from(format!("{name} {pq}"))))
                                .unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
            });
        }
    });
    (at, count)
}

/// One client connection, HTTP/1.1 or HTTP/2 (prior knowledge).
pub enum Client {
    H1(hyper::client::conn::http1::SendRequest<Full<bytes::Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<bytes::Bytes>>),
}

/// An answer: status, headers, body.
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The backend that answered: the first word of the body.
    pub fn backend(&self) -> &str {
        self.body.split(' ').next().unwrap_or("")
    }
}

impl Client {
    pub async fn connect(target: SocketAddr, h2: bool) -> Self {
        let tcp = tokio::net::TcpStream::connect(target).await.unwrap();
        let io = hyper_util::rt::TokioIo::new(tcp);
        if h2 {
            let (s, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Client::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Client::H1(s)
        }
    }

    /// `GET path` to `web.shop`'s mesh name with `headers`.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.get_at("http", "web.shop.svc.clusterset.local", path, headers)
            .await
    }

    /// `GET path` with `host` as Host (HTTP/1.1) or in `scheme://host`
    /// (HTTP/2's `:authority`).
    pub async fn get_at(
        &mut self,
        scheme: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let (uri, h2) = match self {
            Client::H1(_) => (path.to_string(), false),
            Client::H2(_) => (format!("{scheme}://{host}{path}"), true),
        };
        let mut b = hyper::Request::builder().uri(uri);
        if !h2 {
            b = b.header("host", host);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(bytes::Bytes::new())).unwrap();
        let resp = match self {
            Client::H1(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Client::H2(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

/// Gateway TOML exporting `shop/web` port 8080 over HTTP/1.1 with the given
/// `(endpoint, version)` pairs.
pub fn versioned_export(endpoints: &[(SocketAddr, &str)]) -> String {
    let list: Vec<String> = endpoints.iter().map(|(a, _)| format!("\"{a}\"")).collect();
    let versions: Vec<String> = endpoints
        .iter()
        .map(|(a, v)| format!("\"{a}\" = \"{v}\""))
        .collect();
    format!(
        "\n[[exports]]\nservice = \"shop/web\"\nport = 8080\nprotocol = \"http\"\nendpoints = [{}]\nversions = {{ {} }}\n",
        list.join(", "),
        versions.join(", ")
    )
}
