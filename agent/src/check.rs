//! `kspan check`: what this kernel and these privileges allow, one line each, with what to do
//! about what is missing. Exit status 0 when kspan can run (usable as an init container).

use std::path::Path;

use crate::probes;

/// How a prerequisite stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// kspan cannot run without it.
    Missing,
    /// Not needed; said for the record (a missing optional feature, what kspan does not use).
    Info,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Missing => "MISSING",
            Verdict::Info => "info",
        }
    }
}

pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do, for a missing one.
    pub fix: Option<String>,
}

fn check(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check {
        name,
        verdict,
        detail: detail.into(),
        fix: None,
    }
}

fn missing(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name,
        verdict: Verdict::Missing,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// Runs every check, prints them, returns the exit status.
pub fn main() -> std::process::ExitCode {
    let checks = run_checks();
    print!("{}", report(&checks));
    if checks.iter().any(|c| c.verdict == Verdict::Missing) {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// One line per check; a missing one is followed by its fix.
pub fn report(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!(
            "{:<8} {:<20} {}\n",
            c.verdict.label(),
            c.name,
            c.detail
        ));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("{:<8} {:<20} fix: {fix}\n", "", ""));
        }
    }
    let missing = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Missing)
        .count();
    if missing == 0 {
        out.push_str("kspan can run here.\n");
    } else {
        out.push_str(&format!(
            "kspan cannot run here: {missing} prerequisite{} missing.\n",
            if missing == 1 { "" } else { "s" }
        ));
    }
    out
}

pub fn run_checks() -> Vec<Check> {
    let release = probes::kernel_release();
    let version = kernel_version(&release);
    vec![
        kernel(&release, version),
        privileges(),
        btf(),
        tracefs(),
        tracepoints(),
        uprobes(),
        ring_buffer(version),
        memlock(version),
        kprobes_and_fentry(),
        kubernetes_api(),
    ]
}

/// (major, minor) of a release string such as `6.1.0-28-amd64`.
pub fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn kernel(release: &str, version: (u32, u32)) -> Check {
    if version >= (5, 8) {
        check(
            "kernel",
            Verdict::Ok,
            format!("Linux {release} (5.8 or later needed)"),
        )
    } else {
        missing(
            "kernel",
            format!("Linux {release}"),
            "kspan needs Linux 5.8 or later (BPF ring buffer); 5.10, 6.1 and 6.12 are tested",
        )
    }
}

/// Effective capabilities of this process (`CapEff` in /proc/self/status).
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_capabilities(&status)
}

pub fn parse_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Which capabilities kspan lacks, by name, from an effective set.
pub fn lacking_capabilities(effective: u64) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut lacking = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        if !has(CAP_BPF) {
            lacking.push("CAP_BPF");
        }
        if !has(CAP_PERFMON) {
            lacking.push("CAP_PERFMON");
        }
    }
    if !has(CAP_SYS_PTRACE) {
        lacking.push("CAP_SYS_PTRACE");
    }
    if !has(CAP_DAC_READ_SEARCH) {
        lacking.push("CAP_DAC_READ_SEARCH");
    }
    lacking
}

fn privileges() -> Check {
    let Some(effective) = effective_capabilities() else {
        return missing(
            "privileges",
            "cannot read /proc/self/status",
            "mount /proc and run kspan as root",
        );
    };
    let lacking = lacking_capabilities(effective);
    let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok());
    let needs_admin = paranoid.is_some_and(|p| p > 2) && effective & (1 << CAP_SYS_ADMIN) == 0;
    if lacking.is_empty() && !needs_admin {
        return check(
            "privileges",
            Verdict::Ok,
            format!(
                "capabilities {effective:#x} (BPF, PERFMON or SYS_ADMIN, SYS_PTRACE, DAC_READ_SEARCH)"
            ),
        );
    }
    let mut detail = if lacking.is_empty() {
        String::new()
    } else {
        format!("lacking {}", lacking.join(", "))
    };
    if needs_admin {
        if !detail.is_empty() {
            detail.push_str("; ");
        }
        detail.push_str(&format!(
            "kernel.perf_event_paranoid is {} and CAP_SYS_ADMIN is absent",
            paranoid.unwrap_or(0)
        ));
    }
    missing(
        "privileges",
        detail,
        "run kspan as root (sudo kspan), or in a privileged container; with only CAP_BPF and \
         CAP_PERFMON, Debian kernels also want kernel.perf_event_paranoid ≤ 2",
    )
}

