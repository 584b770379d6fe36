//! TLS libraries: which files of the selected processes hold OpenSSL's `SSL_read`/`SSL_write`,
//! and the uprobes on them.
//!
//! A uprobe is set on a file (its inode), not on a process: one attachment serves every process
//! that maps the library, now and later, and the kernel's pid filter keeps the unselected ones
//! out (ebpf/src/tls.rs). So each library file is examined and attached once, found in
//! `/proc/PID/maps` of a selected process: when it is selected, and when it maps a new
//! executable file (the `LibraryMapped` event: its libraries at start, a `dlopen` later).
//!
//! Candidates are the files named `libssl*` (Debian's libssl.so.3 and 1.1, used by python,
//! curl, nginx, kcat) and the process's own executable (OpenSSL linked in statically with its
//! symbols, like Node.js). A file without the symbols (BoringSSL inside grpcio's wheel, Go,
//! rustls) is remembered as such and never attached.

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeLink, UProbeLinkId, UProbeScope},
    },
};
use object::{Object, ObjectSection, ObjectSymbol};

/// The library functions kspan reads plaintext at: (symbol, entry program, return program).
/// `_ex` forms store their byte count behind a pointer (OpenSSL 1.1.1 and 3.x); the plain forms
/// return it.
pub const FUNCTIONS: &[(&str, &str, &str)] = &[
    ("SSL_write", "ssl_write_enter", "ssl_rw_exit"),
    ("SSL_read", "ssl_read_enter", "ssl_rw_exit"),
    ("SSL_write_ex", "ssl_write_ex_enter", "ssl_rw_ex_exit"),
    ("SSL_read_ex", "ssl_read_ex_enter", "ssl_rw_ex_exit"),
];

/// The uprobe programs of [`FUNCTIONS`], loaded with the tracepoints.
pub const PROGRAMS: &[&str] = &[
    "ssl_write_enter",
    "ssl_read_enter",
    "ssl_write_ex_enter",
    "ssl_read_ex_enter",
    "ssl_rw_exit",
    "ssl_rw_ex_exit",
];

/// A library file's identity: (device, inode). The same file reached through different paths
/// (a container's root, a symlink) is attached once.
type FileId = (u64, u64);

/// Where [`FUNCTIONS`] are in one file: (symbol, file offset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpensslFunctions {
    pub offsets: Vec<(&'static str, u64)>,
}

/// [`FUNCTIONS`] defined in the ELF file at `path`, at their file offsets (what a uprobe is set
/// at). None when `SSL_read` or `SSL_write` is missing: not an OpenSSL kspan can read. Reads
/// only the headers and symbol tables (Node.js's executable is 100 MB).
pub fn openssl_functions(path: &Path) -> Result<Option<OpensslFunctions>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache)
        .with_context(|| format!("{} is not an ELF file kspan can read", path.display()))?;
    let mut offsets = Vec::new();
    // The dynamic symbols (what a shared library exports), else the full table (an
    // executable that exports nothing but was not stripped).
    let mut symbols: Vec<_> = elf.dynamic_symbols().collect();
    if symbols.is_empty() {
        symbols = elf.symbols().collect();
    }
    for symbol in symbols {
        if !symbol.is_definition() {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        let Some(&(function, _, _)) = FUNCTIONS.iter().find(|(f, _, _)| *f == name) else {
            continue;
        };
        if offsets.iter().any(|(f, _)| *f == function) {
            continue;
        }
        let Some(index) = symbol.section_index() else {
            continue;
        };
        let section = elf.section_by_index(index)?;
        let Some((file_offset, _)) = section.file_range() else {
            continue;
        };
        let Some(offset) = symbol
            .address()
            .checked_sub(section.address())
            .and_then(|o| o.checked_add(file_offset))
        else {
            continue;
        };
        offsets.push((function, offset));
    }
    let has = |f: &str| offsets.iter().any(|(g, _)| *g == f);
    if !has("SSL_read") || !has("SSL_write") {
        return Ok(None);
    }
    offsets.sort_by_key(|(f, _)| FUNCTIONS.iter().position(|(g, _, _)| g == f));
    Ok(Some(OpensslFunctions { offsets }))
}

/// The executable file mappings of a process: (path as the process sees it, is its
/// executable), from `/proc/PID/maps` text. Each path once.
pub fn executable_mappings(maps: &str) -> Vec<&str> {
    let mut paths: Vec<&str> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let mut fields = line.splitn(6, ' ');
        let (Some(_), Some(perms), Some(_), Some(_), Some(_), Some(path)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let path = path.trim_start();
        if !perms.contains('x') || !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    paths
}

/// Whether a mapped file may hold OpenSSL: `libssl*`, or the process's executable.
fn is_candidate(path: &str, executable: Option<&Path>) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("libssl") || executable.is_some_and(|e| e == Path::new(path))
}

