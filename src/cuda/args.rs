//! The arguments of the CUDA functions as Python passes them, checked before any driver call
//! (in the CPU-only build too, so a bad argument says what is wrong before "not built"):
//! dtype, format and scale-mode strings, the `[rows, k]` size, the NVFP4 amax source, and a
//! DLPack dtype.

use super::abi::{self, Dt, Fmt};
use crate::dlpack::{DLDataType, DL_BFLOAT, DL_FLOAT};
use crate::error::{Error, Result};

// The kernels' block sizes are the core's: the CPU path and the kernels tile alike.
const _: () = assert!(abi::MXFP4_BLOCK == aqn_core::mxfp4::BLOCK);
const _: () = assert!(abi::NVFP4_BLOCK == aqn_core::nvfp4::BLOCK);

/// The dtype tag `_cuda.py` passes.
pub fn dtype(s: &str) -> Result<Dt> {
    match s {
        "f32" => Ok(Dt::F32),
        "bf16" => Ok(Dt::Bf16),
        "f16" => Ok(Dt::F16),
        _ => Err(Error::Type(format!(
            "unsupported dtype {s:?}; expected \"f32\", \"bf16\" or \"f16\" \
             (torch.float32, torch.bfloat16, torch.float16)"
        ))),
    }
}

/// The format name.
pub fn format(s: &str) -> Result<Fmt> {
    match s {
        "mxfp4" => Ok(Fmt::Mxfp4),
        "nvfp4" => Ok(Fmt::Nvfp4),
        _ => Err(Error::Value(format!(
            "unknown format {s:?}; expected \"mxfp4\" or \"nvfp4\""
        ))),
    }
}

/// MXFP4 scale mode number as the kernels take it (`Args::mode`).
pub fn mode_number(fmt: Fmt, mode: &str) -> Result<i32> {
    if fmt == Fmt::Nvfp4 {
        return Ok(0); // NVFP4 has one rule; the mode argument is ignored
    }
    let m: aqn_core::ScaleMode = mode.parse()?;
    Ok(match m {
        aqn_core::ScaleMode::Floor => abi::MX_FLOOR,
        aqn_core::ScaleMode::Rceil => abi::MX_RCEIL,
        aqn_core::ScaleMode::Even => abi::MX_EVEN,
        aqn_core::ScaleMode::Ceil => abi::MX_CEIL,
    })
}

/// The `[rows, k]` view: checks that the sizes multiply without overflow.
pub fn numel(rows: u64, k: u64) -> Result<usize> {
    let layout = aqn_core::Layout::from_shape(&[rows as usize, k as usize], 1)?;
    Ok(layout.numel())
}

/// Where the caller's NVFP4 tensor amax comes from (exactly one of the three).
#[derive(Clone, Copy, Debug)]
pub enum AmaxSource {
    /// Reduce it on the device into this scratch (AMAX_SCRATCH f32).
    Compute { scratch: u64 },
    /// A device f32 (a 0-d tensor): used as is, never read on the host.
    Device { ptr: u64 },
    /// A host value, validated here.
    Host { value: f32 },
}

/// The amax source from the three optional arguments (0 = not given for the pointers).
pub fn amax_source(amax_ptr: u64, amax_value: Option<f32>, scratch: u64) -> Result<AmaxSource> {
    match (amax_ptr != 0, amax_value, scratch != 0) {
        (true, None, false) => Ok(AmaxSource::Device { ptr: amax_ptr }),
        (false, Some(v), false) => {
            aqn_core::nvfp4::validate_amax(v)?;
            Ok(AmaxSource::Host { value: v })
        }
        (false, None, true) => Ok(AmaxSource::Compute { scratch }),
        _ => Err(Error::Value(
            "NVFP4 needs exactly one amax source: a device pointer, a host value, or a \
             scratch buffer to compute it in"
                .into(),
        )),
    }
}

