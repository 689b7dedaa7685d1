//! The BPF stack each program needs, read from the eBPF object as the verifier would
//! count it: each function's frame is the deepest byte below r10 that its
//! instructions touch (a load, a store, or an address `r10 + k` handed on, e.g. a map
//! key), and a program needs the sum of the frames along its deepest chain of
//! BPF-to-BPF calls. The verifier refuses a chain above 512 bytes ("combined stack
//! size of N calls"), after rounding each frame: to 16 bytes where the program is
//! JIT-compiled since Linux 6.9, to 32 bytes (at least 32, even for an empty frame)
//! before (`round_up_stack_depth` in kernel/bpf/verifier.c).

use std::collections::BTreeMap;

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SymbolKind};

/// The verifier's limit for one call chain (`MAX_BPF_STACK`).
pub const MAX_BPF_STACK: u32 = 512;

/// A function of the object: a program's entry point or a BPF-to-BPF callee.
#[derive(Clone, Debug)]
pub struct Function {
    pub name: String,
    /// The ELF section (programs sit in `xdp`, `classifier`; callees in `.text`).
    pub section: String,
    /// Bytes below r10 used, rounded up to the verifier's 8-byte slots.
    pub frame: u32,
    /// Indices (into `StackReport::functions`) of the functions it calls.
    pub callees: Vec<usize>,
    /// A global symbol outside `.text` is a program's entry point.
    pub is_global: bool,
}

/// How the kernel rounds a frame before adding it to a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// Linux 6.9 and later with the JIT: a multiple of 16.
    Jit16,
    /// Before Linux 6.9 (and the interpreter): a multiple of 32, at least 32.
    Legacy32,
}

impl Rounding {
    pub fn frame(self, bytes: u32) -> u32 {
        match self {
            Self::Jit16 => bytes.div_ceil(16) * 16,
            Self::Legacy32 => bytes.max(1).div_ceil(32) * 32,
        }
    }
}

/// The deepest call chain of one program.
#[derive(Clone, Debug)]
pub struct Chain {
    /// Total bytes, each frame rounded.
    pub bytes: u32,
    /// The functions from the entry point down, with their rounded frames.
    pub frames: Vec<(String, u32)>,
}

pub struct StackReport {
    pub functions: Vec<Function>,
    /// Indices of the programs' entry points (global functions outside `.text`).
    pub programs: Vec<usize>,
}

impl StackReport {
    /// Reads every function of an eBPF ELF object, its frame and its calls.
    pub fn from_object(bytes: &[u8]) -> Result<Self, String> {
        let file = object::File::parse(bytes).map_err(|e| format!("parsing the object: {e}"))?;
        // Functions by (section index, byte offset of their first instruction).
        let mut starts: BTreeMap<(usize, u64), usize> = BTreeMap::new();
        let mut functions = Vec::new();
        let mut extents = Vec::new();
        for symbol in file.symbols() {
            if symbol.kind() != SymbolKind::Text || !symbol.is_definition() {
                continue;
            }
            let Some(section_index) = symbol.section_index() else {
                continue;
            };
            let section = file
                .section_by_index(section_index)
                .map_err(|e| format!("section of {:?}: {e}", symbol.name()))?;
            let name = symbol.name().map_err(|e| e.to_string())?.to_owned();
            starts.insert((section_index.0, symbol.address()), functions.len());
            extents.push((section_index, symbol.address(), symbol.size()));
            functions.push(Function {
                name,
                section: section.name().unwrap_or("?").to_owned(),
                frame: 0,
                callees: Vec::new(),
                is_global: symbol.is_global(),
            });
        }
        for (index, &(section_index, start, size)) in extents.iter().enumerate() {
            let section = file
                .section_by_index(section_index)
                .map_err(|e| e.to_string())?;
            let data = section.data().map_err(|e| e.to_string())?;
            // Call relocations of this section, by instruction offset: the callee is
            // the symbol's instruction plus the call's immediate plus one (as libbpf
            // resolves them).
            let mut relocated: BTreeMap<u64, (usize, u64)> = BTreeMap::new();
            for (offset, relocation) in section.relocations() {
                if let RelocationTarget::Symbol(symbol_index) = relocation.target() {
                    let symbol = file
                        .symbol_by_index(symbol_index)
                        .map_err(|e| e.to_string())?;
                    if let Some(target_section) = symbol.section_index() {
                        relocated.insert(offset, (target_section.0, symbol.address()));
                    }
                }
            }
            let end = usize::try_from(start + size).map_err(|e| e.to_string())?;
            let code = data
                .get(start as usize..end)
                .ok_or_else(|| format!("{} lies outside its section", functions[index].name))?;
            let (frame, calls) = scan(code, start, section_index.0, &relocated)?;
            functions[index].frame = frame.div_ceil(8) * 8;
            let mut callees = Vec::new();
            for target in calls {
                let callee = *starts.get(&target).ok_or_else(|| {
                    format!(
                        "{} calls an instruction that starts no function ({target:?})",
                        functions[index].name
                    )
                })?;
                if !callees.contains(&callee) {
                    callees.push(callee);
                }
            }
            functions[index].callees = callees;
        }
        let programs = functions
            .iter()
            .enumerate()
            .filter(|(_, f)| f.is_global && f.section != ".text")
            .map(|(i, _)| i)
            .collect();
        Ok(Self {
            functions,
            programs,
        })
    }