/// What one scan of a process found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// It maps a library whose TLS calls kspan reads.
    pub visible: bool,
    /// Library files newly attached by this scan.
    pub attached: u64,
}

/// A set of [`FUNCTIONS`], a bit per index.
type FunctionSet = u8;
const ALL_FUNCTIONS: FunctionSet = (1 << FUNCTIONS.len()) - 1;

fn function_bit(name: &str) -> FunctionSet {
    FUNCTIONS
        .iter()
        .position(|(f, _, _)| *f == name)
        .map_or(0, |i| 1 << i)
}

/// The [`FUNCTIONS`] the ELF file at `path` imports (undefined dynamic symbols): what a program
/// linked against libssl calls. Unreadable files import nothing.
pub fn openssl_imports(path: &Path) -> FunctionSet {
    let Ok(file) = File::open(path) else {
        return 0;
    };
    let cache = object::ReadCache::new(file);
    let Ok(elf) = object::File::parse(&cache) else {
        return 0;
    };
    elf.dynamic_symbols()
        .filter(|s| s.is_undefined())
        .filter_map(|s| s.name().ok())
        .fold(0, |set, name| set | function_bit(name))
}

/// One examined candidate file.
struct LibraryFile {
    /// Where its OpenSSL functions are; None: not an OpenSSL kspan reads.
    functions: Option<OpensslFunctions>,
    /// Of them, the ones attached.
    attached: FunctionSet,
}

/// The library files examined, and the uprobe links of those attached.
///
/// Each uprobe costs its detach a kernel grace period, serialized with every other perf event's
/// (`event_mutex`): ~75 ms here, and kspan's stop waits for them. So a shared libssl gets only
/// the functions the processes using it import (nginx and curl call `SSL_read`/`SSL_write`,
/// Python `SSL_read_ex`/`SSL_write_ex`): four uprobes rather than eight. A process importing
/// none of them while mapping libssl may look them up with `dlsym`: it gets all; so does
/// OpenSSL built into an executable, which calls them directly.
#[derive(Default)]
pub struct TlsProbes {
    files: HashMap<FileId, LibraryFile>,
    /// What each mapped file imports of [`FUNCTIONS`].
    imports: HashMap<FileId, FunctionSet>,
    pub links: Vec<(&'static str, UProbeLinkId)>,
    /// `--bench-floor`: the same uprobes, running programs that return at once.
    pub floor: bool,
}

impl TlsProbes {
    pub fn new(floor: bool) -> TlsProbes {
        TlsProbes {
            floor,
            ..Default::default()
        }
    }

    /// Looks at `pid`'s executable mappings; attaches to the OpenSSL functions it uses that
    /// are not attached yet. None: the process is gone (a zombie's maps are empty).
    pub fn scan(&mut self, ebpf: &mut Ebpf, pid: u32) -> Option<Scan> {
        let mut scan = Scan::default();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        if maps.is_empty() {
            return None;
        }
        let executable = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        // Each mapping as kspan reaches it (through the process's root: its container's files).
        let mapped: Vec<(&str, PathBuf, FileId)> = executable_mappings(&maps)
            .into_iter()
            .filter_map(|path| {
                let reachable = PathBuf::from(format!("/proc/{pid}/root{path}"));
                let meta = std::fs::metadata(&reachable).ok()?;
                Some((path, reachable, (meta.dev(), meta.ino())))
            })
            .collect();
        let mut imported: FunctionSet = 0;
        for (_, reachable, id) in &mapped {
            imported |= *self
                .imports
                .entry(*id)
                .or_insert_with(|| openssl_imports(reachable));
        }
        for (path, reachable, id) in &mapped {
            if !is_candidate(path, executable.as_deref()) {
                continue;
            }
            let in_executable = executable.as_deref() == Some(Path::new(path));
            let wanted = if in_executable || imported == 0 {
                ALL_FUNCTIONS
            } else {
                imported
            };
            let seen_from = format!("seen from pid {pid}");
            let (newly, visible) = self.attach_file(ebpf, path, reachable, *id, wanted, &seen_from);
            scan.attached += u64::from(newly);
            scan.visible |= visible;
        }
        Some(scan)
    }

    /// Attaches to the host's own libssl files (every function) before any process is looked
    /// at: a short-lived client selected at its exec (`--exe curl`) makes its first TLS calls
    /// within milliseconds of starting, before a look at its maps could attach. Containers'
    /// own copies are other files, attached when a selected process maps them. Returns the
    /// files newly attached.
    pub fn attach_host_libraries(&mut self, ebpf: &mut Ebpf) -> u64 {
        let mut attached = 0;
        for (path, reachable) in host_libssl_files() {
            let Ok(meta) = std::fs::metadata(&reachable) else {
                continue;
            };
            let id = (meta.dev(), meta.ino());
            let (newly, _) = self.attach_file(
                ebpf,
                &path,
                &reachable,
                id,
                ALL_FUNCTIONS,
                "the host's libssl",
            );
            attached += u64::from(newly);
        }
        attached
    }

