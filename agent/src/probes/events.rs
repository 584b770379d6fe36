//! Decoding of ring-buffer records into typed events, without copying the captured bytes.

use kspan_common::{
    COMM_LEN, EVENT_HEADER_LEN, EXEC_PATH_LEN, EventHeader, EventKind, ExecEvent, SocketEvent,
    SocketTuple,
};

use crate::protocols::Direction;

#[derive(Debug)]
pub enum Event<'a> {
    /// Bytes moved on a tracked socket.
    Data {
        header: EventHeader,
        direction: Direction,
        /// The captured prefix.
        data: &'a [u8],
        /// The syscall's last bytes, if captured (see `EventHeader::tail_len`).
        tail: &'a [u8],
    },
    /// A socket started being tracked (Connect, Accept) or went to LISTEN (Listen).
    Socket {
        kind: EventKind,
        header: EventHeader,
        tuple: SocketTuple,
    },
    Close(EventHeader),
    /// `comm`: the new program's name (NUL padded), as the kernel has it. `path`: the path it
    /// was executed by, as given to execve; empty when the kernel could not copy it or it may
    /// have been cut (it filled the event's buffer).
    Exec {
        header: EventHeader,
        comm: [u8; COMM_LEN],
        path: &'a [u8],
    },
    Exit(EventHeader),
    /// A traced process mapped an executable file (a library).
    LibraryMapped(EventHeader),
    /// The TLS plaintext thread `tid` wrote before its socket was known belongs to this socket
    /// (`fd`, `conn_id`).
    TlsBound(EventHeader),
}

fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; T is a plain #[repr(C)] type valid for any bit pattern.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// None for a record that does not decode (unknown kind, too short): the caller counts it.
pub fn decode(record: &[u8]) -> Option<Event<'_>> {
    let header: EventHeader = read(record)?;
    let kind = EventKind::from_u32(header.kind)?;
    Some(match kind {
        EventKind::Data => {
            let copied =
                record.get(EVENT_HEADER_LEN..EVENT_HEADER_LEN + header.copied_len as usize)?;
            if header.copied_len as u64 > header.full_len || header.tail_len > header.copied_len {
                return None;
            }
            let (data, tail) = copied.split_at((header.copied_len - header.tail_len) as usize);
            let direction = match header.direction {
                kspan_common::DIRECTION_INGRESS => Direction::Ingress,
                kspan_common::DIRECTION_EGRESS => Direction::Egress,
                _ => return None,
            };
            Event::Data {
                header,
                direction,
                data,
                tail,
            }
        }
        EventKind::Connect | EventKind::Accept | EventKind::Listen => {
            let event: SocketEvent = read(record)?;
            Event::Socket {
                kind,
                header,
                tuple: event.tuple,
            }
        }
        EventKind::Close => Event::Close(header),
        EventKind::Exec => {
            let event: ExecEvent = read(record)?;
            let path_at = std::mem::offset_of!(ExecEvent, path);
            let path = &record[path_at..path_at + EXEC_PATH_LEN];
            let path = match path.iter().position(|&b| b == 0) {
                // A path that fills the buffer up to its NUL may be cut: no path is better
                // than a wrong one.
                Some(end) if end < EXEC_PATH_LEN - 1 => &path[..end],
                _ => &[],
            };
            Event::Exec {
                header,
                comm: event.comm,
                path,
            }
        }
        EventKind::Exit => Event::Exit(header),
        EventKind::LibraryMapped => Event::LibraryMapped(header),
        EventKind::TlsBound => Event::TlsBound(header),
    })
}

/// Raw bytes of an Exec event, as the kernel writes them (for tests).
pub fn encode_exec(header: &EventHeader, comm: &str, path: &[u8]) -> Vec<u8> {
    let mut event = ExecEvent {
        header: *header,
        comm: kspan_common::comm_key(comm),
        path: [0; EXEC_PATH_LEN],
    };
    let n = path.len().min(EXEC_PATH_LEN);
    event.path[..n].copy_from_slice(&path[..n]);
    // SAFETY: ExecEvent is #[repr(C)] plain data without padding.
    unsafe {
        std::slice::from_raw_parts(
            (&event as *const ExecEvent).cast::<u8>(),
            size_of::<ExecEvent>(),
        )
    }
    .to_vec()
}

/// Raw bytes of an event, as the kernel writes them (for tests and benchmarks).
pub fn encode_data(header: &EventHeader, data: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(EVENT_HEADER_LEN + data.len());
    // SAFETY: EventHeader is #[repr(C)] plain data without padding.
    record.extend_from_slice(unsafe {
        std::slice::from_raw_parts(
            (header as *const EventHeader).cast::<u8>(),
            EVENT_HEADER_LEN,
        )
    });
    record.extend_from_slice(data);
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_data_and_rejects_inconsistent_records() {
        let header = EventHeader {
            kind: EventKind::Data as u32,
            pid: 7,
            fd: 3,
            full_len: 10,
            copied_len: 5,
            direction: kspan_common::DIRECTION_EGRESS,
            ..Default::default()
        };
        let mut record = encode_data(&header, b"hello");
        // Ring records are padded to 8 bytes; padding must not become data.
        record.extend_from_slice(&[0, 0, 0]);
        match decode(&record) {
            Some(Event::Data {
                direction, data, ..
            }) => {
                assert_eq!(direction, Direction::Egress);
                assert_eq!(data, b"hello");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            decode(&record[..EVENT_HEADER_LEN + 2]).is_none(),
            "short body"
        );
        assert!(decode(&record[..10]).is_none(), "short header");
        let bad_kind = EventHeader { kind: 99, ..header };
        assert!(decode(&encode_data(&bad_kind, b"")).is_none());
        let copied_past_full = EventHeader {
            full_len: 2,
            ..header
        };
        assert!(decode(&encode_data(&copied_past_full, b"hello")).is_none());
    }

    #[test]
    fn decodes_the_exec_path_up_to_its_nul_and_drops_a_cut_one() {
        let header = EventHeader {
            kind: EventKind::Exec as u32,
            pid: 7,
            ..Default::default()
        };
        let exec = |path: &[u8]| match decode(&encode_exec(&header, "curl", path)) {
            Some(Event::Exec { comm, path, .. }) => {
                assert_eq!(&comm[..5], b"curl\0");
                path.to_vec()
            }
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(exec(b"/usr/bin/curl"), b"/usr/bin/curl");
        assert_eq!(exec(b""), b"", "the kernel's copy failed");
        let longest = vec![b'a'; EXEC_PATH_LEN - 2];
        assert_eq!(
            exec(&longest),
            longest,
            "fits with its NUL and a byte to spare"
        );
        assert_eq!(exec(&[b'a'; EXEC_PATH_LEN - 1]), b"", "filled: maybe cut");
        assert_eq!(exec(&[b'a'; EXEC_PATH_LEN]), b"", "no NUL at all");
        let record = encode_exec(&header, "curl", b"/bin/x");
        assert!(
            decode(&record[..record.len() - 1]).is_none(),
            "short record"
        );
    }
}