    /// The deepest chain from function `index` (the verifier refuses recursion, so
    /// the call graph is acyclic; a cycle here is an error all the same).
    pub fn deepest_chain(&self, index: usize, rounding: Rounding) -> Result<Chain, String> {
        self.deepest_from(index, rounding, &mut Vec::new())
    }

    fn deepest_from(
        &self,
        index: usize,
        rounding: Rounding,
        path: &mut Vec<usize>,
    ) -> Result<Chain, String> {
        if path.contains(&index) {
            return Err(format!("recursive call to {}", self.functions[index].name));
        }
        path.push(index);
        let function = &self.functions[index];
        let mut deepest = Chain {
            bytes: 0,
            frames: Vec::new(),
        };
        for &callee in &function.callees {
            let chain = self.deepest_from(callee, rounding, path)?;
            if chain.bytes > deepest.bytes {
                deepest = chain;
            }
        }
        path.pop();
        let own = rounding.frame(function.frame);
        deepest.bytes += own;
        deepest.frames.insert(0, (function.name.clone(), own));
        Ok(deepest)
    }
}

const BPF_LD_IMM64: u8 = 0x18;
const BPF_CALL: u8 = 0x85;
const BPF_PSEUDO_CALL: u8 = 1;
const BPF_ALU64_MOV_X: u8 = 0xbf;
const BPF_ALU64_ADD_K: u8 = 0x07;
const FRAME_POINTER: u8 = 10;

/// The deepest byte below r10 that `code` touches, and the (section, offset) of each
/// function it calls. Registers holding `r10 + k` are followed through `mov` and
/// `add` in instruction order: LLVM computes such an address right before using it.
fn scan(
    code: &[u8],
    base: u64,
    section: usize,
    relocated: &BTreeMap<u64, (usize, u64)>,
) -> Result<(u32, Vec<(usize, u64)>), String> {
    // `Some(k)`: the register holds r10 + k.
    let mut frame_offset: [Option<i64>; 11] = [None; 11];
    frame_offset[FRAME_POINTER as usize] = Some(0);
    let mut deepest: i64 = 0;
    let mut calls = Vec::new();
    let mut at = 0;
    while at + 8 <= code.len() {
        let insn = &code[at..at + 8];
        let opcode = insn[0];
        let dst = (insn[1] & 0x0f) as usize;
        let src = (insn[1] >> 4) as usize;
        let offset = i64::from(i16::from_le_bytes([insn[2], insn[3]]));
        let imm = i64::from(i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]));
        let class = opcode & 0x07;
        let width = if opcode == BPF_LD_IMM64 { 16 } else { 8 };
        let mut touched = None;
        match class {
            // LDX: dst = *(src + off)
            0x01 if src <= 10 => touched = frame_offset[src].map(|k| k + offset),
            // ST / STX (and atomics): *(dst + off) = ...
            0x02 | 0x03 if dst <= 10 => touched = frame_offset[dst].map(|k| k + offset),
            _ => {}
        }
        if let Some(byte) = touched {
            deepest = deepest.min(byte);
        }
        if opcode == BPF_CALL && src as u8 == BPF_PSEUDO_CALL {
            let here = base + at as u64;
            let target = match relocated.get(&here) {
                Some(&(target_section, symbol)) => {
                    (target_section, offset_by(symbol, imm + 1, "call")?)
                }
                None => (section, offset_by(here, imm + 1, "call")?),
            };
            calls.push(target);
        }
        // What the instruction writes to `dst` (LDX and ALU/ALU64 classes; a call
        // clobbers r0-r5).
        if dst <= 10 && dst != FRAME_POINTER as usize {
            match opcode {
                BPF_ALU64_MOV_X if src <= 10 => frame_offset[dst] = frame_offset[src],
                BPF_ALU64_ADD_K => {
                    if let Some(k) = frame_offset[dst] {
                        let address = k + imm;
                        deepest = deepest.min(address);
                        frame_offset[dst] = Some(address);
                    }
                }
                _ if matches!(class, 0x01 | 0x04 | 0x07) || opcode == BPF_LD_IMM64 => {
                    frame_offset[dst] = None;
                }
                _ => {}
            }
        }
        if opcode == BPF_CALL {
            for register in frame_offset.iter_mut().take(6) {
                *register = None;
            }
        }
        at += width;
    }
    let bytes = u32::try_from(-deepest).map_err(|e| e.to_string())?;
    Ok((bytes, calls))
}

fn offset_by(from: u64, instructions: i64, what: &str) -> Result<u64, String> {
    u64::try_from(from as i64 + instructions * 8)
        .map_err(|_| format!("{what} target before the section start"))
}
