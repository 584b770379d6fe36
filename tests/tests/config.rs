//! End-to-end tests of the configuration file and its discovery rules: include rules whose
//! fields AND together, flags winning over the file, errors naming the file, line and key,
//! SIGHUP rereading the rules, and the default excludes (OpenTelemetry collectors).
//!
//! Needs root, BTF and tracefs (see `kspan_e2e::preflight`), the kspan binary, python3 and curl.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use kspan_e2e::*;
use serde_json::Value;

/// A config file in a directory of its own, removed at the end.
struct ConfigFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ConfigFile {
    fn new(name: &str, text: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!("kspan-e2e-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the config directory");
        let path = dir.join("kspan.yaml");
        let file = ConfigFile { dir, path };
        file.write(text);
        file
    }

    fn write(&self, text: &str) {
        // Written aside then renamed, as a ConfigMap update is: never read half written.
        let next = self.dir.join("kspan.yaml.next");
        std::fs::write(&next, text).expect("write the config file");
        std::fs::rename(&next, &self.path).expect("replace the config file");
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temp path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn paths(spans: &[&Value]) -> Vec<String> {
    let mut paths: Vec<String> = spans
        .iter()
        .map(|s| attr_str(s, "url.path").unwrap_or("?").to_string())
        .collect();
    paths.sort();
    paths
}

/// Waits (bounded) until kspan's stderr has a line containing `needle`; returns that line.
fn wait_for_stderr(kspan: &mut Kspan, needle: &str) -> String {
    let deadline = Instant::now() + scaled(10);
    loop {
        if let Some(line) = kspan.stderr_so_far().lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        kspan.assert_running();
        assert!(
            Instant::now() < deadline,
            "kspan did not print {needle:?} within {:?}\n--- kspan stderr ---\n{}",
            scaled(10),
            kspan.stderr_so_far()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn sighup(kspan: &Kspan) {
    let rc = unsafe { libc::kill(kspan.pid() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill(SIGHUP): {}", std::io::Error::last_os_error());
}

/// An include rule with two fields selects the process that has both: the python server on the
/// rule's port is traced, a second python server on another port is not, nor is curl.
#[test]
fn a_rule_selects_the_processes_matching_all_its_fields() {
    let _env = preflight();
    let mut wanted = PyServer::start(Some("cfg-wanted"));
    let mut other = PyServer::start(Some("cfg-other"));
    let config = ConfigFile::new(
        "and",
        &format!(
            "# the python server on one port only\n\
             discovery:\n  include:\n    - exe: \"{}\"\n      port: {}\n",
            python_exe_name(),
            wanted.port
        ),
    );
    let kspan = Kspan::start(&["--config", config.path()]);
    curl(&[&wanted.url("/wanted")]);
    curl(&[&other.url("/other")]);
    let run = kspan.stop();
    wanted.assert_alive();
    other.assert_alive();
    assert_clean_run(&run);
    let servers = by_pid(&run.spans, wanted.pid);
    assert_eq!(paths(&servers), ["/wanted"], "{}", run.dump());
    assert_eq!(servers[0]["kind"], "SERVER", "{}", run.dump());
    assert_eq!(res_str(servers[0], "service.name"), Some("cfg-wanted"));
    assert_eq!(
        run.spans.len(),
        1,
        "only the selected server's span\n{}",
        run.dump()
    );
    assert!(
        run.stderr.contains(&format!(
            "tracing exe {} and port {}; excluding exe kspan",
            python_exe_name(),
            wanted.port
        )),
        "the ready line describes the rules\n{}",
        run.stderr
    );
}

/// `--port` replaces the file's include rules, and `--output json` (added by the harness) wins
/// over the file's `output: text`.
#[test]
fn flags_win_over_the_file() {
    let _env = preflight();
    let mut server = PyServer::start(Some("cfg-flags"));
    let config = ConfigFile::new(
        "flags",
        "output: text\ndiscovery:\n  include:\n    - exe: no-such-program-kspan-e2e\n",
    );
    let kspan = Kspan::start(&[
        "--config",
        config.path(),
        "--port",
        &server.port.to_string(),
    ]);
    curl(&[&server.url("/flagged")]);
    let run = kspan.stop();
    server.assert_alive();
    assert_clean_run(&run);
    assert_eq!(
        paths(&by_pid(&run.spans, server.pid)),
        ["/flagged"],
        "{}",
        run.dump()
    );
}

/// A config file with a mistake stops kspan before it loads anything, naming the file, the line
/// and the key; KSPAN_CONFIG names the file as --config does.
#[test]
fn a_mistake_in_the_file_names_the_file_line_and_key() {
    let _env = preflight();
    let config = ConfigFile::new(
        "mistake",
        "output: json\ndiscovery:\n  include:\n    - exe: nginx\n      prot: 80\n",
    );
    let bad_value = ConfigFile::new("bad-value", "capture:\n  bytes: 4096\n  ring_mib: 3\n");
    let run = |args: &[&str], env: Option<&Path>| {
        let mut cmd = Command::new(kspan_bin());
        cmd.args(args).env_remove("KSPAN_CONFIG");
        if let Some(path) = env {
            cmd.env("KSPAN_CONFIG", path);
        }
        let out = cmd.output().expect("run kspan");
        assert!(!out.status.success(), "kspan accepted a bad config file");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for stderr in [
        run(&["--config", config.path()], None),
        run(&[], Some(&config.path)),
    ] {
        for needle in [
            config.path(),
            "discovery.include[0]",
            "unknown field `prot`",
            "line 5",
        ] {
            assert!(
                stderr.contains(needle),
                "{needle:?} missing from:\n{stderr}"
            );
        }
    }
    let stderr = run(&["--config", bad_value.path()], None);
    for needle in [
        bad_value.path(),
        "capture.ring_mib",
        "3 is not a power of two",
        "line 3",
    ] {
        assert!(
            stderr.contains(needle),
            "{needle:?} missing from:\n{stderr}"
        );
    }
}

/// SIGHUP rereads the rules: a server not selected at start is traced after the file selects
/// it; a file broken afterwards leaves the running rules in place; the probes stay attached
/// throughout (one kspan run).
#[test]
fn sighup_rereads_the_rules() {
    let _env = preflight();
    let mut server = PyServer::start(Some("cfg-sighup"));
    let config = ConfigFile::new(
        "sighup",
        "discovery:\n  include:\n    - exe: no-such-program-kspan-e2e\n",
    );
    let mut kspan = Kspan::start(&["--config", config.path()]);
    curl(&[&server.url("/before")]);

    config.write(&format!(
        "discovery:\n  include:\n    - port: {}\n",
        server.port
    ));
    sighup(&kspan);
    let line = wait_for_stderr(&mut kspan, "rules reread");
    assert!(line.contains("1 more processes"), "{line}");
    curl(&[&server.url("/after")]);

    config.write("discovery:\n  include:\n    - port: 80\n      exe: [\n");
    sighup(&kspan);
    let line = wait_for_stderr(&mut kspan, "the running discovery rules stay");
    assert!(line.contains(config.path()), "{line}");
    curl(&[&server.url("/still")]);

    let run = kspan.stop();
    server.assert_alive();
    assert_clean_run(&run);
    assert_eq!(
        paths(&by_pid(&run.spans, server.pid)),
        ["/after", "/still"],
        "{}",
        run.dump()
    );
}

/// With no include rule every process is traced but kspan and OpenTelemetry collectors: a
/// curl installed as `otelcol-e2e` makes no CLIENT span, the same curl under its own name
/// does, and the server answering both is traced.
#[test]
fn collectors_are_excluded_by_default() {
    let _env = preflight();
    let mut server = PyServer::start(Some("cfg-all"));
    let config = ConfigFile::new("excludes", "output: json\n");
    let collector = config.dir.join("otelcol-e2e");
    std::fs::copy(which("curl"), &collector).expect("copy curl");
    let kspan = Kspan::start(&["--config", config.path()]);
    let run_client = |program: &Path, path: &str| -> u32 {
        let mut child = Command::new(program)
            .args([
                "-q",
                "-sS",
                "-o",
                "/dev/null",
                "--max-time",
                "30",
                &server.url(path),
            ])
            .env_remove("http_proxy")
            .spawn()
            .expect("start the client");
        let pid = child.id();
        let status = child.wait().expect("wait for the client");
        assert!(status.success(), "{} {path}: {status}", program.display());
        pid
    };
    let excluded = run_client(&collector, "/from-collector");
    let plain = run_client(&which("curl"), "/from-curl");
    let run = kspan.stop();
    server.assert_alive();
    assert!(
        run.stderr
            .contains("tracing all processes; excluding exe kspan, exe otelcol*"),
        "{}",
        run.stderr
    );
    assert_eq!(
        paths(&by_pid(&run.spans, server.pid)),
        ["/from-collector", "/from-curl"],
        "{}",
        run.dump()
    );
    assert_eq!(by_pid(&run.spans, excluded).len(), 0, "{}", run.dump());
    let clients = by_pid(&run.spans, plain);
    assert_eq!(paths(&clients), ["/from-curl"], "{}", run.dump());
    assert_eq!(clients[0]["kind"], "CLIENT");
}