    /// Examines the file once, then attaches the `wanted` functions it has that are not
    /// attached yet. Returns (attached for the first time now, attached at all).
    fn attach_file(
        &mut self,
        ebpf: &mut Ebpf,
        path: &str,
        reachable: &Path,
        id: FileId,
        wanted: FunctionSet,
        seen_from: &str,
    ) -> (bool, bool) {
        let file = self.files.entry(id).or_insert_with(|| LibraryFile {
            functions: openssl_functions(reachable).unwrap_or_else(|err| {
                log::debug!("TLS: {path} ({seen_from}) not examined: {err:#}");
                None
            }),
            attached: 0,
        });
        let Some(functions) = &file.functions else {
            return (false, false);
        };
        let mut newly = false;
        let missing = wanted & functions.set() & !file.attached;
        if missing != 0 {
            match attach(ebpf, reachable, functions, missing, self.floor) {
                Ok(links) => {
                    log::info!(
                        "TLS: uprobes attached to {path} ({}), {seen_from}",
                        functions.names(missing).join(", ")
                    );
                    newly = file.attached == 0;
                    file.attached |= missing;
                    self.links.extend(links);
                }
                Err(err) => {
                    log::warn!(
                        "TLS: cannot attach uprobes to {path} ({seen_from}): {err:#}; the TLS \
                         traffic of processes using it is not seen"
                    );
                    // Not tried again for every process that maps it.
                    file.functions = None;
                }
            }
        }
        (newly, file.attached != 0)
    }
}

/// Where the host's libssl is: the usual library directories of the host's root (pid 1's, so
/// that kspan in a container finds the node's), `libssl.so.N` files (not the `libssl.so`
/// development link, often the same file). (shown path, path kspan opens).
fn host_libssl_files() -> Vec<(String, PathBuf)> {
    const DIRS: [&str; 6] = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/lib/x86_64-linux-gnu",
        "/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
    ];
    let mut files = Vec::new();
    for dir in DIRS {
        // pid 1's root is out of reach in some sandboxes: kspan's own root then.
        let Some(entries) = [format!("/proc/1/root{dir}"), dir.to_string()]
            .iter()
            .find_map(|d| std::fs::read_dir(d).ok())
        else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if name.starts_with("libssl.so.") {
                files.push((format!("{dir}/{name}"), entry.path()));
            }
        }
    }
    files.sort();
    files
}

impl OpensslFunctions {
    fn set(&self) -> FunctionSet {
        self.offsets
            .iter()
            .fold(0, |set, (name, _)| set | function_bit(name))
    }

    fn names(&self, set: FunctionSet) -> Vec<&'static str> {
        self.offsets
            .iter()
            .filter(|(name, _)| set & function_bit(name) != 0)
            .map(|(name, _)| *name)
            .collect()
    }
}

/// One uprobe and one uretprobe per function of `set`; none if one fails (a library half
/// attached would report one direction only).
fn attach(
    ebpf: &mut Ebpf,
    path: &Path,
    functions: &OpensslFunctions,
    set: FunctionSet,
    floor: bool,
) -> Result<Vec<(&'static str, UProbeLinkId)>> {
    let mut links = Vec::new();
    for &(function, offset) in &functions.offsets {
        if set & function_bit(function) == 0 {
            continue;
        }
        let Some(&(_, enter, exit)) = FUNCTIONS.iter().find(|(f, _, _)| *f == function) else {
            continue;
        };
        let programs = if floor {
            ["floor_uprobe", "floor_uretprobe"]
        } else {
            [enter, exit]
        };
        for program in programs {
            let link = ebpf
                .program_mut(program)
                .with_context(|| format!("program {program} missing from the eBPF object"))
                .and_then(|p| Ok(<&mut UProbe>::try_from(p)?))
                .and_then(|uprobe| {
                    Ok(uprobe.attach(
                        UProbeAttachLocation::AbsoluteOffset(offset),
                        path,
                        UProbeScope::AllProcesses,
                    )?)
                })
                .with_context(|| format!("{function} ({program})"));
            match link {
                Ok(link) => links.push((program, link)),
                Err(err) => {
                    detach_links(ebpf, links);
                    return Err(err);
                }
            }
        }
    }
    Ok(links)
}

