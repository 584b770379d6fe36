//! `cargo xtask vmtest-arm64`: the aarch64 build's HTTP/1 end-to-end smoke test in a QEMU guest
//! booting Debian's arm64 kernel, on this x86_64 host.
//!
//! Not part of `cargo xtask test`: under software emulation of another architecture the guest is
//! too slow for CI time. It reuses `vmtest`'s machinery (cache, lock, busybox init, console
//! scanning) with three differences:
//! - QEMU is qemu-system-aarch64 (Debian's qemu-system-arm, downloaded and extracted like
//!   vmtest's qemu-system-x86, never installed), booting the kernel's `Image` directly on the
//!   `virt` machine: no firmware.
//! - The guest's root is not the host's (x86_64) root but an arm64 Debian userland with python3
//!   and curl, made by `debootstrap --foreign`, shared read-only over 9p under a tmpfs overlay
//!   by the same init as vmtest's.
//! - The kernel, busybox and userland come from a private arm64 apt configuration.
//!
//! Everything is cached in `$KSPAN_VMTEST_DIR/arm64/` (default /var/cache/kspan/vmtest/arm64):
//! `qemu/`, `apt/`, `kernel/` (Image, initrd.gz, kernel.json written last) and `rootfs/`
//! (with `.kspan-rootfs.json` written last). Delete a directory to rebuild it.

use std::env;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cross::{self, AARCH64};
use crate::setup::{self, Package};
use crate::vmtest::{
    self, Cache, Cpio, INIT, KEYRING, RunDir, TestBinary, capture, compare_versions, debian_mirror,
    dpkg_extract, files_with_extension, gather_modules, parse_dry_run, parse_policy, regex_escape,
    replace_dir, run_quiet, single_dir,
};
use crate::{display, quote, run_cmd, target_dir};

/// What the arm64 userland needs on the host, on top of vmtest's and the cross build's packages
/// (qemu-user-static comes with the cross toolchain).
pub const PACKAGES: &[Package] = &[(
    "debootstrap",
    Some("debootstrap"),
    "builds the arm64 userland of the aarch64 QEMU guest",
)];

/// The Debian release of the kernel, busybox and userland.
const SUITE: &str = "bookworm";
/// The kernel family (bookworm's 6.1, the newest ABI in the lists): `{prefix}{abi}{suffix}`.
/// The unsigned standard flavour, as for x86: it builds 9p as modules.
const KERNEL_PREFIX: &str = "linux-image-6.1.0-";
const KERNEL_SUFFIX: &str = "-arm64-unsigned";
/// What the http1 tests run besides kspan.
const USERLAND_PACKAGES: &str = "python3,curl";
/// A few basic tests of tests/http1.rs, run when no test arguments are given: both sides of a
/// request, error statuses, HTTP/1.0.
const SMOKE_TESTS: &[&str] = &[
    "curl_request_traced_on_both_sides",
    "error_statuses",
    "http10_protocol_version",
];
/// The harness's deadlines stretch by this (`KSPAN_E2E_TIME_SCALE`): emulating another
/// architecture is slower than vmtest's x86 guests (which use 5).
const GUEST_TIME_SCALE: u32 = 10;
/// The 9p mount's largest message (vmtest's value for 6.1).
const MSIZE: u32 = 512000;
const QEMU_DONE: &str = "packages.txt";
const KERNEL_DONE: &str = "kernel.json";
const ROOTFS_DONE: &str = ".kspan-rootfs.json";

/// QEMU's flags but the kernel's and the share's, as vmtest's `QEMU_FLAGS` (see there for
/// `thread=single` and `-icount`): the `virt` machine, every CPU feature but the architected
/// pointer authentication, which is slow to emulate (`pauth-impdef` keeps the feature with
/// QEMU's cheap algorithm).
const QEMU_FLAGS: &str = "-M virt -accel tcg,thread=single -icount shift=1 \
    -cpu max,pauth-impdef=on -smp 2 -m 2G -display none -nodefaults -no-reboot -serial mon:stdio";

