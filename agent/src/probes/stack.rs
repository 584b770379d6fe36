//! The BPF stack each program uses, read from the eBPF object: the deepest byte below the frame
//! pointer (r10) that an instruction touches, directly or through a register holding `r10 - k`
//! (a pointer to a stack slot handed to a helper). This is the "stack depth" the verifier reports
//! per function; kernels before 6.13 reject a call chain whose frames, each rounded up to 32
//! bytes, sum to more than 512. Printed in the verifier report (`RUST_LOG=kspan::probes=debug`).

use std::collections::HashMap;

use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

/// Program (function symbol) name → stack depth in bytes, for every function in `elf`.
pub fn stack_depths(elf: &[u8]) -> HashMap<String, u32> {
    let mut depths = HashMap::new();
    let Ok(file) = object::File::parse(elf) else {
        return depths;
    };
    for symbol in file.symbols() {
        if symbol.kind() != SymbolKind::Text || symbol.size() == 0 {
            continue;
        }
        let (Ok(name), Some(index)) = (symbol.name(), symbol.section_index()) else {
            continue;
        };
        let Some(code) = file
            .section_by_index(index)
            .ok()
            .and_then(|section| section.data().ok())
        else {
            continue;
        };
        let start = symbol.address() as usize;
        if let Some(body) = code.get(start..start + symbol.size() as usize) {
            depths.insert(name.to_string(), function_stack_depth(body));
        }
    }
    depths
}

/// One straight pass over the instructions (branches ignored: a stack pointer is made and used
/// next to each other).
pub fn function_stack_depth(code: &[u8]) -> u32 {
    const FP: usize = 10;
    // r0..r10: Some(k) while the register holds r10 + k.
    let mut frame_offset: [Option<i64>; 11] = [None; 11];
    let mut deepest: i64 = 0;
    let mut at = 0;
    while at + 8 <= code.len() {
        let op = code[at];
        let dst = usize::from(code[at + 1] & 0x0f);
        let src = usize::from(code[at + 1] >> 4);
        let off = i64::from(i16::from_le_bytes([code[at + 2], code[at + 3]]));
        let imm = i64::from(i32::from_le_bytes(code[at + 4..at + 8].try_into().unwrap()));
        at += if op == 0x18 { 16 } else { 8 }; // ld_imm64 takes two slots
        if dst > FP || src > FP {
            continue;
        }
        let base = |reg: usize| {
            if reg == FP {
                Some(0)
            } else {
                frame_offset[reg]
            }
        };
        match op & 0x07 {
            // LDX: dst = *(src + off)
            0x01 => {
                if let Some(k) = base(src) {
                    deepest = deepest.max(-(k + off));
                }
                frame_offset[dst] = None;
            }
            // ST, STX: *(dst + off) = ...
            0x02 | 0x03 => {
                if let Some(k) = base(dst) {
                    deepest = deepest.max(-(k + off));
                }
            }
            // ALU64
            0x07 => match op {
                0xbf => frame_offset[dst] = base(src), // mov dst, src
                0x07 => frame_offset[dst] = frame_offset[dst].map(|k| k + imm), // add dst, imm
                _ => frame_offset[dst] = None,
            },
            // JMP: a call clobbers r0-r5
            0x05 if op == 0x85 => frame_offset[..6].fill(None),
            // ALU (32-bit) and loads overwrite dst
            0x00 | 0x04 => frame_offset[dst] = None,
            _ => {}
        }
        for k in frame_offset.iter().flatten() {
            deepest = deepest.max(-k);
        }
    }
    deepest.max(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> Vec<u8> {
        let mut v = vec![op, dst | (src << 4)];
        v.extend(off.to_le_bytes());
        v.extend(imm.to_le_bytes());
        v
    }

    #[test]
    fn deepest_direct_store_and_stack_pointer() {
        let code = [
            insn(0x7b, 10, 1, -8, 0),  // *(u64 *)(r10 - 8) = r1
            insn(0xbf, 2, 10, 0, 0),   // r2 = r10
            insn(0x07, 2, 0, 0, -40),  // r2 += -40
            insn(0x85, 0, 0, 0, 1),    // call (r2 passed to a helper)
            insn(0x61, 3, 10, -24, 0), // r3 = *(u32 *)(r10 - 24)
            insn(0x95, 0, 0, 0, 0),    // exit
        ]
        .concat();
        assert_eq!(function_stack_depth(&code), 40);
    }

    #[test]
    fn no_stack() {
        let code = [insn(0xb7, 0, 0, 0, 0), insn(0x95, 0, 0, 0, 0)].concat();
        assert_eq!(function_stack_depth(&code), 0);
    }

    #[test]
    fn the_embedded_programs_fit_every_verifier() {
        let depths = stack_depths(super::super::EBPF_OBJECT);
        for (program, _, _) in super::super::TRACEPOINTS {
            let depth = depths[*program];
            // Rounded up to 32 as kernels before 6.13 do, plus a 32-byte frame for one memset
            // call: the combined limit is 512.
            assert!(
                depth.div_ceil(32) * 32 + 32 <= 512,
                "{program}: {depth} bytes of stack"
            );
        }
    }
}