/// Detaches uprobe links (program name, link).
pub fn detach_links(ebpf: &mut Ebpf, links: Vec<(&'static str, UProbeLinkId)>) {
    for (program, id) in links {
        if let Some(uprobe) = ebpf
            .program_mut(program)
            .and_then(|p| <&mut UProbe>::try_from(p).ok())
        {
            let _ = uprobe.detach(id);
        }
    }
}

/// The links themselves, out of their programs: dropping one detaches it (each waits for a
/// grace period: the caller drops them in parallel).
pub fn take_links(ebpf: &mut Ebpf, links: Vec<(&'static str, UProbeLinkId)>) -> Vec<UProbeLink> {
    links
        .into_iter()
        .filter_map(|(program, id)| {
            ebpf.program_mut(program)
                .and_then(|p| <&mut UProbe>::try_from(p).ok())
                .and_then(|uprobe| uprobe.take_link(id).ok())
        })
        .collect()
}

/// Whether this kernel can set uprobes: the `uprobe` perf event source (CONFIG_UPROBE_EVENTS).
pub fn uprobes_available() -> bool {
    Path::new("/sys/bus/event_source/devices/uprobe/type").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_mappings_of_maps_text() {
        let maps = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 131 /usr/bin/python3.11
55d0c0a01000-55d0c0c00000 r-xp 00001000 08:01 131 /usr/bin/python3.11
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0 
7f1e2d000000-7f1e2d080000 r-xp 00020000 08:01 262 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1e2d100000-7f1e2d180000 r-xp 00020000 08:01 263 /usr/lib/with space/libx.so
7f1e2d200000-7f1e2d280000 r-xp 00020000 08:01 264 /tmp/gone.so (deleted)
7ffd1a000000-7ffd1a021000 rw-p 00000000 00:00 0                          [stack]
7ffd1a100000-7ffd1a102000 r-xp 00000000 00:00 0                          [vdso]
";
        assert_eq!(
            executable_mappings(maps),
            [
                "/usr/bin/python3.11",
                "/usr/lib/x86_64-linux-gnu/libssl.so.3",
                "/usr/lib/with space/libx.so"
            ]
        );
    }

    #[test]
    fn candidates_are_libssl_and_the_executable() {
        let exe = Path::new("/usr/bin/node");
        assert!(is_candidate(
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            Some(exe)
        ));
        assert!(is_candidate("/opt/app/lib/libssl.so.1.1", None));
        assert!(is_candidate("/usr/bin/node", Some(exe)));
        assert!(!is_candidate(
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            Some(exe)
        ));
        assert!(!is_candidate(
            "/usr/lib/x86_64-linux-gnu/libcrypto.so.3",
            Some(exe)
        ));
    }

    /// The system's libssl (Debian's OpenSSL 3, linked by python, curl, nginx and kcat here)
    /// has all four functions, at offsets inside the file; libc has none.
    #[test]
    fn finds_openssl_functions_in_the_system_libssl() {
        let libssl = find_library("libssl.so.3");
        let functions = openssl_functions(&libssl)
            .expect("readable ELF")
            .expect("libssl.so.3 exports SSL_read and SSL_write");
        let names: Vec<_> = functions.offsets.iter().map(|(f, _)| *f).collect();
        assert_eq!(
            names,
            ["SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex"]
        );
        let size = std::fs::metadata(&libssl).unwrap().len();
        for (function, offset) in &functions.offsets {
            assert!(*offset > 0 && *offset < size, "{function} at {offset:#x}");
        }
        let libc = find_library("libc.so.6");
        assert_eq!(openssl_functions(&libc).unwrap(), None);
    }

    /// What programs linked against libssl import: Python's `_ssl` module the `_ex` forms
    /// (Python 3.11), curl's libcurl the plain ones; libc none.
    #[test]
    fn imports_of_the_programs_linking_libssl() {
        let names = |set: FunctionSet| -> Vec<&str> {
            FUNCTIONS
                .iter()
                .filter(|(f, _, _)| set & function_bit(f) != 0)
                .map(|(f, _, _)| *f)
                .collect()
        };
        let libcurl = find_library("libcurl.so.4");
        assert_eq!(names(openssl_imports(&libcurl)), ["SSL_write", "SSL_read"]);
        assert_eq!(openssl_imports(&find_library("libc.so.6")), 0);
        assert_eq!(openssl_imports(Path::new("/nonexistent")), 0);
    }

    /// A library of this process, by file name, from its own maps.
    fn find_library(name: &str) -> PathBuf {
        // This test binary links libc; libssl is loaded for the occasion if it is not mapped.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        if let Some(path) = executable_mappings(&maps)
            .into_iter()
            .find(|p| p.rsplit('/').next() == Some(name))
        {
            return PathBuf::from(path);
        }
        for dir in [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/lib64",
            "/usr/lib",
        ] {
            let path = Path::new(dir).join(name);
            if path.exists() {
                return path;
            }
        }
        panic!("{name} not found: install libssl3 (Debian's OpenSSL 3)");
    }
}
