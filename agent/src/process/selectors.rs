//! Which processes to trace: `--pid`, `--exe`, `--port`, OR-ed together; none means all.

use std::path::Path;

use anyhow::{Context, Result};

#[derive(Clone, Debug)]
enum ExePattern {
    /// No '/': matched (as a glob) against the executable's file name, e.g. `curl`, `python3*`.
    FileName(glob::Pattern),
    /// Contains '/': a glob on the full path, e.g. `/usr/bin/*`, `/opt/**/server`.
    FullPath(glob::Pattern),
}

#[derive(Clone, Debug, Default)]
pub struct Selectors {
    pub pids: Vec<u32>,
    exes: Vec<ExePattern>,
    pub ports: Vec<u16>,
}

impl Selectors {
    pub fn new(pids: Vec<u32>, exes: &[String], ports: Vec<u16>) -> Result<Self> {
        let exes = exes
            .iter()
            .map(|exe| {
                let pattern = glob::Pattern::new(exe)
                    .with_context(|| format!("--exe {exe:?} is not a valid glob"))?;
                Ok(if exe.contains('/') {
                    ExePattern::FullPath(pattern)
                } else {
                    ExePattern::FileName(pattern)
                })
            })
            .collect::<Result<_>>()?;
        Ok(Selectors { pids, exes, ports })
    }

    /// No selector: every process except kspan itself is traced.
    pub fn trace_all(&self) -> bool {
        self.pids.is_empty() && self.exes.is_empty() && self.ports.is_empty()
    }

    /// `--exe` values that are plain file names (no glob characters, no '/'): these can be
    /// matched in the kernel at exec, before the new program runs.
    pub fn plain_exe_names(&self) -> Vec<String> {
        self.exes
            .iter()
            .filter_map(|e| match e {
                ExePattern::FileName(p) if !p.as_str().contains(['*', '?', '[', ']']) => {
                    Some(p.as_str().to_string())
                }
                _ => None,
            })
            .collect()
    }

    pub fn has_exe_selectors(&self) -> bool {
        !self.exes.is_empty()
    }

    pub fn matches_pid(&self, pid: u32) -> bool {
        self.pids.contains(&pid)
    }

    pub fn matches_port(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }

    pub fn matches_exe(&self, exe: &Path) -> bool {
        let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let full = exe.to_str().unwrap_or("");
        self.exes.iter().any(|pattern| match pattern {
            ExePattern::FileName(p) => p.matches(name),
            ExePattern::FullPath(p) => p.matches(full),
        })
    }

    /// For the ready line and logs.
    pub fn describe(&self) -> String {
        if self.trace_all() {
            return "all processes".to_string();
        }
        let mut parts = Vec::new();
        parts.extend(self.pids.iter().map(|p| format!("pid {p}")));
        parts.extend(self.exes.iter().map(|e| match e {
            ExePattern::FileName(p) | ExePattern::FullPath(p) => format!("exe {}", p.as_str()),
        }));
        parts.extend(self.ports.iter().map(|p| format!("port {p}")));
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exe_matches_file_name_or_full_path_glob() {
        let s = Selectors::new(
            vec![],
            &["curl".into(), "python3*".into(), "/opt/*/server".into()],
            vec![],
        )
        .unwrap();
        assert!(s.matches_exe(Path::new("/usr/bin/curl")));
        assert!(!s.matches_exe(Path::new("/usr/bin/curlx")));
        assert!(s.matches_exe(Path::new("/usr/bin/python3.11")));
        assert!(s.matches_exe(Path::new("/opt/app/server")));
        assert!(!s.matches_exe(Path::new("/srv/app/server")));
        assert!(!s.trace_all());
        assert_eq!(s.plain_exe_names(), ["curl"]);
    }

    #[test]
    fn no_selector_traces_all() {
        let s = Selectors::new(vec![], &[], vec![]).unwrap();
        assert!(s.trace_all());
        assert_eq!(s.describe(), "all processes");
        assert!(Selectors::new(vec![], &["[".into()], vec![]).is_err());
    }
}
