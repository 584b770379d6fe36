//! The format parser and the offsets on the tracefs formats of every kernel in the test matrix
//! (fixtures/, captured in `cargo xtask vmtest` guests with fixtures/capture.sh).

use super::*;

/// (kernel, fixture)
const KERNELS: &[(&str, &str)] = &[
    ("5.10", include_str!("fixtures/5.10.txt")),
    ("6.1", include_str!("fixtures/6.1.txt")),
    ("6.1-rt", include_str!("fixtures/6.1-rt.txt")),
    ("6.12", include_str!("fixtures/6.12.txt")),
    ("6.18", include_str!("fixtures/6.18.txt")),
    ("7.2", include_str!("fixtures/7.2.txt")),
];

/// The syscall tracepoints kspan attaches to, as in probes/mod.rs.
fn syscalls() -> Vec<&'static str> {
    crate::probes::syscall_tracepoints().collect()
}

/// A reader over one fixture: `### category/name` starts each format.
fn fixture_reader(fixture: &str) -> impl Fn(&str, &str) -> Result<String> + '_ {
    move |category, name| {
        let header = format!("### {category}/{name}\n");
        let start = fixture
            .find(&header)
            .with_context(|| format!("{category}/{name} is not in the fixture"))?
            + header.len();
        let end = fixture[start..]
            .find("\n### ")
            .map_or(fixture.len(), |i| start + i);
        Ok(fixture[start..end].to_string())
    }
}

fn offsets(kernel: &str) -> TracepointOffsets {
    let (_, fixture) = KERNELS.iter().find(|(k, _)| *k == kernel).unwrap();
    tracepoint_offsets(&syscalls(), &fixture_reader(fixture))
        .unwrap_or_else(|e| panic!("Linux {kernel}: {e:#}"))
}

#[test]
fn every_matrix_kernel_has_a_supported_layout() {
    for (kernel, _) in KERNELS {
        let o = offsets(kernel);
        // Every kernel seen keeps the usual syscall layout, which the programs read directly.
        assert_eq!(o.syscall_args, kspan_common::USUAL_SYSCALL_ARGS, "{kernel}");
        assert_eq!(o.syscall_ret, kspan_common::USUAL_SYSCALL_RET, "{kernel}");
    }
}

#[test]
fn task_newtask_has_one_layout_but_on_preempt_rt() {
    // `clone_flags` is `unsigned long` up to 6.x and `u64` on 7.2: 8 bytes at 32 either way.
    for kernel in ["5.10", "6.1", "6.12", "6.18", "7.2"] {
        let o = offsets(kernel);
        assert_eq!((o.newtask_pid, o.newtask_clone_flags), (8, 32), "{kernel}");
    }
    // One more common field on PREEMPT_RT moves `pid` and `comm`; `clone_flags` stays aligned.
    let rt = offsets("6.1-rt");
    assert_eq!((rt.newtask_pid, rt.newtask_clone_flags), (12, 32));
}

#[test]
fn inet_sock_set_state_shifts_on_preempt_rt() {
    let usual = TracepointOffsets {
        syscall_args: 16,
        syscall_ret: 16,
        newtask_pid: 8,
        newtask_clone_flags: 32,
        sock_newstate: 20,
        sock_sport: 24,
        sock_family: 28,
        sock_protocol: 30,
        sock_saddr: 32,
        sock_saddr_v6: 40,
        exec_filename: 8,
    };
    assert_eq!(offsets("6.1"), usual);
    assert_eq!(offsets("5.10"), usual);
    // PREEMPT_RT adds `common_preempt_lazy_count` to the common fields: every field after them
    // moves by 8 (the syscall arguments stay at 16, after a moved `__syscall_nr`).
    assert_eq!(
        offsets("6.1-rt"),
        TracepointOffsets {
            newtask_pid: 12,
            sock_newstate: 28,
            sock_sport: 32,
            sock_family: 36,
            sock_protocol: 38,
            sock_saddr: 40,
            sock_saddr_v6: 48,
            exec_filename: 12,
            ..usual
        }
    );
    assert_eq!(offsets("7.2"), usual);
}

