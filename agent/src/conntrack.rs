//! Connection tracking: one entry per tracked TCP socket, keyed by (pid, fd), carrying the exact
//! addresses and the protocol parser state of that connection.

use rustc_hash::FxHashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;

use kspan_common::{AF_INET, SocketTuple};

use crate::{
    linker::ConnectionLinks,
    protocols::{self, Direction, ParserContext, ProtocolParser, Registration, SharedState},
};

/// How many chunks with data a connection gets to look like a known protocol before it is
/// muted (a connection joined mid-stream may start inside a body).
const DETECTION_ATTEMPTS: u8 = 4;

#[derive(Debug)]
pub enum ProtocolState {
    Undetected {
        attempts: u8,
    },
    Parsing {
        protocol: &'static Registration,
        parser: Box<dyn ProtocolParser>,
    },
    /// Not a protocol kspan parses, or one its parser gave up on: muted in the kernel (its
    /// bytes are no longer copied).
    Muted,
}

/// What detection decided for a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Detection {
    /// Nothing changed (still undetected and trying, or decided before).
    Unchanged,
    /// This chunk started a protocol.
    Detected(&'static str),
    /// No protocol claimed the connection's first chunks: mute it.
    GaveUp,
}

impl ProtocolState {
    /// Called for a chunk with data while undetected: pick a parser or give up after a few tries.
    pub fn detect(
        &mut self,
        data: &[u8],
        direction: Direction,
        pid: u32,
        shared: &Rc<SharedState>,
    ) -> Detection {
        let ProtocolState::Undetected { attempts } = self else {
            return Detection::Unchanged;
        };
        if let Some(protocol) = protocols::detect(data, direction) {
            *self = ProtocolState::Parsing {
                protocol,
                parser: (protocol.new_parser)(&ParserContext {
                    pid,
                    shared: Rc::clone(shared),
                }),
            };
            Detection::Detected(protocol.name)
        } else if *attempts + 1 >= DETECTION_ATTEMPTS {
            *self = ProtocolState::Muted;
            Detection::GaveUp
        } else {
            *attempts += 1;
            Detection::Unchanged
        }
    }

