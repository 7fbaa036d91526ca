//! Test certificate authorities (feature `pki`, rcgen): a CA, node certificates valid for
//! server and client authentication with the SANs a test needs, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};

/// A test CA.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM).
    pub cert_pem: String,
}

/// A certificate and its key issued by a [`TestCa`] (PEM).
#[derive(Clone, Debug)]
pub struct Issued {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PEM, PKCS#8).
    pub key_pem: String,
}

/// Paths of an [`Issued`] pair written to disk.
#[derive(Clone, Debug)]
pub struct IssuedFiles {
    /// Certificate file.
    pub cert: PathBuf,
    /// Key file.
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA with common name `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        }
    }

    /// A certificate for `sans` (DNS names or IP addresses) with common name `cn` and serial
    /// `serial`, usable as a server and as a client certificate.
    pub fn issue(&self, cn: &str, sans: &[&str], serial: u64) -> Issued {
        let key = KeyPair::generate().expect("key");
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes the CA certificate to `dir/name`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, &self.cert_pem).expect("write CA");
        p
    }
}

impl Issued {
    /// Writes `dir/name.pem` and `dir/name.key`.
    pub fn write(&self, dir: &Path, name: &str) -> IssuedFiles {
        let files = IssuedFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, &self.cert_pem).expect("write cert");
        std::fs::write(&files.key, &self.key_pem).expect("write key");
        files
    }

    /// As PEM text for [`kvshare_client::ClientOptions::with_tls_pem`].
    pub fn identity(&self) -> kvshare_client::IdentityPem {
        kvshare_client::IdentityPem {
            cert: self.cert_pem.clone().into_bytes(),
            key: self.key_pem.clone().into_bytes(),
        }
    }
}
