//! procfs reads, done once per process (at start, at exec, at LISTEN) and never per event.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use procfs::{
    net::TcpState,
    process::{FDTarget, Process},
};

/// A TCP socket a process already had open when it came under tracing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenSocket {
    pub fd: i32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub listening: bool,
}

/// Every TCP socket (IPv4 and IPv6) the process has open, resolved through its own network
/// namespace's /proc/PID/net/tcp{,6}.
pub fn open_tcp_sockets(pid: u32) -> Vec<OpenSocket> {
    let Ok(process) = Process::new(pid as i32) else {
        return Vec::new();
    };
    let Ok(fds) = process.fd() else {
        return Vec::new();
    };
    let socket_fds: Vec<(i32, u64)> = fds
        .flatten()
        .filter_map(|fd| match fd.target {
            FDTarget::Socket(inode) => Some((fd.fd, inode)),
            _ => None,
        })
        .collect();
    if socket_fds.is_empty() {
        return Vec::new();
    }
    let mut by_inode = HashMap::new();
    for entry in process
        .tcp()
        .unwrap_or_default()
        .into_iter()
        .chain(process.tcp6().unwrap_or_default())
    {
        by_inode.insert(entry.inode, entry);
    }
    socket_fds
        .into_iter()
        .filter_map(|(fd, inode)| {
            let entry = by_inode.get(&inode)?;
            Some(OpenSocket {
                fd,
                local: entry.local_address,
                remote: entry.remote_address,
                listening: entry.state == TcpState::Listen,
            })
        })
        .collect()
}

/// Executable path; "(deleted)" suffix removed (an upgraded binary still running).
pub fn exe_path(pid: u32) -> Option<PathBuf> {
    let exe = Process::new(pid as i32).ok()?.exe().ok()?;
    let text = exe.to_string_lossy();
    Some(match text.strip_suffix(" (deleted)") {
        Some(stripped) => PathBuf::from(stripped),
        None => exe,
    })
}

/// Value of one environment variable of the process, as it was at exec.
pub fn environment_variable(pid: u32, name: &str) -> Option<String> {
    let environ = Process::new(pid as i32).ok()?.environ().ok()?;
    environ
        .get(std::ffi::OsStr::new(name))
        .map(|v| v.to_string_lossy().into_owned())
}

pub fn parent_pid(pid: u32) -> Option<u32> {
    let ppid = Process::new(pid as i32).ok()?.stat().ok()?.ppid;
    u32::try_from(ppid).ok()
}

pub fn command_name(pid: u32) -> Option<String> {
    Some(Process::new(pid as i32).ok()?.stat().ok()?.comm)
}

pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn finds_this_process_listening_socket_and_exe() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sockets = open_tcp_sockets(std::process::id());
        let found = sockets
            .iter()
            .find(|s| s.local.port() == port)
            .expect("own listening socket");
        assert!(found.listening);
        assert!(exe_path(std::process::id()).is_some());
        assert_eq!(
            parent_pid(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
    }
}