    /// The protocol this connection speaks, once detected.
    pub fn protocol(&self) -> Option<&'static Registration> {
        match self {
            ProtocolState::Parsing { protocol, .. } => Some(protocol),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct Connection {
    /// Identity within (pid, fd), from the kernel: fds are reused, (pid, fd, conn_id) is not.
    pub conn_id: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Seen from its connect/accept (not joined mid-stream): its request count is exact.
    pub from_start: bool,
    pub protocol: ProtocolState,
    /// Span nodes of requests in flight (trace-context linking).
    pub links: ConnectionLinks,
    /// Heap bytes its parser held after its last chunk (counted in the pipeline's budget).
    pub parser_memory: usize,
    /// Kernel time of the first chunk of the partial message its parser holds (0: none).
    pub partial_since_ns: u64,
    /// TLS: its protocol bytes are the plaintext of its TLS library calls.
    pub tls: bool,
    /// Some of that plaintext has come.
    pub tls_plaintext: bool,
}

impl Connection {
    pub fn new(conn_id: u64, local: SocketAddr, remote: SocketAddr, from_start: bool) -> Self {
        Connection {
            conn_id,
            local,
            remote,
            from_start,
            protocol: ProtocolState::Undetected { attempts: 0 },
            links: ConnectionLinks::default(),
            parser_memory: 0,
            partial_since_ns: 0,
            tls: false,
            tls_plaintext: false,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct TableFull;

/// Tracked connections, grouped per process so a process exit drops its entries at once.
pub struct ConnTable {
    by_pid: FxHashMap<u32, FxHashMap<i32, Connection>>,
    len: usize,
    capacity: usize,
}

impl ConnTable {
    pub fn new(capacity: usize) -> Self {
        ConnTable {
            by_pid: FxHashMap::default(),
            len: 0,
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start tracking. Err when the table is full (the connection is dropped); a connection that
    /// was still registered on this (pid, fd) (its close was lost) is returned as Ok(Some).
    pub fn insert(
        &mut self,
        pid: u32,
        fd: i32,
        connection: Connection,
    ) -> Result<Option<Connection>, TableFull> {
        let per_process = self.by_pid.entry(pid).or_default();
        if !per_process.contains_key(&fd) && self.len >= self.capacity {
            if per_process.is_empty() {
                self.by_pid.remove(&pid);
            }
            return Err(TableFull);
        }
        let previous = per_process.insert(fd, connection);
        if previous.is_none() {
            self.len += 1;
        }
        Ok(previous)
    }

    pub fn get_mut(&mut self, pid: u32, fd: i32) -> Option<&mut Connection> {
        self.by_pid.get_mut(&pid)?.get_mut(&fd)
    }

    pub fn remove(&mut self, pid: u32, fd: i32) -> Option<Connection> {
        let per_process = self.by_pid.get_mut(&pid)?;
        let removed = per_process.remove(&fd);
        if per_process.is_empty() {
            self.by_pid.remove(&pid);
        }
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, i32, &mut Connection)> {
        self.by_pid
            .iter_mut()
            .flat_map(|(&pid, fds)| fds.iter_mut().map(move |(&fd, c)| (pid, fd, c)))
    }

    /// Every connection of a process, removed from the table.
    pub fn remove_process(&mut self, pid: u32) -> Vec<(i32, Connection)> {
        let removed: Vec<_> = self
            .by_pid
            .remove(&pid)
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        self.len -= removed.len();
        removed
    }
}

/// Local and remote addresses of a kernel socket tuple. IPv4-mapped IPv6 addresses
/// (::ffff:a.b.c.d, what a dual-stack socket reports for an IPv4 peer) become IPv4.
pub fn tuple_addresses(tuple: &SocketTuple) -> (SocketAddr, SocketAddr) {
    let ip = |bytes: &[u8; 16]| -> IpAddr {
        if tuple.family == AF_INET {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        } else {
            unmap(IpAddr::V6(Ipv6Addr::from(*bytes)))
        }
    };
    (
        SocketAddr::new(ip(&tuple.local_addr), tuple.local_port),
        SocketAddr::new(ip(&tuple.remote_addr), tuple.remote_port),
    )
}

pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

pub fn unmap_socket(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(unmap(addr.ip()), addr.port())
}

#[cfg(test)]
mod tests {
    use kspan_common::AF_INET6;

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn tuples_decode_ipv4_ipv6_and_mapped() {
        let mut t = SocketTuple {
            family: AF_INET,
            local_port: 8080,
            remote_port: 40000,
            ..Default::default()
        };
        t.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        t.remote_addr[..4].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(
            tuple_addresses(&t),
            (addr("127.0.0.1:8080"), addr("10.1.2.3:40000"))
        );

        let mut t6 = SocketTuple {
            family: AF_INET6,
            local_port: 443,
            remote_port: 5000,
            ..Default::default()
        };
        t6.local_addr = "::1".parse::<Ipv6Addr>().unwrap().octets();
        t6.remote_addr = "::ffff:192.168.0.9".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(
            tuple_addresses(&t6),
            (addr("[::1]:443"), addr("192.168.0.9:5000"))
        );
    }

    #[test]
    fn table_is_bounded_and_fd_reuse_replaces() {
        let mut table = ConnTable::new(2);
        let c = |id| Connection::new(id, addr("127.0.0.1:1"), addr("127.0.0.1:2"), true);
        assert!(table.insert(1, 3, c(1)).unwrap().is_none());
        assert!(table.insert(1, 4, c(2)).unwrap().is_none());
        assert!(table.insert(2, 3, c(3)).is_err(), "full");
        // Same (pid, fd) again: the stale entry comes back, the size does not grow.
        let stale = table.insert(1, 3, c(4)).unwrap().unwrap();
        assert_eq!(stale.conn_id, 1);
        assert_eq!(table.len(), 2);
        assert_eq!(table.get_mut(1, 3).unwrap().conn_id, 4);
        assert_eq!(table.remove_process(1).len(), 2);
        assert!(table.is_empty());
        assert!(table.remove(1, 3).is_none());
    }

    #[test]
    fn detection_gives_up_after_a_few_chunks() {
        let shared = Rc::default();
        let mut state = ProtocolState::Undetected { attempts: 0 };
        for _ in 0..DETECTION_ATTEMPTS - 1 {
            let detection = state.detect(b"\x16\x03\x01 binary", Direction::Egress, 1, &shared);
            assert_eq!(detection, Detection::Unchanged);
            assert!(matches!(state, ProtocolState::Undetected { .. }));
        }
        let detection = state.detect(b"\x16\x03\x01 binary", Direction::Egress, 1, &shared);
        assert_eq!(detection, Detection::GaveUp);
        assert!(matches!(state, ProtocolState::Muted));
    }

    #[test]
    fn detection_picks_the_protocol_of_the_first_bytes() {
        let shared = Rc::default();
        let mut state = ProtocolState::Undetected { attempts: 0 };
        assert_eq!(
            state.detect(b"GET / HTTP/1.1\r\n", Direction::Ingress, 1, &shared),
            Detection::Detected("http1")
        );
        assert_eq!(state.protocol().map(|p| p.name), Some("http1"));
        let mut state = ProtocolState::Undetected { attempts: 0 };
        assert_eq!(
            state.detect(
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                Direction::Egress,
                1,
                &shared
            ),
            Detection::Detected("http2")
        );
    }
}
