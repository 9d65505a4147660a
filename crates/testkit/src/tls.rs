//! Certificates for TLS tests, made with the `openssl` command: a CA, a
//! server certificate for 127.0.0.1 and localhost, a client certificate,
//! and a second CA that signed neither (for the refusal tests).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::redis::temp_dir;

/// PEM files in a fresh temporary directory, removed on drop.
pub struct TestCerts {
    dir: PathBuf,
}

impl TestCerts {
    /// Generates every file (P-256 keys, valid for a day).
    pub fn generate() -> TestCerts {
        let dir = temp_dir("certs");
        let certs = TestCerts { dir };
        certs.self_signed("ca", "roomcast test CA");
        certs.self_signed("other-ca", "an unrelated CA");
        certs.signed(
            "server",
            "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        );
        certs.signed("client", "roomcast-node", "extendedKeyUsage=clientAuth");
        certs
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    /// A CA that signed none of the certificates here.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.crt")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.crt")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    fn self_signed(&self, name: &str, cn: &str) {
        openssl(
            &self.dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }

    fn signed(&self, name: &str, cn: &str, extension: &str) {
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!("{extension}\n"),
        )
        .expect("write an openssl extension file");
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (install it: apt-get install -y openssl)");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
