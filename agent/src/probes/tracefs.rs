//! Tracepoint layouts from tracefs (`events/<category>/<name>/format`): the offsets of the fields
//! the eBPF programs read, taken from the running kernel instead of assumed. Pure over the text
//! of the format files, so every kernel of the test matrix is checked from fixtures.

use anyhow::{Context, Result, bail};
use kspan_common::TracepointOffsets;

/// One `field:` line of a format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// The declaration without its name, e.g. `unsigned short`, `char[16]`, `__data_loc char[]`.
    pub declaration: String,
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// The fields of one tracepoint, in order, common fields (`common_*`) included.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Format {
    pub fields: Vec<Field>,
}

impl Format {
    /// Parse a `format` file. Lines that are not field declarations (name, ID, print fmt) are
    /// skipped; a field line that does not parse is an error.
    pub fn parse(text: &str) -> Result<Format> {
        let mut fields = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if !line.starts_with("field:") {
                continue;
            }
            fields.push(parse_field(line).with_context(|| format!("bad field line `{line}`"))?);
        }
        Ok(Format { fields })
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The field's offset, checking its size: the programs read exactly `size` bytes.
    fn offset_of(&self, name: &str, size: u32) -> Result<u32> {
        let field = self
            .field(name)
            .with_context(|| format!("no field `{name}`"))?;
        if field.size != size {
            bail!(
                "field `{name}` ({}) is {} bytes, kspan reads {size}",
                field.declaration,
                field.size
            );
        }
        Ok(field.offset)
    }

    /// Fields after the common ones (`common_*`).
    fn own_fields(&self) -> impl Iterator<Item = &Field> {
        self.fields
            .iter()
            .filter(|f| !f.name.starts_with("common_"))
    }
}

/// `field:unsigned long count;\toffset:32;\tsize:8;\tsigned:0;`
fn parse_field(line: &str) -> Result<Field> {
    let mut parts = line.split(';').map(str::trim);
    let declaration = parts
        .next()
        .and_then(|p| p.strip_prefix("field:"))
        .context("no declaration")?
        .trim();
    let mut offset = None;
    let mut size = None;
    for part in parts {
        if let Some(value) = part.strip_prefix("offset:") {
            offset = Some(value.parse().context("bad offset")?);
        } else if let Some(value) = part.strip_prefix("size:") {
            size = Some(value.parse().context("bad size")?);
        }
    }
    // The name is the last identifier: `char parent_comm[16]`, `const char * buf`, `int ret`.
    let (name_end, array) = match declaration.strip_suffix(']') {
        Some(rest) => {
            let open = rest.rfind('[').context("unbalanced [")?;
            (open, &declaration[open..])
        }
        None => (declaration.len(), ""),
    };
    let head = &declaration[..name_end];
    // After the last character that is not part of a name, whatever its UTF-8 length.
    let name_start = head
        .char_indices()
        .rfind(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |(i, c)| i + c.len_utf8());
    let name = &head[name_start..];
    if name.is_empty() {
        bail!("no field name");
    }
    let kind = head[..name_start].trim();
    if kind.is_empty() {
        bail!("no type before the field name");
    }
    Ok(Field {
        declaration: format!("{kind}{array}"),
        name: name.to_string(),
        offset: offset.context("no offset")?,
        size: size.context("no size")?,
    })
}

/// Where the agent finds a tracepoint's format: (category, name) → the file's text.
pub type ReadFormat<'a> = dyn Fn(&str, &str) -> Result<String> + 'a;

/// The offsets of every field the programs read. `syscalls`: the syscall tracepoints kspan
/// attaches to (`sys_enter_*` and `sys_exit_*`); all of them must share one layout.
pub fn tracepoint_offsets(syscalls: &[&str], read: &ReadFormat) -> Result<TracepointOffsets> {
    let format = |category: &str, name: &str| -> Result<Format> {
        Format::parse(&read(category, name)?)
            .with_context(|| format!("cannot parse the format of tracepoint {category}/{name}"))
    };
    let mut syscall_args = None;
    let mut syscall_ret = None;
    for name in syscalls {
        let format = format("syscalls", name)?;
        let (found, slot) = if name.starts_with("sys_enter_") {
            (syscall_arguments(&format), &mut syscall_args)
        } else {
            (format.offset_of("ret", 8), &mut syscall_ret)
        };
        let offset = found.with_context(|| format!("unsupported layout of syscalls/{name}"))?;
        match slot {
            Some(seen) if *seen != offset => bail!(
                "syscall tracepoints disagree: syscalls/{name} has its first field at {offset}, \
                 others at {seen}"
            ),
            _ => *slot = Some(offset),
        }
    }
    let newtask = format("task", "task_newtask")?;
    let exec = format("sched", "sched_process_exec")?;
    let sock = format("sock", "inet_sock_set_state")?;
    let field = |format: &Format, tracepoint: &str, name: &str, size: u32| {
        format
            .offset_of(name, size)
            .with_context(|| format!("unsupported layout of {tracepoint}"))
    };
    let sock_field = |name, size| field(&sock, "sock/inet_sock_set_state", name, size);
    Ok(TracepointOffsets {
        syscall_args: syscall_args.context("no sys_enter_* tracepoint given")?,
        syscall_ret: syscall_ret.context("no sys_exit_* tracepoint given")?,
        newtask_pid: field(&newtask, "task/task_newtask", "pid", 4)?,
        newtask_clone_flags: field(&newtask, "task/task_newtask", "clone_flags", 8)?,
        sock_newstate: sock_field("newstate", 4)?,
        sock_sport: sock_field("sport", 2)?,
        sock_family: sock_field("family", 2)?,
        sock_protocol: sock_field("protocol", 2)?,
        sock_saddr: sock_field("saddr", 4)?,
        sock_saddr_v6: sock_field("saddr_v6", 16)?,
        exec_filename: data_loc(&exec, "filename")
            .context("unsupported layout of sched/sched_process_exec")?,
    })
}

/// The offset of a `__data_loc` field (a u32 locating a string stored after the fixed fields).
fn data_loc(format: &Format, name: &str) -> Result<u32> {
    let offset = format.offset_of(name, 4)?;
    let declaration = &format.field(name).context("no field")?.declaration;
    if !declaration.starts_with("__data_loc") {
        bail!("field `{name}` is `{declaration}`, kspan reads a `__data_loc` string");
    }
    Ok(offset)
}

/// A `sys_enter_*` format: `__syscall_nr`, then the arguments, 8 bytes each and contiguous (the
/// programs index them as first + 8n). Returns the first argument's offset. Dynamic fields
/// (`__data_loc`, e.g. the `__buf_val` copy of a write's bytes for ftrace, seen on 7.2 but not 6.18) are not
/// arguments.
fn syscall_arguments(format: &Format) -> Result<u32> {
    let mut fields = format
        .own_fields()
        .filter(|f| !f.declaration.starts_with("__data_loc"));
    match fields.next() {
        Some(nr) if nr.name == "__syscall_nr" => {}
        _ => bail!("the first field is not __syscall_nr"),
    }
    let first = fields.next().context("no argument fields")?;
    let mut expected = first.offset;
    for field in std::iter::once(first).chain(fields) {
        if field.offset != expected || field.size != 8 {
            bail!(
                "argument `{}` is at {} with {} bytes; kspan expects 8-byte arguments at \
                 {} + 8n",
                field.name,
                field.offset,
                field.size,
                first.offset
            );
        }
        expected += 8;
    }
    Ok(first.offset)
}

#[cfg(test)]
mod tests;
