//! The addresses of TCP sockets the agent did not see open (opened before it started, inherited
//! through fork, or whose connect/accept event was lost), from procfs: each network namespace's
//! tables (/proc/PID/net/tcp{,6}) read at most once per [`MIN_RESCAN_INTERVAL`] and cached by
//! socket inode, and a socket's inode from one readlink of /proc/PID/fd/N. A process's sockets
//! never cost a table read each.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap;

/// Table reads of one network namespace are at least this far apart: a burst of events on
/// unknown sockets costs one read, not one per event.
pub const MIN_RESCAN_INTERVAL: Duration = Duration::from_millis(100);
/// A namespace whose tables were last read this long ago is forgotten at the next read of any
/// (namespaces come and go with containers).
const FORGET_NAMESPACE_AFTER: Duration = Duration::from_secs(60);

/// A TCP socket as the kernel's tables list it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub listening: bool,
}

/// What is known of an fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Tcp(TcpSocket),
    /// Not a TCP socket of the process's namespace (or gone): tables read after the question
    /// was asked do not list it.
    NotTcp,
    /// Not in the namespace's tables, which were read too recently to read again: maybe a
    /// socket newer than them. Ask again later.
    NotYet,
}

struct NamespaceTable {
    read_at: Instant,
    by_inode: FxHashMap<u64, TcpSocket>,
}

/// The TCP tables of the network namespaces seen, by namespace inode.
#[derive(Default)]
pub struct SocketTables {
    namespaces: FxHashMap<u64, NamespaceTable>,
    /// Table reads so far (one per namespace and refresh).
    scans: u64,
    /// Of them, the ones [`SocketTables::take_new_scans`] reported.
    scans_taken: u64,
}

impl SocketTables {
    pub fn scans(&self) -> u64 {
        self.scans
    }

    /// Table reads since the last call (for the agent's counter).
    pub fn take_new_scans(&mut self) -> u64 {
        let new = self.scans - self.scans_taken;
        self.scans_taken = self.scans;
        new
    }

    /// The socket `fd` of `pid` is: one readlink for the fd, one for the namespace, and a read
    /// of the namespace's tables when they do not list it and were read `max_age` ago or more.
    pub fn lookup_fd(&mut self, pid: u32, fd: i32, max_age: Duration) -> Lookup {
        let Some(inode) = socket_inode(pid, fd) else {
            return Lookup::NotTcp;
        };
        let Some(namespace) = network_namespace(pid) else {
            return Lookup::NotTcp;
        };
        self.lookup_inode(pid, namespace, inode, max_age)
    }

    /// The socket of inode `inode` in network namespace `namespace` (that of `pid`).
    pub fn lookup_inode(
        &mut self,
        pid: u32,
        namespace: u64,
        inode: u64,
        max_age: Duration,
    ) -> Lookup {
        let now = Instant::now();
        if let Some(table) = self.namespaces.get(&namespace) {
            if let Some(socket) = table.by_inode.get(&inode) {
                return Lookup::Tcp(*socket);
            }
            if now.duration_since(table.read_at) < max_age {
                return Lookup::NotYet;
            }
        }
        let Some(by_inode) = read_tables(pid) else {
            return Lookup::NotTcp;
        };
        self.scans += 1;
        self.namespaces
            .retain(|_, table| now.duration_since(table.read_at) < FORGET_NAMESPACE_AFTER);
        let found = by_inode.get(&inode).copied();
        self.namespaces.insert(
            namespace,
            NamespaceTable {
                read_at: now,
                by_inode,
            },
        );
        match found {
            Some(socket) => Lookup::Tcp(socket),
            None => Lookup::NotTcp,
        }
    }
}

/// The TCP sockets (IPv4 and IPv6) of `pid`'s network namespace, by inode. None if the process
/// is gone.
fn read_tables(pid: u32) -> Option<FxHashMap<u64, TcpSocket>> {
    let process = procfs::process::Process::new(pid as i32).ok()?;
    let v4 = process.tcp().ok()?;
    let v6 = process.tcp6().unwrap_or_default();
    Some(
        v4.into_iter()
            .chain(v6)
            .map(|entry| {
                let socket = TcpSocket {
                    local: entry.local_address,
                    remote: entry.remote_address,
                    listening: entry.state == procfs::net::TcpState::Listen,
                };
                (entry.inode, socket)
            })
            .collect(),
    )
}