/// `cargo xtask vmtest-arm64 [--all] [-- TEST ARGS]`: cross-build, prepare the guest, run the
/// http1 tests in it: the smoke tests, or all of them with `all`.
pub fn vmtest_arm64(all: bool, test_args: &[String]) -> Result<()> {
    let start = Instant::now();
    cross::setup()?;
    setup::packages(&[vmtest::PACKAGES, PACKAGES])?;
    run_cmd(&mut cross::cargo_for(
        AARCH64,
        &["build", "--release", "-p", "kspan"],
    )?)?;
    let kspan = target_dir().join(AARCH64).join("release").join("kspan");
    let http1 = http1_binary()?;

    let cache = Cache::open()?;
    let dir = cache.dir.join("arm64");
    let (qemu, kernel, rootfs) = {
        let _lock = cache.lock()?;
        let qemu = prepare_qemu(&cache, &dir.join("qemu"))?;
        let mut apt = Arm64Apt::new(&dir.join("apt"));
        let kernel = prepare_kernel(&cache, &dir.join("kernel"), &mut apt)?;
        let rootfs = prepare_rootfs(&cache, &dir.join("rootfs"), &apt)?;
        (qemu, kernel, rootfs)
    };

    // Test names in `test_args` replace the smoke tests, as `--all` does.
    let mut tests: Vec<String> = Vec::new();
    if !all && test_args.is_empty() {
        tests.extend(SMOKE_TESTS.iter().map(|t| t.to_string()));
    }
    tests.extend_from_slice(test_args);
    // The guest sees the rootfs as `/`: its run directory lives inside it.
    let run = RunDir::create(&rootfs.join("vmtest-run"), "arm64")?;
    let guest_path = |host: &Path| -> Result<String> {
        let inside = host
            .strip_prefix(&rootfs)
            .context("a run file is outside the rootfs")?;
        Ok(format!("/{}", inside.display()))
    };
    let kspan_copy = run.copy(&kspan)?;
    let http1_copy = run.copy(&http1.executable)?;
    // The harness finds its Python servers under the tests crate's source directory, a path
    // compiled in: the script links the copies there.
    let servers = run.dir.join("servers");
    copy_files(&http1.package_dir.join("servers"), &servers)?;
    let script = guest_script(
        &GuestPaths {
            kspan: guest_path(&kspan_copy)?,
            http1: guest_path(&http1_copy)?,
            servers: guest_path(&servers)?,
            crate_dir: http1.package_dir.display().to_string(),
        },
        &tests,
    );
    let script_path = run.dir.join("command.sh");
    fs::write(&script_path, script)
        .with_context(|| format!("cannot write {}", script_path.display()))?;

    let log = target_dir().join("vmtest").join("arm64.log");
    if let Some(parent) = log.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    println!(
        "\n==> linux {} (aarch64) in qemu-system-aarch64: http1 {}",
        kernel.release,
        if tests.is_empty() {
            "(all)".to_string()
        } else {
            tests.join(" ")
        }
    );
    let status = boot(&qemu, &kernel, &rootfs, &guest_path(&script_path)?, &log)?;
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    println!(
        "\n==> vmtest-arm64: {} on linux {} aarch64 ({:.1} min in all); console in {}",
        if status == 0 { "ok" } else { "FAILED" },
        kernel.release,
        minutes,
        log.display()
    );
    if status != 0 {
        bail!(
            "the http1 tests failed in the aarch64 guest (exit status {status}); console in {}",
            log.display()
        );
    }
    Ok(())
}

/// Where the guest finds what it runs (paths in the guest).
struct GuestPaths {
    kspan: String,
    http1: String,
    /// The copies of tests/servers.
    servers: String,
    /// The tests crate's directory on the host, compiled into the test binary.
    crate_dir: String,
}

/// The guest's command script: link the Python servers where the harness looks for them, print
/// what the guest runs, then the http1 tests, one at a time, with `filters`.
fn guest_script(paths: &GuestPaths, filters: &[String]) -> String {
    let mut run = format!("{} --test-threads=1", quote(&paths.http1));
    for filter in filters {
        run.push(' ');
        run.push_str(&quote(filter));
    }
    format!(
        "# generated by cargo xtask vmtest-arm64\n\
         export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root KSPAN_BIN={kspan} \
         KSPAN_E2E_TIME_SCALE={GUEST_TIME_SCALE}\n\
         mkdir -p {crate_dir} && ln -s {servers} {crate_dir}/servers || exit 125\n\
         echo \"vmtest-arm64: $(uname -srm), $(python3 --version), $(curl --version | head -1)\"\n\
         cd {crate_dir} && {run}\n",
        kspan = quote(&paths.kspan),
        crate_dir = quote(&paths.crate_dir),
        servers = quote(&paths.servers),
    )
}

