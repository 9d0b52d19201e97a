//! TLS for a node and its clients: the PEM files the `--tls-*` flags name, read and checked
//! once at start, and the rustls settings tonic serves and calls with.
//!
//! A node with a certificate serves both of its services over TLS on its one port. With the
//! cluster's CA as well, it calls its peers over TLS, presents its own certificate to them, and
//! takes Replicator calls only from callers whose certificate chains to that CA.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use rustls::InconsistentKeys;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::Error;

/// How long a connection gets to finish its TLS handshake: a client that opens a connection
/// and never says hello does not keep it for longer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which clients must present a certificate from the cluster's CA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ClientAuth {
    /// Only callers of the Replicator (the cluster's nodes).
    #[default]
    None,
    /// Every client, of both services.
    Require,
}

/// A node's TLS: its certificate and key, and the cluster's CA if it has one. Its `Debug`
/// shows the files, not their contents.
#[derive(Clone)]
pub struct NodeTls {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
    client_auth: ClientAuth,
    identity: Identity,
    ca_pem: Option<Certificate>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("ca", &self.ca)
            .field("client_auth", &self.client_auth)
            .finish()
    }
}

impl NodeTls {
    /// Reads and checks the node's files: the certificate chain, a key that is the
    /// certificate's, and (if given) a CA file of certificates rustls can trust. Each problem
    /// names its flag and file.
    pub fn load(
        cert: &Path,
        key: &Path,
        ca: Option<&Path>,
        client_auth: ClientAuth,
    ) -> Result<Self, Error> {
        let identity = load_identity(("--tls-cert", cert), ("--tls-key", key))?;
        let ca_pem = ca.map(|ca| load_ca("--tls-ca", ca)).transpose()?;
        if client_auth == ClientAuth::Require && ca_pem.is_none() {
            return Err(Error::InvalidArgument(
                "--tls-client-auth require needs --tls-ca: client certificates are checked \
                 against the cluster's CA"
                    .into(),
            ));
        }
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            ca: ca.map(Path::to_path_buf),
            client_auth,
            identity,
            ca_pem,
        })
    }

    /// Whether callers of the Replicator must present a certificate from the cluster's CA.
    pub fn checks_peers(&self) -> bool {
        self.ca_pem.is_some()
    }

    /// The settings the node serves with. With a CA, a client certificate is asked for and, if
    /// one is sent, must chain to the CA; only `--tls-client-auth require` refuses a
    /// connection without one (without it the Replicator alone refuses such callers).
    pub fn server_config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new()
            .identity(self.identity.clone())
            .timeout(HANDSHAKE_TIMEOUT);
        match &self.ca_pem {
            None => config,
            Some(ca) => config
                .client_ca_root(ca.clone())
                .client_auth_optional(self.client_auth == ClientAuth::None),
        }
    }

    /// The settings the node calls its peers with: their certificates checked against the
    /// cluster's CA, its own presented. `None` without a CA: peers are called in the clear.
    pub fn peer_config(&self) -> Option<ClientTlsConfig> {
        self.ca_pem.as_ref().map(|ca| {
            ClientTlsConfig::new()
                .ca_certificate(ca.clone())
                .identity(self.identity.clone())
        })
    }

    /// The files, as the start line shows them.
    pub fn describe(&self) -> String {
        format!(
            "cert={} key={} ca={} client_auth={}",
            self.cert.display(),
            self.key.display(),
            self.ca
                .as_deref()
                .map_or_else(|| "none".into(), |p| p.display().to_string()),
            match self.client_auth {
                ClientAuth::None => "none",
                ClientAuth::Require => "require",
            }
        )
    }
}

/// A client's TLS settings: the CA the node's certificate must chain to, and the client's own
/// certificate and key when the node asks for one (`--tls-client-auth require`).
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, Error> {
    let config = ClientTlsConfig::new().ca_certificate(load_ca("--tls-ca", ca)?);
    Ok(match identity {
        None => config,
        Some((cert, key)) => {
            config.identity(load_identity(("--tls-cert", cert), ("--tls-key", key))?)
        }
    })
}

fn problem(flag: &'static str, path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Tls {
        flag,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| problem(flag, path, e))
}

/// Every certificate in a PEM file; at least one, and no broken PEM among them.
fn certificates(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(flag, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(problem(
            flag,
            path,
            "holds no certificate (expected PEM, -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// A certificate chain and its key, checked to belong together.
fn load_identity(
    (cert_flag, cert): (&'static str, &Path),
    (key_flag, key): (&'static str, &Path),
) -> Result<Identity, Error> {
    let cert_pem = read(cert_flag, cert)?;
    let key_pem = read(key_flag, key)?;
    let chain = certificates(cert_flag, cert, &cert_pem)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        problem(
            key_flag,
            key,
            format!("holds no private key rustls can read (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
        )
    })?;
    // ring's, as tonic's rustls signs with.
    let signing = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|e| problem(key_flag, key, format!("not a key rustls can use: {e}")))?;
    let matched = match CertifiedKey::new(chain, signing).keys_match() {
        // A key whose public half cannot be derived is taken on trust, as rustls does.
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(()),
        other => other,
    };
    matched.map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => problem(
            key_flag,
            key,
            format!(
                "is not the key of the certificate in {cert_flag} {}",
                cert.display()
            ),
        ),
        other => problem(
            cert_flag,
            cert,
            format!("not a certificate rustls can use: {other}"),
        ),
    })?;
    Ok(Identity::from_pem(cert_pem, key_pem))
}

/// A CA file: every certificate in it must be one rustls can trust.
fn load_ca(flag: &'static str, path: &Path) -> Result<Certificate, Error> {
    let pem = read(flag, path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(flag, path, &pem)? {
        roots.add(cert).map_err(|e| {
            problem(
                flag,
                path,
                format!("not a CA certificate rustls can use: {e}"),
            )
        })?;
    }
    Ok(Certificate::from_pem(pem))
}
