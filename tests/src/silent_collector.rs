//! A collector that accepts connections and never answers: it reads and throws away whatever
//! comes (gRPC or HTTP, it makes no difference), holds every connection open, and never writes
//! a byte. What a hung or wedged collector looks like to an exporter.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Listening on 127.0.0.1 (a free port) from [`SilentCollector::start`] until dropped.
pub struct SilentCollector {
    port: u16,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    acceptor: Option<JoinHandle<()>>,
}

impl SilentCollector {
    pub fn start() -> SilentCollector {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let acceptor = {
            let (stop, connections, bytes) = (stop.clone(), connections.clone(), bytes.clone());
            thread::spawn(move || {
                let mut readers = Vec::new();
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (stop, bytes) = (stop.clone(), bytes.clone());
                    readers.push(thread::spawn(move || swallow(stream, &stop, &bytes)));
                }
                for reader in readers {
                    let _ = reader.join();
                }
            })
        };
        SilentCollector {
            port,
            stop,
            connections,
            bytes,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`, for `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Bytes received (and ignored) so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

/// Reads until the peer closes or the collector stops; never writes.
fn swallow(mut stream: TcpStream, stop: &AtomicBool, bytes: &AtomicU64) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 16384];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
}

impl Drop for SilentCollector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor blocked in accept().
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}