/// Cross-build tests/tests/http1.rs for aarch64 without running it.
fn http1_binary() -> Result<TestBinary> {
    let mut cmd = cross::cargo_for(
        AARCH64,
        &[
            "test",
            "-p",
            "kspan-e2e",
            "--test",
            "http1",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ],
    )?;
    let shown = display(&cmd);
    println!("$ {shown}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({})", out.status);
    }
    let binaries = vmtest::parse_test_artifacts(&String::from_utf8_lossy(&out.stdout))?;
    binaries
        .into_iter()
        .next()
        .with_context(|| format!("`{shown}` built no test binary"))
}

/// Copy the files (not subdirectories) of `from` into a new directory `to`.
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let path = entry?.path();
        if path.is_file() {
            let dest = to.join(path.file_name().unwrap_or_default());
            fs::copy(&path, &dest)
                .with_context(|| format!("cannot copy {} to {}", path.display(), dest.display()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// QEMU

/// qemu-system-aarch64 extracted from Debian packages, run with its libraries.
struct Qemu {
    root: PathBuf,
}

impl Qemu {
    fn command(&self) -> Command {
        let mut cmd = Command::new(self.root.join("usr/bin/qemu-system-aarch64"));
        let libs = [
            self.root.join("usr/lib/x86_64-linux-gnu"),
            self.root.join("lib/x86_64-linux-gnu"),
        ];
        cmd.env("LD_LIBRARY_PATH", env::join_paths(libs).unwrap_or_default());
        cmd.arg("-L").arg(self.root.join("usr/share/qemu"));
        cmd
    }

    fn version(&self) -> Option<String> {
        let out = crate::output(self.command().arg("--version"))?;
        Some(out.lines().next()?.trim().to_string())
    }
}

/// QEMU in `dir/root`, downloaded with the host's apt (amd64 packages) on first use: what
/// `apt-get install qemu-system-arm` would install here, plus the QEMU packages themselves.
fn prepare_qemu(cache: &Cache, dir: &Path) -> Result<Qemu> {
    let qemu = Qemu {
        root: dir.join("root"),
    };
    if dir.join(QEMU_DONE).is_file()
        && let Some(version) = qemu.version()
    {
        println!("vmtest-arm64: {version} (cached in {})", dir.display());
        return Ok(qemu);
    }
    let tmp = cache.scratch("arm64-qemu")?;
    let debs = tmp.join("debs");
    fs::create_dir_all(&debs)?;
    let plan = capture(Command::new("apt-get").args([
        "install",
        "-y",
        "--no-install-recommends",
        "--dry-run",
        "qemu-system-arm",
    ]))
    .context("run as root, or run apt-get update as root first")?;
    let mut packages: Vec<String> = ["qemu-system-arm", "qemu-system-common", "qemu-system-data"]
        .map(String::from)
        .into();
    for package in parse_dry_run(&plan) {
        if !packages.contains(&package) {
            packages.push(package);
        }
    }
    println!(
        "vmtest-arm64: downloading {} Debian packages for QEMU",
        packages.len()
    );
    run_quiet(
        Command::new("apt-get")
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .args(&packages)
            .current_dir(&debs),
    )?;
    for deb in files_with_extension(&debs, "deb")? {
        dpkg_extract(&deb, &tmp.join("root"))?;
    }
    fs::remove_dir_all(&debs)?;
    fs::write(tmp.join(QEMU_DONE), packages.join("\n") + "\n")?;
    replace_dir(&tmp, dir)?;
    let Some(version) = qemu.version() else {
        bail!(
            "the QEMU extracted into {} does not run (`qemu-system-aarch64 --version` fails): a \
             library it needs may be missing from the host",
            dir.display()
        );
    };
    println!("vmtest-arm64: {version}");
    Ok(qemu)
}

// ---------------------------------------------------------------------------------------------
// The arm64 apt configuration and the kernel

/// A private apt configuration for arm64 packages of bookworm: its own sources, lists and
/// archives, `APT::Architecture=arm64`, and no dpkg status (nothing is installed from it).
struct Arm64Apt {
    dir: PathBuf,
    mirror: String,
    updated: bool,
}

impl Arm64Apt {
    fn new(dir: &Path) -> Arm64Apt {
        Arm64Apt {
            dir: dir.to_path_buf(),
            mirror: system_mirror(),
            updated: false,
        }
    }

    fn command(&self, program: &str) -> Command {
        let dir = self.dir.display();
        let mut cmd = Command::new(program);
        for option in [
            format!("Dir::Etc::sourcelist={dir}/sources.list"),
            "Dir::Etc::sourceparts=-".into(),
            format!("Dir::State::lists={dir}/lists"),
            format!("Dir::Cache::archives={dir}/archives"),
            format!("Dir::Cache::pkgcache={dir}/pkg.bin"),
            "Dir::Cache::srcpkgcache=".into(),
            "Dir::State::status=/dev/null".into(),
            "APT::Architecture=arm64".into(),
            "APT::Architectures=arm64".into(),
            "APT::Sandbox::User=root".into(),
        ] {
            cmd.arg("-o").arg(option);
        }
        cmd
    }

    /// Refresh the lists, once per run (only runs that download the kernel get here).
    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        if !Path::new(KEYRING).is_file() {
            bail!("{KEYRING} is missing: apt-get install debian-archive-keyring");
        }
        for sub in ["lists/partial", "archives/partial"] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        let mirror = &self.mirror;
        fs::write(
            self.dir.join("sources.list"),
            format!(
                "deb [signed-by={KEYRING}] {mirror}/debian {SUITE} main\n\
                 deb [signed-by={KEYRING}] {mirror}/debian-security {SUITE}-security main\n"
            ),
        )?;
        println!("vmtest-arm64: updating the private arm64 apt lists ({SUITE}) from {mirror}");
        run_quiet(self.command("apt-get").args(["update", "-qq"]))?;
        self.updated = true;
        Ok(())
    }

    /// `name` and its candidate version.
    fn candidate(&self, name: &str) -> Result<(String, String)> {
        let policy = capture(self.command("apt-cache").args(["policy", name]))?;
        let Some((version, _suite)) = parse_policy(&policy) else {
            bail!(
                "apt has no arm64 candidate of {name} in {}",
                self.dir.display()
            );
        };
        Ok((name.to_string(), version))
    }
}

/// The Debian mirror of the system's apt sources (as vmtest's), else deb.debian.org.
fn system_mirror() -> String {
    let mut sources = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    for file in fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = file.path();
        if path
            .extension()
            .is_some_and(|e| e == "sources" || e == "list")
        {
            sources += &fs::read_to_string(&path).unwrap_or_default();
        }
    }
    debian_mirror(&sources).unwrap_or_else(|| "http://deb.debian.org".into())
}

/// The kernel in the cache, ready to boot.
struct Kernel {
    dir: PathBuf,
    /// `uname -r`.
    release: String,
}

/// Debian's arm64 kernel (the newest 6.1 ABI) as `dir/Image`, with a busybox initramfs loading
/// the 9p and overlay modules, prepared on first use (and the initramfs again when vmtest's
/// init script changed).
fn prepare_kernel(cache: &Cache, dir: &Path, apt: &mut Arm64Apt) -> Result<Kernel> {
    let info: Value = fs::read_to_string(dir.join(KERNEL_DONE))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    if let Some(release) = info["release"].as_str()
        && info["init"] == INIT
    {
        println!(
            "vmtest-arm64: cached kernel {release} ({})",
            info["package"].as_str().unwrap_or("?")
        );
        return Ok(Kernel {
            dir: dir.to_path_buf(),
            release: release.to_string(),
        });
    }
    apt.update()?;
    let pattern = format!(
        "^{}[0-9]+{}$",
        regex_escape(KERNEL_PREFIX),
        regex_escape(KERNEL_SUFFIX)
    );
    let found = capture(
        apt.command("apt-cache")
            .args(["search", "--names-only", &pattern]),
    )?;
    let Some(image_package) = newest_kernel(&found) else {
        bail!(
            "no package {KERNEL_PREFIX}<ABI>{KERNEL_SUFFIX} in the arm64 apt lists ({}): update \
             KERNEL_PREFIX in xtask/src/vmtest_arm64.rs",
            apt.dir.display()
        );
    };
    let packages = [
        apt.candidate(image_package)?,
        apt.candidate("busybox-static")?,
    ];
    let tmp = cache.scratch("arm64-kernel")?;
    let debs = tmp.join("debs");
    fs::create_dir_all(&debs)?;
    let mut download = apt.command("apt-get");
    download.args(["-q", "download"]).current_dir(&debs);
    for (name, version) in &packages {
        println!("vmtest-arm64: downloading {name} {version}");
        download.arg(format!("{name}={version}"));
    }
    run_quiet(&mut download)?;
    let root = tmp.join("root");
    for deb in files_with_extension(&debs, "deb")? {
        dpkg_extract(&deb, &root)?;
    }

    let out = tmp.join("out");
    fs::create_dir_all(&out)?;
    let modules_dir = single_dir(&root, &["lib/modules", "usr/lib/modules"])?;
    let release = modules_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    let image = fs::read(&vmlinuz).with_context(|| format!("cannot read {}", vmlinuz.display()))?;
    // QEMU boots an arm64 `Image`; some releases ship it gzip-compressed.
    let image = if image.starts_with(&[0x1f, 0x8b]) {
        let mut gunzip = Command::new("gzip");
        gunzip.arg("-dc").arg(&vmlinuz);
        let out = gunzip.output().context("cannot start gzip")?;
        if !out.status.success() {
            bail!("gzip cannot decompress {}", vmlinuz.display());
        }
        out.stdout
    } else {
        image
    };
    fs::write(out.join("Image"), image)?;
    let modules = gather_modules(&modules_dir, &out.join("modules"))?;
    initramfs(
        &out.join("modules"),
        &root.join("bin/busybox"),
        &out.join("initrd.gz"),
    )?;
    println!(
        "vmtest-arm64: kernel {release}, modules {}",
        modules.join(" ")
    );
    let info = json!({
        "release": release,
        "package": format!("{}={}", packages[0].0, packages[0].1),
        "busybox": format!("{}={}", packages[1].0, packages[1].1),
        "modules": modules,
        "init": INIT,
    });
    fs::write(
        out.join(KERNEL_DONE),
        serde_json::to_string_pretty(&info)? + "\n",
    )?;
    replace_dir(&out, dir)?;
    fs::remove_dir_all(&tmp)?;
    Ok(Kernel {
        dir: dir.to_path_buf(),
        release,
    })
}

/// The kernel package of the newest ABI in `apt-cache search` output: a number between
/// `KERNEL_PREFIX` and `KERNEL_SUFFIX` (not the `-rt` or `-cloud` flavours).
fn newest_kernel(search: &str) -> Option<&str> {
    search
        .lines()
        .filter_map(|line| line.split(" - ").next())
        .map(str::trim)
        .filter(|name| {
            name.strip_prefix(KERNEL_PREFIX)
                .and_then(|rest| rest.strip_suffix(KERNEL_SUFFIX))
                .is_some_and(|abi| !abi.is_empty() && abi.bytes().all(|b| b.is_ascii_digit()))
        })
        .max_by(|a, b| compare_versions(a, b))
}

/// vmtest's initramfs with the arm64 busybox, whose applets are listed under qemu-user.
fn initramfs(modules: &Path, busybox: &Path, output: &Path) -> Result<()> {
    let read =
        |path: &Path| fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    let mut cpio = Cpio::default();
    for dir in [
        "bin", "dev", "proc", "sys", "mods", "lower", "upper", "newroot",
    ] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &read(busybox)?);
    let applets = capture(
        Command::new("qemu-aarch64-static")
            .arg(busybox)
            .arg("--list"),
    )?;
    for applet in applets.split_whitespace().filter(|a| *a != "busybox") {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    let order = read(&modules.join("order"))?;
    for name in String::from_utf8_lossy(&order).split_whitespace() {
        let ko = read(&modules.join(format!("{name}.ko")))?;
        cpio.file(&format!("mods/{name}.ko"), 0o644, &ko);
    }
    cpio.file("mods/order", 0o644, &order);
    cpio.file("init", 0o755, INIT.as_bytes());

    let file =
        File::create(output).with_context(|| format!("cannot create {}", output.display()))?;
    let mut gzip = Command::new("gzip")
        .arg("-1n")
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("cannot start gzip")?;
    gzip.stdin
        .take()
        .expect("piped")
        .write_all(&cpio.finish())?;
    if !gzip.wait()?.success() {
        bail!("gzip failed to compress the initramfs");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The arm64 userland

/// An arm64 bookworm userland with python3 and curl in `dir`, built on first use.
///
/// `debootstrap --foreign` resolves and downloads the packages and unpacks the essential ones.
/// Its second stage (`dpkg --configure` of everything, in a chroot) execs arm64 programs, which
/// needs qemu-user registered in binfmt_misc: not mounted on these machines, and registering it
/// would change the whole host. So every downloaded package is unpacked here instead, without
/// maintainer scripts: python3 and curl run from unpacked files (checked under qemu-user before
/// the rootfs is kept), and the two files of a maintainer script the tests need, /etc/passwd and
/// /etc/group, are copied from base-passwd's templates.
fn prepare_rootfs(cache: &Cache, dir: &Path, apt: &Arm64Apt) -> Result<PathBuf> {
    if dir.join(ROOTFS_DONE).is_file() {
        println!("vmtest-arm64: cached arm64 userland in {}", dir.display());
        return Ok(dir.to_path_buf());
    }
    let start = Instant::now();
    let tmp = cache.scratch("arm64-rootfs")?;
    let mirror = format!("{}/debian", apt.mirror);
    println!(
        "vmtest-arm64: debootstrap {SUITE} arm64 with {USERLAND_PACKAGES} from {mirror} (a \
         few minutes, once)"
    );
    run_quiet(
        Command::new("debootstrap")
            .args([
                "--arch=arm64",
                "--foreign",
                "--variant=minbase",
                &format!("--include={USERLAND_PACKAGES}"),
                &format!("--keyring={KEYRING}"),
                SUITE,
            ])
            .arg(&tmp)
            .arg(&mirror),
    )?;
    let archives = tmp.join("var/cache/apt/archives");
    let debs = files_with_extension(&archives, "deb")?;
    for deb in &debs {
        unpack_into(deb, &tmp)?;
        fs::remove_file(deb)?;
    }
    // debootstrap's first stage leaves `proc` as a link to the host's /proc, and its second
    // stage scripts; the guest mounts its own /proc and never runs the second stage.
    let proc = tmp.join("proc");
    if proc.is_symlink() {
        fs::remove_file(&proc)?;
        fs::create_dir(&proc)?;
    }
    fs::remove_dir_all(tmp.join("debootstrap"))?;
    for name in ["passwd", "group"] {
        let to = tmp.join("etc").join(name);
        if !to.exists() {
            let from = tmp.join(format!("usr/share/base-passwd/{name}.master"));
            fs::copy(&from, &to)
                .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        }
    }
    for check in [["python3", "--version"], ["curl", "--version"]] {
        let mut cmd = Command::new("qemu-aarch64-static");
        cmd.arg("-L")
            .arg(&tmp)
            .arg(tmp.join("usr/bin").join(check[0]))
            .arg(check[1]);
        let out = capture(&mut cmd).context("the unpacked arm64 userland does not run")?;
        println!("vmtest-arm64: {}", out.lines().next().unwrap_or_default());
    }
    let names: Vec<String> = debs
        .iter()
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    fs::write(
        tmp.join(ROOTFS_DONE),
        serde_json::to_string_pretty(&json!({ "suite": SUITE, "debs": names }))? + "\n",
    )?;
    replace_dir(&tmp, dir)?;
    println!(
        "vmtest-arm64: arm64 userland ready in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(dir.to_path_buf())
}

/// Unpack a package's files into `root`, keeping the merged-/usr links (`/bin` → `usr/bin`) that
/// `dpkg-deb -x` would replace with directories.
fn unpack_into(deb: &Path, root: &Path) -> Result<()> {
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start dpkg-deb")?;
    let tar = Command::new("tar")
        .arg("-C")
        .arg(root)
        .args(["--keep-directory-symlink", "-xf", "-"])
        .stdin(dpkg.stdout.take().expect("piped"))
        .status()
        .context("cannot start tar")?;
    let dpkg = dpkg.wait()?;
    if !dpkg.success() || !tar.success() {
        bail!("cannot unpack {} into {}", deb.display(), root.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Booting

/// Boot the kernel with the rootfs as the guest's root and `script` (a path in the guest) as its
/// command; its exit status. The console goes to stdout and `log`.
fn boot(qemu: &Qemu, kernel: &Kernel, rootfs: &Path, script: &str, log: &Path) -> Result<i32> {
    let timeout = vmtest::guest_timeout()?;
    if rootfs.to_string_lossy().contains([',', ' ']) || script.contains(char::is_whitespace) {
        bail!(
            "the cache path must not contain spaces or commas (it goes on QEMU's and the \
             kernel's command lines): set KSPAN_VMTEST_DIR"
        );
    }
    let log_file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let (reader, writer) = io::pipe().context("cannot create a pipe for the console")?;
    let child = {
        let mut cmd = qemu.command();
        cmd.args(QEMU_FLAGS.split_whitespace())
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=host,security_model=none,readonly=on,multidevs=remap",
                rootfs.display()
            ))
            .arg("-kernel")
            .arg(kernel.dir.join("Image"))
            .arg("-initrd")
            .arg(kernel.dir.join("initrd.gz"))
            .arg("-append")
            .arg(format!(
                "console=ttyAMA0 quiet panic=-1 rcupdate.rcu_expedited=1 vmtest_msize={MSIZE} \
                 vmtest={script}"
            ))
            .stdin(Stdio::null())
            .stdout(
                writer
                    .try_clone()
                    .context("cannot duplicate the console pipe")?,
            )
            .stderr(writer);
        let shown = display(&cmd);
        println!("$ {shown}");
        cmd.spawn()
            .with_context(|| format!("cannot start `{shown}`"))?
    };
    vmtest::watch_guest(
        child,
        reader,
        log_file,
        true,
        timeout,
        log,
        "the arm64 root",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_standard_kernel_is_picked() {
        let search = "\
linux-image-6.1.0-9-arm64-unsigned - Linux 6.1 for 64-bit ARMv8 machines
linux-image-6.1.0-57-arm64-unsigned - Linux 6.1 for 64-bit ARMv8 machines
linux-image-6.1.0-58-rt-arm64-unsigned - Linux 6.1 for 64-bit ARMv8 machines, PREEMPT_RT
linux-image-6.1.0-56-arm64-unsigned - Linux 6.1 for 64-bit ARMv8 machines
";
        assert_eq!(
            newest_kernel(search),
            Some("linux-image-6.1.0-57-arm64-unsigned")
        );
        assert_eq!(newest_kernel(""), None);
    }

    #[test]
    fn the_guest_script_links_the_servers_and_runs_the_filtered_tests() {
        let paths = GuestPaths {
            kspan: "/vmtest-run/arm64-7/kspan".into(),
            http1: "/vmtest-run/arm64-7/http1-abc".into(),
            servers: "/vmtest-run/arm64-7/servers".into(),
            crate_dir: "/work/kspan/tests".into(),
        };
        let filters = ["error_statuses".to_string(), "a b".to_string()];
        let script = guest_script(&paths, &filters);
        assert!(script.contains("KSPAN_BIN=/vmtest-run/arm64-7/kspan "));
        assert!(script.contains(&format!("KSPAN_E2E_TIME_SCALE={GUEST_TIME_SCALE}\n")));
        assert!(
            script.contains(
                "ln -s /vmtest-run/arm64-7/servers /work/kspan/tests/servers || exit 125\n"
            )
        );
        assert!(script.ends_with(
            "cd /work/kspan/tests && /vmtest-run/arm64-7/http1-abc --test-threads=1 \
             error_statuses 'a b'\n"
        ));
    }
}