/// Dtype of a DLPack dtype, if the kernels take it.
pub fn dt_of(d: DLDataType) -> Option<Dt> {
    match (d.code, d.bits, d.lanes) {
        (DL_FLOAT, 32, 1) => Some(Dt::F32),
        (DL_BFLOAT, 16, 1) => Some(Dt::Bf16),
        (DL_FLOAT, 16, 1) => Some(Dt::F16),
        _ => None,
    }
}

/// One non-empty tensor of a multi-tensor fake quant, its sizes checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManyTensor {
    pub x: u64,
    pub out: u64,
    /// Elements (a multiple of the block and of a 16-byte vector).
    pub n: u64,
    /// NVFP4: its amax slot (0 for MXFP4).
    pub slot: u32,
}

/// The tensors of one multi-tensor launch (at most `abi::MANY_MAX`) and, for NVFP4, the
/// slots `slot_lo ..= slot_hi` whose amaxes it computes: every slot of the call lies in
/// exactly one batch, and all tensors of a slot in the same one (a slot's amax is a max
/// over all of them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManyBatch {
    pub tensors: Vec<ManyTensor>,
    pub slot_lo: u32,
    pub slot_hi: u32,
}

/// Checks the arguments of a multi-tensor fake quant (`xs[i]` into `outs[i]`, `ns[i]`
/// elements with last dimension `ks[i]`; NVFP4: `slots[i]` < `n_slots` names its shared
/// amax, and `scratch_len` f32 of scratch hold `n_slots * AMAX_SCRATCH` partials) and splits
/// them into launches. Every tensor must have the vector layout (whole blocks along `k`);
/// pointer alignment and memory are checked at launch. NVFP4 tensors go in slot order, and
/// with `max_elems` > 0 an NVFP4 launch closes before a slot's tensors would take it past that
/// many elements (a slot larger than that goes alone): its amax pass and its fake quant then
/// run back to back over bytes that can still be in L2 (see `tuning::many_batch_bytes`).
// One parameter per argument of the Python entry point it serves.
#[allow(clippy::too_many_arguments)]
pub fn many_batches(
    fmt: Fmt,
    xs: &[u64],
    outs: &[u64],
    ns: &[u64],
    ks: &[u64],
    slots: &[u32],
    n_slots: u64,
    scratch_len: u64,
    max_elems: u64,
) -> Result<Vec<ManyBatch>> {
    let len = xs.len();
    let nv = fmt == Fmt::Nvfp4;
    if outs.len() != len || ns.len() != len || ks.len() != len || (nv && slots.len() != len) {
        return Err(Error::Value(format!(
            "fake_quant_many: {len} inputs, {} outputs, {} element counts, {} last dimensions \
             and {} slots",
            outs.len(),
            ns.len(),
            ks.len(),
            slots.len()
        )));
    }
    let block = fmt.block() as u64;
    let mut tensors = Vec::with_capacity(len);
    for i in 0..len {
        let (n, k) = (ns[i], ks[i]);
        if n > 0 && (k == 0 || !n.is_multiple_of(k) || !k.is_multiple_of(block)) {
            return Err(Error::Value(format!(
                "fake_quant_many: tensor {i} has {n} elements with last dimension {k}; the \
                 multi-tensor path needs whole {block}-element blocks along it"
            )));
        }
        let slot = if nv { slots[i] } else { 0 };
        if nv && slot as u64 >= n_slots {
            return Err(Error::Value(format!(
                "fake_quant_many: tensor {i} names amax slot {slot} of {n_slots}"
            )));
        }
        if n > 0 {
            tensors.push(ManyTensor {
                x: xs[i],
                out: outs[i],
                n,
                slot,
            });
        }
    }
    if !nv {
        return Ok(tensors
            .chunks(abi::MANY_MAX)
            .map(|c| ManyBatch {
                tensors: c.to_vec(),
                slot_lo: 0,
                slot_hi: 0,
            })
            .collect());
    }
    if n_slots > i32::MAX as u64 {
        return Err(Error::Value(format!(
            "fake_quant_many: {n_slots} amax slots"
        )));
    }
    let need = n_slots.saturating_mul(abi::AMAX_SCRATCH as u64);
    if scratch_len < need {
        return Err(Error::Value(format!(
            "fake_quant_many: scratch of {scratch_len} f32 for {n_slots} slots (needs {need})"
        )));
    }
    if n_slots == 0 {
        return Ok(Vec::new());
    }
    tensors.sort_by_key(|t| t.slot); // stable: a slot's tensors keep their order
    let mut batches = Vec::new();
    let mut cur: Vec<ManyTensor> = Vec::new();
    let mut lo: u32 = 0;
    let mut cur_elems: u64 = 0;
    let mut i = 0;
    while i < tensors.len() {
        let slot = tensors[i].slot;
        let run = tensors[i..].iter().take_while(|t| t.slot == slot).count();
        if run > abi::MANY_MAX {
            return Err(Error::Value(format!(
                "fake_quant_many: {run} tensors share amax slot {slot} (at most {} do)",
                abi::MANY_MAX
            )));
        }
        let run_elems: u64 = tensors[i..i + run].iter().map(|t| t.n).sum();
        let over = max_elems > 0 && !cur.is_empty() && cur_elems + run_elems > max_elems;
        if cur.len() + run > abi::MANY_MAX || over {
            let hi = cur.last().map(|t| t.slot).unwrap_or(lo);
            batches.push(ManyBatch {
                tensors: std::mem::take(&mut cur),
                slot_lo: lo,
                slot_hi: hi,
            });
            lo = hi + 1;
            cur_elems = 0;
        }
        cur_elems += run_elems;
        cur.extend_from_slice(&tensors[i..i + run]);
        i += run;
    }
    // The last batch also folds the slots after the last tensor's (amax 0: all empty).
    batches.push(ManyBatch {
        tensors: cur,
        slot_lo: lo,
        slot_hi: (n_slots - 1) as u32,
    });
    Ok(batches)
}

