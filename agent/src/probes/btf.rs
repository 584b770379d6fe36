//! Just enough of a BTF reader to find struct member offsets in the running kernel
//! (/sys/kernel/btf/vmlinux). The eBPF programs walk fd → socket with these offsets, which makes
//! one object portable across kernel builds (what CO-RE would do, which Rust eBPF lacks).

use anyhow::{Context, Result, bail};
use kspan_common::KernelOffsets;

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// A member of a struct or union, decoded from its 12-byte record when needed.
struct Member {
    name_off: u32,
    type_id: u32,
    /// Offset in bits from the start of the enclosing struct.
    bit_offset: u32,
    /// Non-zero for bitfields.
    bitfield_size: u32,
}

/// The kernel's BTF, indexed but not decoded: kspan needs a dozen members of seven structs out
/// of some 100,000 types. Decoding every type into owned structures took ~150 ms and ~60 MB of
/// fresh pages at every start (seconds in the QEMU guests of the kernel matrix); an index of
/// record positions is one allocation.
pub struct Btf {
    /// The whole file.
    data: Vec<u8>,
    /// Where the type records and the strings start in `data`.
    types_at: usize,
    strings: std::ops::Range<usize>,
    /// Per type id (0 is void), its record's offset from `types_at`.
    records: Vec<u32>,
    /// Ids of the named structs, in id order (the first of a name is its complete definition).
    structs: Vec<u32>,
}

/// Where a member lives: byte offset, and whether it is a bitfield (not readable as a plain int).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberOffset {
    pub bytes: u32,
    pub bitfield: bool,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32> {
    let bytes = data.get(at..at + 4).context("BTF truncated")?;
    Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
}

