//! Certificates for the TLS tests, made by the test (rcgen): a CA, a server certificate for
//! 127.0.0.1 and `localhost`, and a client certificate, written as PEM files into a scratch
//! folder; and clients that trust that CA.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::Scratch;

/// A CA of the test's own and what it signed; the files live as long as it does.
pub struct TestPki {
    dir: Scratch,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    client: (String, String),
}

impl TestPki {
    /// A fresh CA named `name`, with a client certificate (CN `sagad-test-client`).
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let dir = Scratch::logs(&format!("pki-{name}"))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("sagad test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let ca = params.self_signed(&key)?;
        let ca_pem = ca.pem();
        let issuer = Issuer::new(params, key);
        let client = signed(&issuer, "sagad-test-client", Vec::new())?;
        let pki = Self {
            dir,
            ca_pem,
            issuer,
            client,
        };
        std::fs::write(pki.path("ca.pem"), &pki.ca_pem)?;
        std::fs::write(pki.path("client.pem"), &pki.client.0)?;
        std::fs::write(pki.path("client.key"), &pki.client.1)?;
        Ok(pki)
    }

    /// A file in the PKI's folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes a fresh server certificate for 127.0.0.1 and `localhost` as `<name>.pem` and
    /// `<name>.key`; returns their paths.
    pub fn server_cert(&self, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let (cert, key) = signed(
            &self.issuer,
            name,
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
        )?;
        let cert_path = self.path(&format!("{name}.pem"));
        let key_path = self.path(&format!("{name}.key"));
        std::fs::write(&cert_path, cert)?;
        std::fs::write(&key_path, key)?;
        Ok((cert_path, key_path))
    }

    /// This CA's certificate, for a client to trust.
    pub fn ca_certificate(&self) -> Certificate {
        Certificate::from_pem(&self.ca_pem)
    }

    /// This CA's certificate as PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The client certificate and key this CA signed, as PEM text.
    pub fn client_pem(&self) -> (&str, &str) {
        (&self.client.0, &self.client.1)
    }

    /// The client certificate and key this CA signed, for a client to show.
    pub fn client_identity(&self) -> Identity {
        Identity::from_pem(&self.client.0, &self.client.1)
    }

    /// A client trusting this CA, showing its client certificate or not.
    pub fn client_config(&self, with_certificate: bool) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if with_certificate {
            config.identity(Identity::from_pem(&self.client.0, &self.client.1))
        } else {
            config
        }
    }
}

fn signed(
    issuer: &Issuer<'static, KeyPair>,
    common_name: &str,
    names: Vec<String>,
) -> anyhow::Result<(String, String)> {
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let key = KeyPair::generate()?;
    let cert = params
        .signed_by(&key, issuer)
        .context("signing a certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// An endpoint for `addr`: `https://` with `tls`, else `http://`.
pub fn endpoint(addr: SocketAddr, tls: Option<&ClientTlsConfig>) -> anyhow::Result<Endpoint> {
    Ok(match tls {
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls.clone())?,
        None => Endpoint::from_shared(format!("http://{addr}"))?,
    })
}
