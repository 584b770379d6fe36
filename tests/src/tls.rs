//! A self-signed certificate for the TLS end-to-end tests, made with the `openssl` command
//! (Debian's OpenSSL 3) in a temporary directory removed on drop.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `cert` (PEM, for 127.0.0.1 and localhost; its own CA) and `key` (PEM, P-256: quick to make
/// and to use under emulation).
pub struct TestCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
    dir: PathBuf,
}

impl TestCertificate {
    pub fn new() -> TestCertificate {
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kspan-e2e-tls-{}-{}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run openssl (Debian's openssl package; `cargo xtask setup`): {e}")
            });
        assert!(
            out.status.success(),
            "openssl req failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        TestCertificate { cert, key, dir }
    }

    pub fn cert_str(&self) -> &str {
        self.cert.to_str().expect("UTF-8 temporary path")
    }

    pub fn key_str(&self) -> &str {
        self.key.to_str().expect("UTF-8 temporary path")
    }

    /// A copy of Debian's libssl.so.3 in the certificate's temporary directory: another file
    /// than the system's (which kspan attaches to at start), as an application bundling its
    /// own OpenSSL carries.
    pub fn private_libssl_copy(&self) -> PathBuf {
        let system = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu"]
            .iter()
            .map(|dir| PathBuf::from(dir).join("libssl.so.3"))
            .find(|path| path.is_file())
            .expect("Debian's libssl.so.3 (package libssl3, installed with openssl)");
        let copy = self.dir.join("libssl.so.3");
        std::fs::copy(&system, &copy)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", system.display(), copy.display()));
        copy
    }
}

impl Default for TestCertificate {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCertificate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `node/https_server.js`: Node's `https` with `cert` (OpenSSL linked into the node executable;
/// its TLS sockets are on memory BIOs). Killed on drop.
pub struct NodeHttpsServer {
    child: std::process::Child,
    pub pid: u32,
    pub port: u16,
    _stderr: crate::LinePump,
}

impl NodeHttpsServer {
    pub fn start(cert: &TestCertificate) -> NodeHttpsServer {
        let script = crate::crate_dir().join("node").join("https_server.js");
        let mut cmd = Command::new(crate::grpc::node());
        cmd.arg(&script)
            .arg(&cert.cert)
            .arg(&cert.key)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .env_remove("OTEL_SERVICE_NAME");
        let (child, pid, port, stderr) = crate::spawn_port_server(cmd, "https_server.js");
        NodeHttpsServer {
            child,
            pid,
            port,
            _stderr: stderr,
        }
    }

    /// `https://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{}", self.port, path)
    }
}

impl Drop for NodeHttpsServer {
    fn drop(&mut self) {
        crate::kill_and_reap(&mut self.child);
    }
}