/// A type record's 12-byte header, decoded.
struct Header {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kflag: bool,
    /// Size, or the referenced type for typedef/const/volatile/...
    size_or_type: u32,
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).with_context(|| {
            format!(
                "cannot read {path}: kspan needs a kernel built with CONFIG_DEBUG_INFO_BTF=y \
                 (most distribution kernels since 5.8 are)"
            )
        })?;
        Self::parse(data).with_context(|| format!("cannot parse {path}"))
    }

    pub fn parse(data: Vec<u8>) -> Result<Self> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
            bail!("not little-endian BTF data");
        }
        let hdr_len = u32_at(&data, 4)? as usize;
        let type_off = u32_at(&data, 8)? as usize;
        let type_len = u32_at(&data, 12)? as usize;
        let str_off = u32_at(&data, 16)? as usize;
        let str_len = u32_at(&data, 20)? as usize;
        let types_at = hdr_len + type_off;
        let types_data = data
            .get(types_at..types_at + type_len)
            .context("BTF type section out of bounds")?;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        data.get(strings.clone())
            .context("BTF string section out of bounds")?;

        // Type id 0 is "void" (no record). Records are at least 12 bytes.
        let mut records = Vec::with_capacity(type_len / 16 + 1);
        records.push(u32::MAX);
        let mut structs = Vec::new();
        let mut at = 0;
        while at < types_data.len() {
            let header = header(types_data, at)?;
            if header.kind == KIND_STRUCT && header.name_off != 0 {
                structs.push(records.len() as u32);
            }
            records.push(at as u32);
            at += 12
                + match header.kind {
                    KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => header.vlen * 12,
                    KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                    KIND_ARRAY => 12,
                    KIND_ENUM | KIND_FUNC_PROTO => header.vlen * 8,
                    _ => 0,
                };
        }
        if at != types_data.len() {
            bail!("BTF type section truncated");
        }
        Ok(Btf {
            data,
            types_at,
            strings,
            records,
            structs,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let strings = &self.data[self.strings.clone()];
        let rest = strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn types(&self) -> &[u8] {
        &self.data[self.types_at..]
    }

    /// The header of type `id` and where its record starts; None for void or an unknown id.
    fn header(&self, id: u32) -> Option<(Header, usize)> {
        let at = *self
            .records
            .get(id as usize)
            .filter(|&&at| at != u32::MAX)? as usize;
        Some((header(self.types(), at).ok()?, at))
    }

    /// Follow typedef/const/volatile/restrict/type_tag to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<(Header, usize)> {
        for _ in 0..32 {
            let (header, at) = self.header(id)?;
            match header.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = header.size_or_type
                }
                _ => return Some((header, at)),
            }
        }
        None
    }

    fn members(&self, header: &Header, at: usize) -> impl Iterator<Item = Member> + '_ {
        let kflag = header.kflag;
        (0..header.vlen).filter_map(move |i| {
            let m = at + 12 + i * 12;
            let types = self.types();
            let offset = u32_at(types, m + 8).ok()?;
            Some(Member {
                name_off: u32_at(types, m).ok()?,
                type_id: u32_at(types, m + 4).ok()?,
                bit_offset: if kflag { offset & 0xff_ffff } else { offset },
                bitfield_size: if kflag { offset >> 24 } else { 0 },
            })
        })
    }

    /// Bit offset of `member` in the struct or union at `at`, looking inside anonymous
    /// struct/union members.
    fn find_member(
        &self,
        header: &Header,
        at: usize,
        member: &str,
        depth: u32,
    ) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        for m in self.members(header, at) {
            if m.name_off != 0 {
                if self.name(m.name_off) == member.as_bytes() {
                    return Some((m.bit_offset, m.bitfield_size));
                }
                continue;
            }
            let (inner, inner_at) = self.resolve(m.type_id)?;
            // Checked: a corrupt record's offset near u32::MAX wrapped into a wrong offset.
            if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some((bits, size)) = self.find_member(&inner, inner_at, member, depth + 1)
                && let Some(total) = m.bit_offset.checked_add(bits)
            {
                return Some((total, size));
            }
        }
        None
    }

    pub fn member_offset(&self, struct_name: &str, member: &str) -> Result<MemberOffset> {
        let (header, at) = self
            .structs
            .iter()
            .filter_map(|&id| self.header(id))
            .find(|(header, _)| self.name(header.name_off) == struct_name.as_bytes())
            .with_context(|| format!("struct {struct_name} not found in kernel BTF"))?;
        let (bits, bitfield_size) = self
            .find_member(&header, at, member, 0)
            .with_context(|| format!("member {struct_name}.{member} not found in kernel BTF"))?;
        Ok(MemberOffset {
            bytes: bits / 8,
            bitfield: bitfield_size != 0 || bits % 8 != 0,
        })
    }

    fn plain(&self, struct_name: &str, member: &str) -> Result<u32> {
        let offset = self.member_offset(struct_name, member)?;
        if offset.bitfield {
            bail!(
                "{struct_name}.{member} is a bitfield in this kernel; it cannot be read directly"
            );
        }
        Ok(offset.bytes)
    }

    /// Everything the socket walk in ebpf/src/socket.rs needs.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets> {
        let common = self.plain("sock", "__sk_common")?;
        let sock_common =
            |member: &str| -> Result<u32> { Ok(common + self.plain("sock_common", member)?) };
        // sk_type/sk_protocol were bitfields before Linux 5.6: skip that check there.
        let optional = |member: &str| -> u32 {
            match self.member_offset("sock", member) {
                Ok(offset) if !offset.bitfield => offset.bytes,
                _ => u32::MAX,
            }
        };
        Ok(KernelOffsets {
            task_files: self.plain("task_struct", "files")?,
            files_fdt: self.plain("files_struct", "fdt")?,
            fdtable_max_fds: self.plain("fdtable", "max_fds")?,
            fdtable_fd: self.plain("fdtable", "fd")?,
            file_private_data: self.plain("file", "private_data")?,
            socket_sk: self.plain("socket", "sk")?,
            sock_family: sock_common("skc_family")?,
            sock_num: sock_common("skc_num")?,
            sock_dport: sock_common("skc_dport")?,
            sock_daddr: sock_common("skc_daddr")?,
            sock_rcv_saddr: sock_common("skc_rcv_saddr")?,
            sock_v6_daddr: sock_common("skc_v6_daddr")?,
            sock_v6_rcv_saddr: sock_common("skc_v6_rcv_saddr")?,
            sock_type: optional("sk_type"),
            sock_protocol: optional("sk_protocol"),
            _pad: 0,
        })
    }
}