/// The leading chunks (of `chunk` vectors, entry by entry as a multi-tensor launch numbers
/// them) that hold no more than `keep_vecs` vectors: what the amax pass asks L2 to keep for the
/// fake quant after it, which reads the launch from its first chunk on. An entry's last chunk
/// counts in full (it may be short), so the kept bytes never exceed `keep_vecs`.
// Used by the CUDA build only; tested in every build.
#[cfg_attr(not(aqn_cuda), allow(dead_code))]
pub fn keep_chunks(n_vecs: impl Iterator<Item = u64>, chunk: u64, keep_vecs: u64) -> u64 {
    let (mut chunks, mut vecs) = (0u64, 0u64);
    for n in n_vecs {
        let full = n.div_ceil(chunk) * chunk;
        if vecs + full <= keep_vecs {
            chunks += n.div_ceil(chunk);
            vecs += full;
        } else {
            return chunks + (keep_vecs - vecs) / chunk;
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_chunks_counts_whole_chunks_within_the_budget() {
        // Chunks of 10 vectors; entries of 25 (3 chunks, the last short one counting as 10),
        // 10 (1) and 40 (4) vectors.
        let c = 10;
        let n = || [25u64, 10, 40].into_iter();
        assert_eq!(keep_chunks(n(), c, 0), 0);
        assert_eq!(keep_chunks(n(), c, 9), 0);
        assert_eq!(keep_chunks(n(), c, 10), 1);
        assert_eq!(keep_chunks(n(), c, 29), 2); // the short third chunk needs 30
        assert_eq!(keep_chunks(n(), c, 30), 3);
        assert_eq!(keep_chunks(n(), c, 40), 4);
        assert_eq!(keep_chunks(n(), c, 65), 6);
        assert_eq!(keep_chunks(n(), c, 80), 8);
        assert_eq!(keep_chunks(n(), c, u64::MAX), 8); // never more than the launch has
        assert_eq!(keep_chunks([0u64, 5].into_iter(), c, 10), 1); // an empty entry takes none
    }

    fn plan(slots: &[u32], n_slots: u64) -> Result<Vec<ManyBatch>> {
        let len = slots.len();
        let xs: Vec<u64> = (0..len as u64).map(|i| 0x1000 * (i + 1)).collect();
        many_batches(
            Fmt::Nvfp4,
            &xs,
            &xs,
            &vec![64; len],
            &vec![16; len],
            slots,
            n_slots,
            n_slots * abi::AMAX_SCRATCH as u64,
            0,
        )
    }

    #[test]
    fn batches_keep_slots_whole_and_cover_every_slot() {
        // 300 tensors, slots of three members: 42 slots per batch (126 tensors).
        let slots: Vec<u32> = (0..300u32).map(|i| i / 3).collect();
        let b = plan(&slots, 100).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(
            (b[0].slot_lo, b[0].slot_hi, b[0].tensors.len()),
            (0, 41, 126)
        );
        assert_eq!(
            (b[1].slot_lo, b[1].slot_hi, b[1].tensors.len()),
            (42, 83, 126)
        );
        assert_eq!(
            (b[2].slot_lo, b[2].slot_hi, b[2].tensors.len()),
            (84, 99, 48)
        );
        for batch in &b {
            for t in &batch.tensors {
                assert!(t.slot >= batch.slot_lo && t.slot <= batch.slot_hi);
            }
        }
    }

    #[test]
    fn slots_are_sorted_and_empty_slots_folded() {
        let b = plan(&[2, 0, 2, 0], 4).unwrap();
        assert_eq!(b.len(), 1);
        let s: Vec<u32> = b[0].tensors.iter().map(|t| t.slot).collect();
        assert_eq!(s, vec![0, 0, 2, 2]);
        assert_eq!(b[0].tensors[0].x, 0x2000); // stable within a slot
        assert_eq!((b[0].slot_lo, b[0].slot_hi), (0, 3));
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(plan(&[0; 127], 1).is_err()); // one slot, more members than a launch holds
        assert!(plan(&[1], 1).is_err()); // slot out of range
        let e = many_batches(Fmt::Nvfp4, &[1], &[1], &[48], &[24], &[0], 1, 1024, 0);
        assert!(e.is_err()); // 24 is not a multiple of the 16-element block
        let e = many_batches(Fmt::Nvfp4, &[1], &[1], &[64], &[16], &[0], 1, 1023, 0);
        assert!(e.is_err()); // scratch too small
        let e = many_batches(
            Fmt::Mxfp4,
            &[1, 2],
            &[1],
            &[64, 64],
            &[32, 32],
            &[],
            0,
            0,
            0,
        );
        assert!(e.is_err()); // lengths differ
    }

    #[test]
    fn element_cap_closes_launches_between_slots() {
        // slots 0 (2 x 64), 1 (1 x 512: over the cap, alone), 2 (3 x 64), 3 (1 x 64), 4 empty
        let slots = [0, 0, 1, 2, 2, 2, 3];
        let ns = [64, 64, 512, 64, 64, 64, 64];
        let xs: Vec<u64> = (1..=7).collect();
        let capped = |max_elems| {
            many_batches(
                Fmt::Nvfp4,
                &xs,
                &xs,
                &ns,
                &[16; 7],
                &slots,
                5,
                5 * abi::AMAX_SCRATCH as u64,
                max_elems,
            )
            .unwrap()
        };
        let got: Vec<(u32, u32, usize)> = capped(200)
            .iter()
            .map(|b| (b.slot_lo, b.slot_hi, b.tensors.len()))
            .collect();
        // 128 + 512 > 200 closes [0]; 512 alone; 192 fits; 192 + 64 > 200 closes [2]; the
        // last launch folds the empty slot 4
        assert_eq!(got, vec![(0, 0, 2), (1, 1, 1), (2, 2, 3), (3, 4, 1)]);
        assert_eq!(capped(0).len(), 1); // no cap: one launch
    }

    #[test]
    fn mxfp4_batches_by_count() {
        let xs: Vec<u64> = (1..=130).collect();
        let b = many_batches(Fmt::Mxfp4, &xs, &xs, &[64; 130], &[32; 130], &[], 0, 0, 0).unwrap();
        assert_eq!(
            b.iter().map(|b| b.tensors.len()).collect::<Vec<_>>(),
            vec![126, 4]
        );
    }
}
