//! Throwaway TLS certificates for local clusters and tests: a CA made on the spot, and
//! certificates it signs for nodes and clients, written as PEM files.
//!
//! Every certificate is valid for `localhost`, `127.0.0.1` and `::1`, as a node on loopback is
//! reached by any of them, and for both server and client authentication, as a node is both to
//! its peers. Keys are written readable by their owner only.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::Error;

/// The names a loopback node is reached by.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA that signs certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl TestCa {
    /// A new CA named `name`, with a fresh key.
    pub fn new(name: &str) -> Result<Self, Error> {
        let mut params = CertificateParams::new(Vec::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// Writes the CA's certificate (not its key) to `path`.
    pub fn write(&self, path: &Path) -> Result<PathBuf, Error> {
        std::fs::write(path, &self.pem)?;
        Ok(path.to_path_buf())
    }

    /// A certificate for `name`, valid for the loopback names, signed by this CA, written to
    /// `dir/NAME.pem` with its key in `dir/NAME.key`.
    pub fn issue(&self, name: &str, dir: &Path) -> Result<CertFiles, Error> {
        let hosts: Vec<String> = LOOPBACK_NAMES.iter().map(|h| h.to_string()).collect();
        let mut params = CertificateParams::new(hosts)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let files = CertFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem())?;
        write_private(&files.key, key.serialize_pem().as_bytes())?;
        Ok(files)
    }
}

/// Writes a file only its owner may read, replacing any there.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    Ok(())
}

/// A cluster's certificates: the CA, one certificate per node, and one for a client.
#[derive(Clone, Debug)]
pub struct ClusterPki {
    pub ca: PathBuf,
    /// `nodes[i]` is node i+1's.
    pub nodes: Vec<CertFiles>,
    pub client: CertFiles,
}

impl ClusterPki {
    /// A new CA and certificates for `nodes` nodes and a client, in `dir` (made if missing):
    /// `ca.pem`, `node1.pem` and `node1.key`, ..., `client.pem` and `client.key`.
    pub fn create(dir: &Path, nodes: usize) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let ca = TestCa::new("kvstore test CA")?;
        Ok(Self {
            ca: ca.write(&dir.join("ca.pem"))?,
            nodes: (1..=nodes)
                .map(|i| ca.issue(&format!("node{i}"), dir))
                .collect::<Result<_, _>>()?,
            client: ca.issue("client", dir)?,
        })
    }

    /// The flags that make node `i` (from 0) serve TLS with its certificate and this CA.
    pub fn node_args(&self, i: usize) -> Vec<String> {
        let node = &self.nodes[i];
        [
            ("--tls-cert", &node.cert),
            ("--tls-key", &node.key),
            ("--tls-ca", &self.ca),
        ]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect()
    }

    /// Node `i`'s (from 0) TLS settings, as a node run in-process takes them.
    pub fn node_tls(
        &self,
        i: usize,
        client_auth: kvstore::tls::ClientAuth,
    ) -> Result<kvstore::tls::NodeTls, Error> {
        let node = &self.nodes[i];
        Ok(kvstore::tls::NodeTls::load(
            &node.cert,
            &node.key,
            Some(&self.ca),
            client_auth,
        )?)
    }

    /// A client's TLS settings: this CA, and the client certificate.
    pub fn client_config(&self) -> Result<tonic::transport::ClientTlsConfig, Error> {
        Ok(kvstore::tls::client_config(
            &self.ca,
            Some((&self.client.cert, &self.client.key)),
        )?)
    }
}