fn header(types: &[u8], at: usize) -> Result<Header> {
    let info = u32_at(types, at + 4)?;
    Ok(Header {
        name_off: u32_at(types, at)?,
        kind: (info >> 24) & 0x1f,
        vlen: (info & 0xffff) as usize,
        kflag: info >> 31 == 1,
        size_or_type: u32_at(types, at + 8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made BTF blob: struct outer { int a; union { struct { int b; int c; }; long d; }; }
    fn fixture() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0d\0long\0".to_vec();
        let s = |name: &str| -> u32 {
            let pos = strings
                .windows(name.len() + 2)
                .position(|w| {
                    w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0
                })
                .unwrap();
            pos as u32 + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int
        push(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: long
        push(&[s("long"), KIND_INT << 24, 8, 64]);
        // 3: anonymous struct { int b; int c; }
        push(&[0, (KIND_STRUCT << 24) | 2, 8, s("b"), 1, 0, s("c"), 1, 32]);
        // 4: anonymous union { struct 3; long d; }
        push(&[0, (KIND_UNION << 24) | 2, 8, 0, 3, 0, s("d"), 2, 0]);
        // 5: struct outer { int a; union 4 at 64 bits; }
        push(&[
            s("outer"),
            (KIND_STRUCT << 24) | 2,
            16,
            s("a"),
            1,
            0,
            0,
            4,
            64,
        ]);
        let mut data = Vec::new();
        data.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        data.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(&strings);
        data
    }

    #[test]
    fn finds_members_inside_anonymous_unions_and_structs() {
        let btf = Btf::parse(fixture()).unwrap();
        let at = |m| btf.member_offset("outer", m).unwrap().bytes;
        assert_eq!(at("a"), 0);
        assert_eq!(at("b"), 8);
        assert_eq!(at("c"), 12);
        assert_eq!(at("d"), 8);
        assert!(btf.member_offset("outer", "zz").is_err());
        assert!(btf.member_offset("nope", "a").is_err());
    }

    #[test]
    fn offsets_past_u32_are_not_found() {
        // Found by the btf fuzz target (agent/fuzz/artifacts/btf): an anonymous member at a bit
        // offset near u32::MAX plus its inner member's offset overflowed.
        let mut data = fixture();
        // The last word of the type section: the offset of outer's anonymous union.
        let at = 24 + u32_at(&data, 12).unwrap() as usize - 4;
        assert_eq!(u32_at(&data, at).unwrap(), 64);
        data[at..at + 4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        let btf = Btf::parse(data).unwrap();
        assert!(btf.member_offset("outer", "c").is_err());
        assert_eq!(btf.member_offset("outer", "a").unwrap().bytes, 0);
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, definitely not".to_vec()).is_err());
        let mut truncated = fixture();
        truncated.truncate(40);
        assert!(Btf::parse(truncated).is_err());
    }

    #[test]
    fn running_kernel_has_every_offset_the_probes_need() {
        let btf = Btf::from_sys_fs().expect("kernel BTF is a prerequisite of kspan");
        let offsets = btf.kernel_offsets().unwrap();
        // On every kernel, skc_daddr and skc_rcv_saddr are adjacent and first in sock_common.
        assert_eq!(offsets.sock_rcv_saddr, offsets.sock_daddr + 4);
        assert_ne!(offsets.task_files, 0);
    }
}
