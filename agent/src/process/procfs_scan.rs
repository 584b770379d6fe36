//! procfs reads of a process, done once per process (at start, at exec, at LISTEN) and never per
//! event. Its sockets: see `socket_tables`.

use std::path::{Path, PathBuf};

use procfs::process::Process;

/// Executable path; "(deleted)" suffix removed (an upgraded binary still running).
pub fn exe_path(pid: u32) -> Option<PathBuf> {
    let exe = Process::new(pid as i32).ok()?.exe().ok()?;
    let text = exe.to_string_lossy();
    Some(match text.strip_suffix(" (deleted)") {
        Some(stripped) => PathBuf::from(stripped),
        None => exe,
    })
}

/// Values of several environment variables of the process, as it was at exec, from one read
/// of its environment: `let [a, b] = environment_variables(pid, ["A", "B"]);`.
pub fn environment_variables<const N: usize>(pid: u32, names: [&str; N]) -> [Option<String>; N] {
    let environ = Process::new(pid as i32).ok().and_then(|p| p.environ().ok());
    names.map(|name| {
        environ
            .as_ref()?
            .get(std::ffi::OsStr::new(name))
            .map(|v| v.to_string_lossy().into_owned())
    })
}

/// The command line, arguments joined by spaces (NULs between them in procfs).
pub fn command_line(pid: u32) -> Option<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    Some(text.trim_end_matches('\0').replace('\0', " "))
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
    use super::*;

    #[test]
    fn finds_this_process_exe_and_parent() {
        assert!(exe_path(std::process::id()).is_some());
        assert_eq!(
            parent_pid(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
    }
}