#[test]
fn exec_filename_is_a_data_loc_after_the_common_fields() {
    for kernel in ["5.10", "6.1", "6.12", "6.18", "7.2"] {
        assert_eq!(offsets(kernel).exec_filename, 8, "{kernel}");
    }
    assert_eq!(offsets("6.1-rt").exec_filename, 12);
}

#[test]
fn parses_field_declarations() {
    let format = Format::parse(
        "name: sched_process_fork\nID: 1\nformat:\n\
         \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
         \n\
         \tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
         \tfield:char child_comm[16];\toffset:12;\tsize:16;\tsigned:1;\n\
         \tfield:const char * buf;\toffset:28;\tsize:8;\tsigned:0;\n\
         \tfield:__u8 saddr_v6[16];\toffset:36;\tsize:16;\tsigned:0;\n\
         \n\
         print fmt: \"comm=%s\", __get_str(parent_comm)\n",
    )
    .unwrap();
    let got: Vec<(&str, &str, u32, u32)> = format
        .fields
        .iter()
        .map(|f| (f.declaration.as_str(), f.name.as_str(), f.offset, f.size))
        .collect();
    assert_eq!(
        got,
        [
            ("unsigned short", "common_type", 0, 2),
            ("__data_loc char[]", "parent_comm", 8, 4),
            ("char[16]", "child_comm", 12, 16),
            ("const char *", "buf", 28, 8),
            ("__u8[16]", "saddr_v6", 36, 16),
        ]
    );
}

#[test]
fn malformed_field_lines_are_errors() {
    for line in [
        "field:int;\toffset:8;\tsize:4;",
        "field:int pid;\tsize:4;",
        "field:int pid;\toffset:x;\tsize:4;",
        "field:char comm16];\toffset:8;\tsize:16;",
    ] {
        assert!(Format::parse(line).is_err(), "{line}");
    }
}

#[test]
fn unexpected_layouts_are_refused_with_the_tracepoint_named() {
    let (_, fixture) = KERNELS[0];
    // clone_flags of another size than the 8 bytes the program reads.
    let changed = fixture.replace(
        "field:unsigned long clone_flags;\toffset:32;\tsize:8;",
        "field:unsigned int clone_flags;\toffset:32;\tsize:4;",
    );
    assert_ne!(changed, fixture);
    let err = tracepoint_offsets(&syscalls(), &fixture_reader(&changed)).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("task/task_newtask"), "{message}");
    assert!(message.contains("clone_flags"), "{message}");

    // Syscall arguments that are not 8-byte slots one after the other.
    let changed = fixture.replace(
        "field:char * buf;\toffset:24;\tsize:8;",
        "field:char * buf;\toffset:28;\tsize:8;",
    );
    assert_ne!(changed, fixture);
    let err = tracepoint_offsets(&syscalls(), &fixture_reader(&changed)).unwrap_err();
    assert!(
        format!("{err:#}").contains("syscalls/sys_enter_read"),
        "{err:#}"
    );

    // A filename stored in line instead of a `__data_loc` reference.
    let changed = fixture.replace(
        "field:__data_loc char[] filename;\toffset:8;\tsize:4;",
        "field:char filename[4];\toffset:8;\tsize:4;",
    );
    assert_ne!(changed, fixture);
    let err = tracepoint_offsets(&syscalls(), &fixture_reader(&changed)).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("sched/sched_process_exec"), "{message}");
    assert!(message.contains("__data_loc"), "{message}");

    // A missing tracepoint.
    let err = tracepoint_offsets(&["sys_enter_nosuch"], &fixture_reader(fixture)).unwrap_err();
    assert!(format!("{err:#}").contains("sys_enter_nosuch"), "{err:#}");
}

#[test]
fn a_multibyte_character_before_the_field_name_is_not_a_panic() {
    // Found by the tracefs fuzz target (agent/fuzz/artifacts/tracefs): the name was sliced one
    // byte after the last non-name character, inside a multi-byte one.
    let format = Format::parse("\tfield:in\u{21b}x;\toffset:8;\tsize:4;\tsigned:1;\n").unwrap();
    let field = format.field("x").unwrap();
    assert_eq!(field.declaration, "in\u{21b}");
    assert_eq!((field.offset, field.size), (8, 4));
}