/// `socket:[12345]` → 12345; None for anything else (a file, a pipe, a closed fd).
fn socket_inode(pid: u32, fd: i32) -> Option<u64> {
    link_number(&format!("/proc/{pid}/fd/{fd}"), "socket:[")
}

/// The inode of the process's network namespace (`net:[4026531840]`).
pub fn network_namespace(pid: u32) -> Option<u64> {
    link_number(&format!("/proc/{pid}/ns/net"), "net:[")
}

fn link_number(link: &str, prefix: &str) -> Option<u64> {
    let target = std::fs::read_link(Path::new(link)).ok()?;
    parse_link_number(target.to_str()?, prefix)
}

fn parse_link_number(target: &str, prefix: &str) -> Option<u64> {
    target.strip_prefix(prefix)?.strip_suffix(']')?.parse().ok()
}

/// The socket fds of a process and their inodes: one directory read and one readlink per fd.
pub fn socket_fds(pid: u32) -> Vec<(i32, u64)> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            Some((fd, parse_link_number(target.to_str()?, "socket:[")?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd,
    };

    use super::*;

    #[test]
    fn parses_fd_and_namespace_links() {
        assert_eq!(parse_link_number("socket:[12345]", "socket:["), Some(12345));
        assert_eq!(
            parse_link_number("net:[4026531840]", "net:["),
            Some(4026531840)
        );
        for other in [
            "pipe:[12]",
            "/dev/null",
            "socket:[12",
            "socket:[x]",
            "anon_inode:[eventfd]",
        ] {
            assert_eq!(parse_link_number(other, "socket:["), None, "{other}");
        }
    }

    /// N connections of this process, resolved: one table read for all of them.
    #[test]
    fn one_table_read_resolves_every_socket_of_a_namespace() {
        let pid = std::process::id();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let clients: Vec<TcpStream> = (0..8)
            .map(|_| TcpStream::connect(listener.local_addr().unwrap()).unwrap())
            .collect();
        let servers: Vec<TcpStream> = clients
            .iter()
            .map(|_| listener.accept().unwrap().0)
            .collect();
        let mut tables = SocketTables::default();
        for stream in clients.iter().chain(&servers) {
            let found = tables.lookup_fd(pid, stream.as_raw_fd(), MIN_RESCAN_INTERVAL);
            assert_eq!(
                found,
                Lookup::Tcp(TcpSocket {
                    local: stream.local_addr().unwrap(),
                    remote: stream.peer_addr().unwrap(),
                    listening: false,
                })
            );
        }
        assert_eq!(
            tables.lookup_fd(pid, listener.as_raw_fd(), MIN_RESCAN_INTERVAL),
            Lookup::Tcp(TcpSocket {
                local: listener.local_addr().unwrap(),
                remote: "0.0.0.0:0".parse().unwrap(),
                listening: true,
            })
        );
        assert_eq!(tables.scans(), 1);
        // Not a socket: no table read.
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(
            tables.lookup_fd(pid, file.as_raw_fd(), MIN_RESCAN_INTERVAL),
            Lookup::NotTcp
        );
        assert_eq!(tables.scans(), 1);
    }

    /// A socket newer than the tables: not read again before the interval, read once after.
    #[test]
    fn a_socket_newer_than_the_tables_waits_for_the_next_read() {
        let pid = std::process::id();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tables = SocketTables::default();
        assert!(matches!(
            tables.lookup_fd(pid, listener.as_raw_fd(), MIN_RESCAN_INTERVAL),
            Lookup::Tcp(_)
        ));
        let newer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        for _ in 0..100 {
            assert_eq!(
                tables.lookup_fd(pid, newer.as_raw_fd(), Duration::from_secs(3600)),
                Lookup::NotYet
            );
        }
        assert_eq!(tables.scans(), 1, "no read within the interval");
        assert!(matches!(
            tables.lookup_fd(pid, newer.as_raw_fd(), Duration::ZERO),
            Lookup::Tcp(_)
        ));
        assert_eq!(tables.scans(), 2);
    }

    #[test]
    fn lists_this_process_socket_fds() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let fds = socket_fds(std::process::id());
        assert!(
            fds.iter().any(|&(fd, _)| fd == listener.as_raw_fd()),
            "{fds:?}"
        );
    }
}