fn btf() -> Check {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    if !path.exists() {
        return missing(
            "BTF",
            "/sys/kernel/btf/vmlinux is missing",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (standard on current distribution \
             kernels)",
        );
    }
    match probes::btf::Btf::from_sys_fs().and_then(|btf| btf.kernel_offsets()) {
        Ok(_) => check(
            "BTF",
            Verdict::Ok,
            "/sys/kernel/btf/vmlinux has the task, file and socket fields kspan reads",
        ),
        Err(error) => missing(
            "BTF",
            format!("{error:#}"),
            "make /sys/kernel/btf/vmlinux readable (root); a kernel whose BTF lacks these \
             fields is not supported yet: report it with `uname -r`",
        ),
    }
}

fn tracefs() -> Check {
    let events = Path::new(probes::TRACEFS).join("events");
    // Not mounted: kspan mounts it at start when it may, so the check does the same.
    let absent =
        matches!(std::fs::read_dir(&events), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    if absent && let Err(error) = probes::mount_tracefs() {
        return missing(
            "tracefs",
            format!("{error:#}"),
            format!(
                "run as root, or mount it: `mount -t tracefs nodev {}`",
                probes::TRACEFS
            ),
        );
    }
    match std::fs::read_dir(&events) {
        Ok(_) if events.join("syscalls").exists() => check(
            "tracefs",
            Verdict::Ok,
            format!("{} has the syscall events", events.display()),
        ),
        Ok(_) => missing(
            "tracefs",
            format!("{} has no syscalls directory", events.display()),
            "use a kernel with CONFIG_FTRACE_SYSCALLS=y",
        ),
        Err(error) => missing(
            "tracefs",
            format!("cannot read {}: {error}", events.display()),
            format!(
                "run as root; if it is not mounted: `mount -t tracefs nodev {}` (kspan mounts \
                 it itself when it runs as root)",
                probes::TRACEFS
            ),
        ),
    }
}

fn tracepoints() -> Check {
    // Unreadable tracefs (reported above) says nothing of the layouts: not judged twice.
    if std::fs::read_dir(Path::new(probes::TRACEFS).join("events/syscalls")).is_err() {
        return missing(
            "syscall tracepoints",
            "not readable without tracefs (above)",
            "fix tracefs first",
        );
    }
    match probes::read_tracepoint_offsets() {
        Ok(_) => check(
            "syscall tracepoints",
            Verdict::Ok,
            format!(
                "{} tracepoints, field layouts as kspan reads them",
                probes::TRACEPOINT_COUNT
            ),
        ),
        Err(error) => missing(
            "syscall tracepoints",
            format!("{error:#}"),
            "run as root with tracefs mounted (above); a layout kspan does not know is a bug: \
             report it with `uname -r`",
        ),
    }
}

fn uprobes() -> Check {
    if probes::tls::uprobes_available() {
        check(
            "uprobes",
            Verdict::Ok,
            "available: TLS plaintext is read from OpenSSL",
        )
    } else {
        check(
            "uprobes",
            Verdict::Info,
            "unavailable (CONFIG_UPROBE_EVENTS off): TLS traffic will not be seen",
        )
    }
}

fn ring_buffer(version: (u32, u32)) -> Check {
    if version >= (5, 8) {
        check("ring buffer", Verdict::Ok, "BPF ring buffer (Linux 5.8+)")
    } else {
        missing(
            "ring buffer",
            "no BPF ring buffer before Linux 5.8",
            "use Linux 5.8 or later",
        )
    }
}

fn memlock(version: (u32, u32)) -> Check {
    if version >= (5, 11) {
        return check(
            "memlock",
            Verdict::Ok,
            "BPF memory is charged to the memory cgroup (Linux 5.11+), not RLIMIT_MEMLOCK",
        );
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    let text = if limit.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        format!("{} KiB", limit.rlim_cur / 1024)
    };
    // Before 5.11 BPF maps count against RLIMIT_MEMLOCK, unless the distribution kernel
    // backported memcg accounting: not known here, so said, not judged.
    check(
        "memlock",
        Verdict::Info,
        format!(
            "RLIMIT_MEMLOCK {text}; before Linux 5.11 BPF maps may be charged to it: if loading \
             fails with EPERM, `ulimit -l unlimited`"
        ),
    )
}

fn kprobes_and_fentry() -> Check {
    let tracefs = Path::new(probes::TRACEFS);
    let kprobes = tracefs.join("kprobe_events").exists();
    let functions = std::fs::read_to_string(tracefs.join("available_filter_functions"))
        .map(|text| text.lines().any(|l| l.starts_with("tcp_sendmsg ")))
        .unwrap_or(false);
    check(
        "kprobes / fentry",
        Verdict::Info,
        format!(
            "kprobes {}, tcp_sendmsg {} for fentry (kspan uses neither: tracepoints only)",
            if kprobes { "available" } else { "unavailable" },
            if functions {
                "traceable"
            } else {
                "not traceable"
            }
        ),
    )
}

fn kubernetes_api() -> Check {
    let (Ok(host), Ok(port)) = (
        std::env::var("KUBERNETES_SERVICE_HOST"),
        std::env::var("KUBERNETES_SERVICE_PORT"),
    ) else {
        return check(
            "Kubernetes API",
            Verdict::Info,
            "not in a pod (KUBERNETES_SERVICE_HOST unset): no pod metadata",
        );
    };
    let address = format!("{host}:{port}");
    let reached = std::net::ToSocketAddrs::to_socket_addrs(&address)
        .ok()
        .and_then(|mut addrs| addrs.next())
        .map(|addr| {
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).is_ok()
        })
        .unwrap_or(false);
    if reached {
        check(
            "Kubernetes API",
            Verdict::Ok,
            format!("{address} answers a TCP connection"),
        )
    } else {
        missing(
            "Kubernetes API",
            format!("{address} does not answer"),
            "check the pod's network policy and the API server; kspan traces on without pod \
             metadata meanwhile, but the DaemonSet expects it",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_from_releases() {
        assert_eq!(kernel_version("6.1.0-28-amd64"), (6, 1));
        assert_eq!(kernel_version("5.10.0-33-cloud-amd64"), (5, 10));
        assert_eq!(kernel_version("6.18.44-fc-v1147"), (6, 18));
        assert_eq!(kernel_version("garbage"), (0, 0));
    }

    #[test]
    fn capabilities_root_and_none() {
        let root = parse_capabilities("Name:\tkspan\nCapEff:\t000001ffffffffff\n").unwrap();
        assert!(lacking_capabilities(root).is_empty());
        assert_eq!(
            lacking_capabilities(0),
            vec![
                "CAP_BPF",
                "CAP_PERFMON",
                "CAP_SYS_PTRACE",
                "CAP_DAC_READ_SEARCH"
            ]
        );
        // CAP_SYS_ADMIN stands for CAP_BPF and CAP_PERFMON.
        let admin = (1 << CAP_SYS_ADMIN) | (1 << CAP_SYS_PTRACE) | (1 << CAP_DAC_READ_SEARCH);
        assert!(lacking_capabilities(admin).is_empty());
        assert_eq!(parse_capabilities("CapEff:\tzz\n"), None);
    }

    #[test]
    fn a_missing_check_fails_the_report_with_its_fix() {
        let checks = vec![
            check("kernel", Verdict::Ok, "Linux 6.1"),
            missing("tracefs", "cannot read", "mount it"),
            check("uprobes", Verdict::Info, "unavailable"),
        ];
        let text = report(&checks);
        assert!(text.contains("MISSING  tracefs"), "{text}");
        assert!(text.contains("fix: mount it"), "{text}");
        assert!(
            text.ends_with("kspan cannot run here: 1 prerequisite missing.\n"),
            "{text}"
        );
        let text = report(&checks[..1]);
        assert!(text.ends_with("kspan can run here.\n"), "{text}");
    }
}
