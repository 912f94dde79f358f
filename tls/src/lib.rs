//! TLS for the gRPC servers and clients of sagad and its participants. Certificates, keys and
//! CAs are PEM files. A server's files are read again on request (SIGHUP, in the binaries):
//! connections already open keep the session they made, each new handshake uses what was read
//! last, so a rotation drops nothing. A reading that fails keeps the one in force.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::Stream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// How long a client may take over its handshake before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake is done, not yet taken up by the server.
const HANDSHAKEN_BACKLOG: usize = 64;

/// A file that cannot be used, named with its flag so the operator knows which to fix.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {path}: {message}")]
pub struct TlsError {
    flag: &'static str,
    path: String,
    message: String,
}

impl TlsError {
    fn new(flag: &'static str, path: &Path, message: impl ToString) -> Self {
        Self {
            flag,
            path: path.display().to_string(),
            message: message.to_string(),
        }
    }
}

/// A server's TLS files; `client_ca` asks every client for a certificate signed by it.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// A server's TLS, as last read from its files.
#[derive(Clone)]
pub struct ServerTls {
    files: Arc<ServerTlsFiles>,
    config: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ServerTls {
    /// Reads and checks the files: a certificate that does not match its key, an empty file or
    /// a CA that is no certificate is an error naming the flag and the file.
    pub fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        Ok(Self {
            files: Arc::new(files),
            config: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    /// Reads the files again for the handshakes to come; on an error the ones in force stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = Arc::new(server_config(&self.files)?);
        match self.config.write() {
            Ok(mut slot) => *slot = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    fn current(&self) -> Arc<ServerConfig> {
        match self.config.read() {
            Ok(config) => Arc::clone(&config),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The connections of `listener` once their handshake is done, for tonic's
    /// `serve_with_incoming`. Handshakes run side by side, so a slow or silent client holds up
    /// nobody; one that fails or takes longer than ten seconds is dropped (and logged at debug).
    /// Accepting stops when the stream is dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
        let (handshaken, receiver) = mpsc::channel(HANDSHAKEN_BACKLOG);
        tokio::spawn(accept(listener, self.clone(), handshaken));
        futures::stream::unfold(receiver, |mut receiver| async move {
            let stream = receiver.recv().await?;
            Some((Ok(stream), receiver))
        })
    }
}

async fn accept(
    listener: TcpListener,
    tls: ServerTls,
    handshaken: mpsc::Sender<TlsStream<TcpStream>>,
) {
    loop {
        let accepted = tokio::select! {
            () = handshaken.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, say: wait a little rather than spin.
                tracing::warn!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small replies go out at once, not after the peer's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.current());
        let handshaken = handshaken.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = handshaken.send(stream).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

fn server_config(files: &ServerTlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certs_in("--tls-cert", &files.cert, &read("--tls-cert", &files.cert)?)?;
    let key = key_in("--tls-key", &files.key, &read("--tls-key", &files.key)?)?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::new("--tls-cert", &files.cert, error))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certs_in("--tls-client-ca", path, &read("--tls-client-ca", path)?)? {
                roots
                    .add(cert)
                    .map_err(|error| TlsError::new("--tls-client-ca", path, error))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| TlsError::new("--tls-client-ca", path, error))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|error| {
        TlsError::new(
            "--tls-cert",
            &files.cert,
            format!("{error} (with --tls-key {})", files.key.display()),
        )
    })?;
    // gRPC is HTTP/2: clients (tonic's among them) insist on it being negotiated.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::new(flag, path, error))
}

/// The certificates of a PEM file's text (`path` names it in errors); none is an error.
fn certs_in(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::new(flag, path, pem_error(error)))?;
    if certs.is_empty() {
        return Err(TlsError::new(flag, path, "holds no certificate (PEM)"));
    }
    Ok(certs)
}

/// The private key of a PEM file's text (`path` names it in errors).
fn key_in(flag: &'static str, path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| TlsError::new(flag, path, pem_error(error)))
}

fn pem_error(error: rustls::pki_types::pem::Error) -> String {
    match error {
        rustls::pki_types::pem::Error::Io(error) => error.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "holds nothing usable (PEM)".to_owned(),
        other => format!("not a usable PEM file ({other:?})"),
    }
}

/// A file and the flag that named it (sagactl's `--ca`, sagad's `--participant-ca`, ...), so
/// that errors name what the operator typed.
#[derive(Debug, Clone)]
pub struct FlaggedPath {
    pub flag: &'static str,
    pub path: PathBuf,
}

impl FlaggedPath {
    /// The file of `flag`, when the flag was given.
    pub fn given(flag: &'static str, path: Option<&PathBuf>) -> Option<Self> {
        path.map(|path| Self {
            flag,
            path: path.clone(),
        })
    }
}

/// A client's TLS files.
#[derive(Debug, Clone)]
pub struct ClientTlsFiles {
    /// The CA that signed the server's certificate; without it, the system's roots.
    ca: Option<FlaggedPath>,
    /// A client certificate and its key, for servers that ask for one.
    identity: Option<(FlaggedPath, FlaggedPath)>,
}

impl ClientTlsFiles {
    /// The flags' files; a certificate counts only with its key (the flags require each
    /// other).
    pub fn new(
        ca: Option<FlaggedPath>,
        cert: Option<FlaggedPath>,
        key: Option<FlaggedPath>,
    ) -> Self {
        Self {
            ca,
            identity: cert.zip(key),
        }
    }

    /// The files read and checked, as tonic's client configuration for `https://` addresses.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        let config = ClientTlsConfig::new();
        let config = match &self.ca {
            Some(ca) => {
                let pem = read(ca.flag, &ca.path)?;
                certs_in(ca.flag, &ca.path, &pem)?;
                config.ca_certificate(Certificate::from_pem(pem))
            }
            None => config.with_native_roots(),
        };
        Ok(match &self.identity {
            Some((cert, key)) => {
                let cert_pem = read(cert.flag, &cert.path)?;
                certs_in(cert.flag, &cert.path, &cert_pem)?;
                let key_pem = read(key.flag, &key.path)?;
                key_in(key.flag, &key.path, &key_pem)?;
                config.identity(Identity::from_pem(cert_pem, key_pem))
            }
            None => config,
        })
    }
}
