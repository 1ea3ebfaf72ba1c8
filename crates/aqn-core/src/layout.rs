//! How a row-major tensor is seen by the quantizers: `rows` rows of `k` elements (the last
//! dimension), cut into blocks of `block` elements along each row; the last block of a row
//! may be short. docs/reference/FORMATS.md, "Tensor layout".

use crate::error::{Error, Result};

/// Largest last dimension accepted: codes and scales index rows with u32 on the GPU side
/// and a row must fit comfortably in memory; 2^31 elements per row is far beyond any weight.
pub const MAX_K: usize = 1 << 31;

/// Rows-of-blocks view of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Number of rows (product of all but the last dimension; 0 for an empty tensor).
    pub rows: usize,
    /// Elements per row (the last dimension).
    pub k: usize,
    /// Block size along the row.
    pub block: usize,
}

impl Layout {
    /// The layout of a tensor of shape `shape` (row-major) with blocks of `block` elements.
    ///
    /// Errors: a 0-d shape, a last dimension of 0 with other dimensions non-empty is fine
    /// (empty tensor), a last dimension above [`MAX_K`], or a total size that overflows.
    pub fn from_shape(shape: &[usize], block: usize) -> Result<Self> {
        let Some((&k, lead)) = shape.split_last() else {
            return Err(Error::Shape(
                "a 0-d tensor has no last dimension to block; reshape it to [1] first".into(),
            ));
        };
        if k > MAX_K {
            return Err(Error::Shape(format!(
                "last dimension {k} exceeds the supported maximum {MAX_K}"
            )));
        }
        let rows = lead.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let rows = rows.ok_or_else(|| Error::Shape(format!("shape {shape:?} overflows usize")))?;
        rows.checked_mul(k)
            .ok_or_else(|| Error::Shape(format!("shape {shape:?} overflows usize")))?;
        Ok(Self { rows, k, block })
    }

    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.rows * self.k
    }

    /// Blocks per row, `ceil(k / block)`.
    pub fn blocks_per_row(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    /// Packed code bytes per row, `ceil(k / 2)`.
    pub fn packed_per_row(&self) -> usize {
        self.k.div_ceil(2)
    }

    /// Rows handed to one rayon task: enough that a task has ~32K elements of work.
    pub(crate) fn rows_per_task(&self) -> usize {
        const TARGET: usize = 1 << 15;
        (TARGET / self.k.max(1)).max(1)
    }

    pub(crate) fn check_len(&self, what: &'static str, expected: usize, got: usize) -> Result<()> {
        if expected == got {
            Ok(())
        } else {
            Err(Error::Length {
                what,
                expected,
                got,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let l = Layout::from_shape(&[3, 5, 33], 32).unwrap();
        assert_eq!(
            (l.rows, l.k, l.blocks_per_row(), l.packed_per_row()),
            (15, 33, 2, 17)
        );
        assert!(Layout::from_shape(&[], 32).is_err());
        let e = Layout::from_shape(&[0, 7], 16).unwrap();
        assert_eq!(e.numel(), 0);
        assert!(Layout::from_shape(&[1, MAX_K + 1], 16).is_err());
        assert!(Layout::from_shape(&[usize::MAX, 2], 16).is_err());
    }
}
